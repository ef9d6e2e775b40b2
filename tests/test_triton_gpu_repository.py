"""The GPU variant of the Triton repository (``deploy/triton/models-gpu``).

It serves the same ONNX files as ``deploy/triton/models`` with ``max_batch_size > 0`` and
dynamic batching for the slice CNN. `triage-node triton check` validates it against the
model card; the local Triton server (Python-backend twin, on CPU) serves it with the same
``max_batch_size``, and the worker's `TritonBackend` passes its model-card check against it
and returns what ONNX Runtime returns in-process.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from triage_node.config import DEFAULT_MODEL_CARD, DEFAULT_MODEL_REPOSITORY
from worker.inference.base import InferenceError
from worker.inference.card import load_model_card
from worker.inference.triton_check import check_repository
from worker.inference.triton_repository import build_python_repository, read_model_config

GPU_REPOSITORY = DEFAULT_MODEL_REPOSITORY.parent / "models-gpu"


def test_gpu_repository_passes_triton_check_and_links_the_shipped_onnx() -> None:
    report = check_repository(GPU_REPOSITORY, load_model_card(DEFAULT_MODEL_CARD))
    assert report.ok, report.problems
    assert sorted(report.models) == ["ich_sequence", "ich_slice_cnn"]
    for model in report.models:
        link = GPU_REPOSITORY / model / "1" / "model.onnx"
        assert link.is_symlink() and not Path(link.readlink()).is_absolute()  # works in any checkout
        assert link.resolve() == (DEFAULT_MODEL_REPOSITORY / model / "1" / "model.onnx").resolve()


def test_gpu_configs_batch_the_cnn_on_gpu_and_leave_the_sequence_model_unbatched() -> None:
    cnn = read_model_config(GPU_REPOSITORY / "ich_slice_cnn" / "config.pbtxt")
    seq = read_model_config(GPU_REPOSITORY / "ich_sequence" / "config.pbtxt")
    assert cnn.backend == seq.backend == "onnxruntime"
    assert cnn.max_batch_size >= 8  # the worker sends batches of 8 slices
    assert list(cnn.input[0].dims) == [3, 128, 128]  # no batch dimension
    assert cnn.HasField("dynamic_batching")
    assert all(0 < b <= cnn.max_batch_size for b in cnn.dynamic_batching.preferred_batch_size)
    assert cnn.dynamic_batching.max_queue_delay_microseconds > 0
    assert seq.max_batch_size == 0
    for config in (cnn, seq):
        assert [g.kind for g in config.instance_group] == [config.instance_group[0].KIND_GPU]


def test_commented_tensorrt_block_parses_when_enabled(tmp_path: Path) -> None:
    text = (GPU_REPOSITORY / "ich_slice_cnn" / "config.pbtxt").read_text()
    block = text[text.index("# optimization {"):]
    enabled = re.sub(r"^# ?", "", block, flags=re.MULTILINE)
    path = tmp_path / "config.pbtxt"
    path.write_text(text + "\n" + enabled)
    config = read_model_config(path)
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt"
    assert accelerator.parameters["precision_mode"] == "FP16"


def test_python_twin_keeps_max_batch_size_and_dynamic_batching(tmp_path: Path) -> None:
    build_python_repository(GPU_REPOSITORY, tmp_path / "twin")
    twin = read_model_config(tmp_path / "twin" / "ich_slice_cnn" / "config.pbtxt")
    original = read_model_config(GPU_REPOSITORY / "ich_slice_cnn" / "config.pbtxt")
    assert twin.backend == "python" and twin.max_batch_size == original.max_batch_size
    assert twin.dynamic_batching == original.dynamic_batching
    assert list(twin.input[0].dims) == [3, 128, 128]


@pytest.mark.timeout(120)
def test_triton_backend_on_the_gpu_repository_matches_onnxruntime(triton_server) -> None:
    from worker.inference.triton_backend import TritonBackend

    server = triton_server(GPU_REPOSITORY, threads=1)
    card = load_model_card(DEFAULT_MODEL_CARD)
    backend = TritonBackend(server.grpc_url, timeout=30)
    try:
        backend.check(card)  # metadata shapes [-1, 3, S, S] etc. match the card
        size = card.input_size
        specs = backend.served_specs()["ich_slice_cnn"]["inputs"]
        assert [s.shape for s in specs] == [(-1, 3, size, size)]

        rng = np.random.default_rng(3)
        batches = [rng.standard_normal((n, 3, size, size)).astype(np.float32) for n in (8, 8, 5, 1)]
        with ThreadPoolExecutor(4) as pool:  # concurrent requests, as several workers send them
            got = list(pool.map(backend.slice_fn, batches))
        sequence = rng.standard_normal((1, 9, card.embedding_dim + 6)).astype(np.float32)
        seq_logits = backend.sequence_fn(sequence)

        with pytest.raises(InferenceError):  # the server enforces max_batch_size
            backend.slice_fn(np.zeros((65, 3, size, size), np.float32))
    finally:
        backend.close()

    cnn = ort.InferenceSession(str(GPU_REPOSITORY / "ich_slice_cnn" / "1" / "model.onnx"),
                               providers=["CPUExecutionProvider"])
    for batch, out in zip(batches, got, strict=True):
        logits, embedding = cnn.run(["logits", "embedding"], {"image": batch})
        assert out["logits"].shape == (batch.shape[0], 6)
        np.testing.assert_allclose(out["logits"], logits, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(out["embedding"], embedding, rtol=1e-4, atol=1e-4)
    seq = ort.InferenceSession(str(GPU_REPOSITORY / "ich_sequence" / "1" / "model.onnx"),
                               providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(seq_logits, seq.run(["logits"], {"sequence": sequence})[0], rtol=1e-4, atol=1e-4)
