"""ONNX export parity, Triton layout, model card validation, and the backend-neutral study run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from triage_node import CLASSES
from worker.inference.card import ModelCard, ServedModel, load_model_card, write_model_card
from worker.model.export import TRITON_BATCHING, export_repository
from worker.model.networks import SequenceModel, SliceCNN
from worker.pipeline.inference_core import onnx_callables, run_study

torch.set_num_threads(2)
SIZE = 64


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    cnn = SliceCNN("resnet-lite").eval()
    seq = SequenceModel(cnn.feature_dim, hidden=16).eval()
    with torch.no_grad():  # non-trivial weights so parity is not checked on zeros
        cnn.head.weight.normal_(0, 1.0)
        seq.head[1].weight.normal_(0, 0.5)
    out = tmp_path_factory.mktemp("triton")
    info = export_repository(cnn, seq, SIZE, out)
    card = ModelCard(
        name="test", version="0", device_uid="1.2.3.4", created_utc="2026-01-01T00:00:00+00:00", classes=CLASSES,
        backbone="resnet-lite", input_variant="windows", input_size=SIZE,
        windows={"brain": (40, 80), "subdural": (80, 200), "bone": (600, 2800)},
        channel_plan=((0, "brain"), (0, "subdural"), (0, "bone")),
        embedding_dim=info["embedding_dim"], feature_channels=info["feature_channels"], feature_map_size=info["feature_map_size"],
        triton_batching=TRITON_BATCHING,
        slice_model=ServedModel(name="ich_slice_cnn", input="image", outputs=("logits", "embedding", "features")),
        sequence_model=ServedModel(name="ich_sequence", input="sequence", outputs=("logits",)),
        operating_points={op: {c: 0.5 for c in CLASSES} for op in ("high_sensitivity", "balanced")},
        cam_head=info["cam_head"],
    )
    write_model_card(card, out / "model_card.json")
    return cnn, seq, out, info


def test_onnx_parity_and_triton_layout(exported):
    cnn, _, out, info = exported
    assert info["onnx_max_abs_diff"]["slice_cnn"] < 1e-4 and info["onnx_max_abs_diff"]["sequence"] < 1e-4
    for name in ("ich_slice_cnn", "ich_sequence"):
        assert (out / "models" / name / "1" / "model.onnx").is_file()
        cfg = (out / "models" / name / "config.pbtxt").read_text()
        assert f'name: "{name}"' in cfg and 'backend: "onnxruntime"' in cfg and "max_batch_size: 0" in cfg
    cfg = (out / "models" / "ich_slice_cnn" / "config.pbtxt").read_text()
    assert f"dims: [ -1, 3, {SIZE}, {SIZE} ]" in cfg
    assert f"dims: [ -1, {cnn.feature_dim}, {info['feature_map_size']}, {info['feature_map_size']} ]" in cfg
    seq_cfg = (out / "models" / "ich_sequence" / "config.pbtxt").read_text()
    assert f"dims: [ -1, -1, {cnn.feature_dim + 6} ]" in seq_cfg


def test_run_study_same_on_onnx_and_pytorch(exported):
    cnn, seq, out, _ = exported
    card = load_model_card(out)
    assert card.path == out / "model_card.json"
    x = np.random.default_rng(0).random((11, 3, SIZE, SIZE), dtype=np.float32)  # not a multiple of the batch

    def torch_slice(b):
        with torch.no_grad():
            lo, em, fe = cnn(torch.from_numpy(b))
        return {"logits": lo.numpy(), "embedding": em.numpy(), "features": fe.numpy()}

    def torch_seq(s):
        with torch.no_grad():
            return seq(torch.from_numpy(s)).numpy()

    ref = run_study(x, torch_slice, torch_seq, card)
    got = run_study(x, *onnx_callables(str(out)), card, batch_size=4)
    assert got.slice_probs.shape == (11, 6) and got.features.shape[0] == 11
    np.testing.assert_allclose(got.slice_probs, ref.slice_probs, atol=1e-4)
    np.testing.assert_allclose(got.study_probs, got.slice_probs.max(0))
    np.testing.assert_allclose(got.cnn_study_probs, got.cnn_slice_probs.max(0))
    assert got.decision == {c: bool(got.study_probs[k] >= 0.5) for k, c in enumerate(CLASSES)}
    w, b = card.head_weights()
    np.testing.assert_allclose(w, cnn.head.weight.detach().numpy())
    # the served embedding and the CAM head reproduce the logits (what explain.cam relies on)
    out_ = torch_slice(x[:2])
    np.testing.assert_allclose(out_["embedding"] @ w.T + b, out_["logits"], atol=1e-4)
    with pytest.raises(ValueError):
        run_study(x[:, :, :10, :10], torch_slice, torch_seq, card)


def test_model_card_rejects_bad_content(exported, tmp_path):
    _, _, out, _ = exported
    data = json.loads((out / "model_card.json").read_text())
    for change in (
        {"classes": list(reversed(CLASSES))},
        {"intended_use": "diagnose patients"},
        {"operating_points": {"balanced": {c: 0.5 for c in CLASSES}}},
        {"operating_points": {"balanced": {c: 0.5 for c in CLASSES}, "high_sensitivity": {"any": 1.5}}},
        {"extra_field": 1},
    ):
        bad = tmp_path / "model_card.json"
        bad.write_text(json.dumps({**data, **change}))
        with pytest.raises(ValueError):
            load_model_card(bad)
