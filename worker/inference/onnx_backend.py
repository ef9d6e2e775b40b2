"""In-process inference with ONNX Runtime on the files of the Triton model repository.

The repository has Triton's layout (``<repo>/<model>/<version>/model.onnx``), so the
same files serve both backends. The highest numeric version folder wins, as with
Triton's default version policy (``latest: 1``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from triage_node.logs import get_logger
from worker.inference.base import (
    SEQUENCE_INPUT,
    SEQUENCE_MODEL,
    SLICE_INPUT,
    SLICE_MODEL,
    SLICE_OUTPUTS,
    InferenceBackend,
    InferenceError,
    SliceOutputs,
    TensorSpec,
)

log = get_logger(__name__)

#: ONNX Runtime type strings -> Triton datatype names.
_ORT_TYPES = {
    "tensor(float)": "FP32",
    "tensor(float16)": "FP16",
    "tensor(double)": "FP64",
    "tensor(int64)": "INT64",
    "tensor(int32)": "INT32",
    "tensor(uint8)": "UINT8",
}


def model_file(repository: Path, model: str, filename: str = "model.onnx") -> Path:
    """The ONNX file of ``model``: ``<repository>/<model>/<highest version>/<filename>``.

    Raises
    ------
    InferenceError
        When the model folder or the file is missing (names the path looked at).
    """
    folder = Path(repository) / model
    versions = sorted(
        (p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)
    ) if folder.is_dir() else []
    for version in reversed(versions):
        candidate = version / filename
        if candidate.is_file():
            return candidate
    raise InferenceError(f"no {filename} for model {model!r} under {folder} (numeric version folders)")


def _dim(d: object) -> int:
    return int(d) if isinstance(d, int) else -1


class OnnxBackend(InferenceBackend):
    """ONNX Runtime ``InferenceSession`` per model, CPU execution provider.

    Parameters
    ----------
    repository : Path
        Triton-layout model repository (``settings.model_repository``).
    threads : int
        ``intra_op_num_threads`` of each session (the worker shares 2 cores with the
        listener; 1-2 is right there).
    """

    name = "onnx"

    def __init__(self, repository: Path, threads: int = 2) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, int(threads))
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.repository = Path(repository)
        self.files = {m: model_file(self.repository, m) for m in (SLICE_MODEL, SEQUENCE_MODEL)}
        self.sessions = {
            m: ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
            for m, path in self.files.items()
        }
        log.info("onnx_backend_ready", repository=str(self.repository), threads=opts.intra_op_num_threads)

    def served_specs(self) -> dict[str, dict[str, list[TensorSpec]]]:
        out: dict[str, dict[str, list[TensorSpec]]] = {}
        for model, sess in self.sessions.items():
            out[model] = {
                kind: [
                    TensorSpec(t.name, _ORT_TYPES.get(t.type, t.type), tuple(_dim(d) for d in t.shape))
                    for t in tensors
                ]
                for kind, tensors in (("inputs", sess.get_inputs()), ("outputs", sess.get_outputs()))
            }
        return out

    def slice_fn(self, batch: np.ndarray) -> SliceOutputs:
        sess = self.sessions[SLICE_MODEL]
        outs = sess.run(list(SLICE_OUTPUTS), {SLICE_INPUT: np.ascontiguousarray(batch, dtype=np.float32)})
        return dict(zip(SLICE_OUTPUTS, outs, strict=True))

    def sequence_fn(self, seq: np.ndarray) -> np.ndarray:
        sess = self.sessions[SEQUENCE_MODEL]
        (logits,) = sess.run(["logits"], {SEQUENCE_INPUT: np.ascontiguousarray(seq, dtype=np.float32)})
        return logits

    def close(self) -> None:
        self.sessions.clear()
