"""ONNX export of both models into a Triton model repository, with parity checks.

Layout (Triton model repository, ``deploy/triton``)::

    models/ich_slice_cnn/config.pbtxt
    models/ich_slice_cnn/1/model.onnx      image [-1,3,S,S] -> logits [-1,6], embedding [-1,F], features [-1,C,h,w]
    models/ich_sequence/config.pbtxt
    models/ich_sequence/1/model.onnx       sequence [-1,-1,F+6] -> logits [-1,-1,6]
    cam_head.npz                           weight [6,C], bias [6] of the CNN's linear head
    model_card.json

Both configs use ``max_batch_size: 0`` (the batch is an explicit dynamic dimension), so
Triton's dynamic batcher is off; the worker batches slices itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from triage_node.logs import get_logger
from worker.model.networks import N_CLASSES, SequenceModel, SliceCNN

log = get_logger(__name__)
OPSET = 17
SLICE_MODEL = "ich_slice_cnn"
SEQUENCE_MODEL = "ich_sequence"
TRITON_BATCHING = "max_batch_size 0; batch is dimension 0 of every tensor (-1); no dynamic batching"


class ExportError(RuntimeError):
    """The exported ONNX model does not match PyTorch."""


def _export(module: torch.nn.Module, example: torch.Tensor, path: Path, inp: str, outs: list[str], axes: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    module.eval()
    torch.onnx.export(
        module,
        (example,),
        str(path),
        input_names=[inp],
        output_names=outs,
        dynamic_axes=axes,
        opset_version=OPSET,
        do_constant_folding=True,
        dynamo=False,
    )


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def export_slice_cnn(model: SliceCNN, path: Path, size: int, check_batches: tuple[int, ...] = (1, 3)) -> float:
    """Export the slice CNN; return the max abs difference to PyTorch over ``check_batches``."""
    example = torch.rand(2, 3, size, size)
    _export(
        model,
        example,
        path,
        "image",
        ["logits", "embedding", "features"],
        {"image": {0: "batch"}, "logits": {0: "batch"}, "embedding": {0: "batch"}, "features": {0: "batch"}},
    )
    sess = _session(path)
    worst = 0.0
    gen = torch.Generator().manual_seed(0)
    for b in check_batches:
        x = torch.rand(b, 3, size, size, generator=gen)
        with torch.no_grad():
            ref = [t.numpy() for t in model(x)]
        got = sess.run(["logits", "embedding", "features"], {"image": x.numpy()})
        worst = max(worst, *(float(np.max(np.abs(r - g))) for r, g in zip(ref, got, strict=True)))
    return worst


def export_sequence(model: SequenceModel, path: Path, check_lengths: tuple[int, ...] = (1, 7, 40)) -> float:
    """Export the sequence model (dynamic batch and length); return the max abs difference."""
    dim = model.feature_dim + N_CLASSES
    example = torch.rand(1, 5, dim)
    _export(model, example, path, "sequence", ["logits"], {"sequence": {0: "batch", 1: "length"}, "logits": {0: "batch", 1: "length"}})
    sess = _session(path)
    worst = 0.0
    gen = torch.Generator().manual_seed(0)
    for n in check_lengths:
        x = torch.rand(1, n, dim, generator=gen)
        with torch.no_grad():
            ref = model(x).numpy()
        got = sess.run(["logits"], {"sequence": x.numpy()})[0]
        worst = max(worst, float(np.max(np.abs(ref - got))))
    return worst


def slice_config(size: int, feature_dim: int, feature_channels: int, fmap: int) -> str:
    return f"""name: "{SLICE_MODEL}"
backend: "onnxruntime"
max_batch_size: 0
input [
  {{ name: "image" data_type: TYPE_FP32 dims: [ -1, 3, {size}, {size} ] }}
]
output [
  {{ name: "logits" data_type: TYPE_FP32 dims: [ -1, {N_CLASSES} ] }},
  {{ name: "embedding" data_type: TYPE_FP32 dims: [ -1, {feature_dim} ] }},
  {{ name: "features" data_type: TYPE_FP32 dims: [ -1, {feature_channels}, {fmap}, {fmap} ] }}
]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
version_policy: {{ latest: {{ num_versions: 1 }} }}
"""


def sequence_config(feature_dim: int) -> str:
    return f"""name: "{SEQUENCE_MODEL}"
backend: "onnxruntime"
max_batch_size: 0
input [
  {{ name: "sequence" data_type: TYPE_FP32 dims: [ -1, -1, {feature_dim + N_CLASSES} ] }}
]
output [
  {{ name: "logits" data_type: TYPE_FP32 dims: [ -1, -1, {N_CLASSES} ] }}
]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
version_policy: {{ latest: {{ num_versions: 1 }} }}
"""


def export_repository(cnn: SliceCNN, seq: SequenceModel, size: int, out_dir: Path, tol: float = 1e-4) -> dict:
    """Write both ONNX models, their configs and the CAM head into ``out_dir`` (a Triton repo root).

    Returns a dict with the parity errors and shapes, for the model card.

    Raises
    ------
    ExportError
        When ONNX Runtime and PyTorch differ by ``tol`` or more.
    """
    out_dir = Path(out_dir)
    models = out_dir / "models"
    cnn = cnn.cpu().eval()
    seq = seq.cpu().eval()
    slice_path = models / SLICE_MODEL / "1" / "model.onnx"
    seq_path = models / SEQUENCE_MODEL / "1" / "model.onnx"
    err_cnn = export_slice_cnn(cnn, slice_path, size)
    err_seq = export_sequence(seq, seq_path)
    log.info("onnx_parity", slice_cnn=err_cnn, sequence=err_seq)
    if err_cnn >= tol or err_seq >= tol:
        raise ExportError(f"ONNX differs from PyTorch: slice_cnn {err_cnn:.2e}, sequence {err_seq:.2e} (tol {tol})")
    with torch.no_grad():
        fmap = int(cnn(torch.zeros(1, 3, size, size))[2].shape[-1])
    c = cnn.feature_dim
    (models / SLICE_MODEL / "config.pbtxt").write_text(slice_config(size, c, c, fmap))
    (models / SEQUENCE_MODEL / "config.pbtxt").write_text(sequence_config(c))
    np.savez(
        out_dir / "cam_head.npz",
        weight=cnn.head.weight.detach().numpy().astype(np.float32),
        bias=cnn.head.bias.detach().numpy().astype(np.float32),
    )
    return {
        "onnx_max_abs_diff": {"slice_cnn": err_cnn, "sequence": err_seq},
        "embedding_dim": c,
        "feature_channels": c,
        "feature_map_size": fmap,
        "cam_head": "cam_head.npz",
        "size_bytes": sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file()),
    }
