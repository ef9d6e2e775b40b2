"""Inference backends: ONNX Runtime in process and a real Triton server over gRPC, one interface."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.worker_support import build_small_repository
from triage_node.config import load_settings
from triage_node.peers import free_port
from worker.inference import BackendUnavailable, ModelMismatch, make_backend
from worker.inference.card import load_model_card
from worker.pipeline.inference_core import run_study


@pytest.fixture(scope="module")
def card_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_small_repository(tmp_path_factory.mktemp("model"), threshold=0.5)


def _settings(card_path: Path, **kw):  # type: ignore[no-untyped-def]
    return load_settings(data_dir=card_path.parent, model_repository=card_path.parent / "models",
                         model_card=card_path, inference_threads=1, **kw)


def test_onnx_backend_serves_what_the_card_describes(card_path: Path) -> None:
    card = load_model_card(card_path)
    with make_backend(_settings(card_path), card) as backend:
        out = backend.slice_fn(np.random.default_rng(0).random((5, 3, 64, 64), dtype=np.float32))
        assert out["logits"].shape == (5, 6)
        assert out["embedding"].shape == (5, card.embedding_dim)
        assert out["features"].shape == (5, card.feature_channels, card.feature_map_size, card.feature_map_size)
        seq = backend.sequence_fn(np.zeros((1, 7, card.embedding_dim + 6), np.float32))
        assert seq.shape == (1, 7, 6)


def test_triton_backend_matches_onnx_and_checks_the_server(card_path: Path, triton_server) -> None:  # type: ignore[no-untyped-def]
    card = load_model_card(card_path)
    server = triton_server(card_path.parent / "models")
    x = np.random.default_rng(1).random((9, 3, 64, 64), dtype=np.float32)
    with make_backend(_settings(card_path), card) as onnx, \
            make_backend(_settings(card_path, inference_backend="triton", triton_url=server.grpc_url), card) as triton:
        a, b = onnx.slice_fn(x), triton.slice_fn(x)
        for name in ("logits", "embedding", "features"):
            np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-5)
        pa = run_study(x, onnx.slice_fn, onnx.sequence_fn, card, batch_size=4)
        pb = run_study(x, triton.slice_fn, triton.sequence_fn, card, batch_size=4)
        np.testing.assert_allclose(pa.study_probs, pb.study_probs, atol=1e-5)
        assert pa.decision == pb.decision
    # the same server does not serve the models of another card
    wrong = card.model_copy(update={"feature_channels": 7})
    with pytest.raises(ModelMismatch, match=r"features FP32 \[-1, 7, 2, 2\], served features FP32 \[-1, 192, 2, 2\]"):
        make_backend(_settings(card_path, inference_backend="triton", triton_url=server.grpc_url), wrong)


def test_triton_backend_that_cannot_reach_the_server_is_unavailable(card_path: Path) -> None:
    settings = _settings(card_path, inference_backend="triton", triton_url=f"127.0.0.1:{free_port()}",
                         inference_timeout_s=2.0)
    with pytest.raises(BackendUnavailable, match="cannot be reached"):
        make_backend(settings, load_model_card(card_path))
