"""Datasets and training on real synthetic studies: RSNA-layout loader, training smoke, evaluation."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from triage_node import CLASSES
from triage_node.synth import write_dataset
from worker.inference.card import load_model_card
from worker.model.data import build_cache, index_dataset, patient_split, read_label_csv
from worker.model.evaluate import evaluate
from worker.model.train import TrainConfig, fit

torch.set_num_threads(2)


def _truth_by_study(studies_json):
    return {s["study_uid"]: s for s in json.loads(studies_json.read_text())}


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    write_dataset(out, 6, 5, positive_fraction=0.7, rows=256, components=("axial",))
    return out


def test_rsna_layout_loader(tmp_path):
    src = tmp_path / "src"
    write_dataset(src, 3, 9, positive_fraction=1.0, rows=256, profile="rsna", components=("axial",))
    root = tmp_path / "rsna"
    images = root / "stage_2_train"
    images.mkdir(parents=True)
    n = 0
    for f in src.rglob("*.dcm"):  # RSNA layout: one flat folder of ID_<sop>.dcm
        shutil.copy(f, images / f"ID_{n:05d}.dcm")
        n += 1
    shutil.copy(src / "labels.csv", root / "stage_2_train.csv")
    (images / "ID_broken.dcm").write_bytes(b"not a dicom file at all")
    idx = index_dataset(root, "rsna")
    assert idx.unreadable == 1
    assert len(idx.series) == 3
    assert sum(len(r.paths) for r in idx.series) == n
    truth = _truth_by_study(src / "studies.json")
    labels = read_label_csv(root / "stage_2_train.csv")
    cache = build_cache(idx, tmp_path / "cache", "mixed", 32)
    assert cache.inputs.shape == (n, 3, 32, 32) and cache.inputs.dtype == np.float16
    assert cache.meta["unreadable_files"] == 1
    study_y = cache.study_labels()
    for i, study_uid in enumerate(cache.study_uids):
        t = truth[study_uid]
        assert bool(study_y[i, 0]) == t["positive"]
        assert {c for k, c in enumerate(CLASSES[1:], 1) if study_y[i, k]} == set(t["subtypes"])
        # slices are in volume order, labels follow them by SOP Instance UID
        s = cache.series_slice(i)
        series = next(se for se in t["series"] if se["role"] == "axial")
        assert cache.labels[s].sum() == sum(int(labels[u].sum()) for u in series["sop_instance_uids"])
    # a second call reuses the cache
    again = build_cache(idx, tmp_path / "cache", "mixed", 32)
    np.testing.assert_array_equal(again.labels, cache.labels)


def test_patient_split_keeps_patients_together():
    class R:
        def __init__(self, k):
            self.patient_key = k

    recs = [R(f"p{i % 7}") for i in range(30)]
    train, val = patient_split(recs, 0.3, seed=1)
    assert sorted(train + val) == list(range(30))
    assert not {recs[i].patient_key for i in train} & {recs[i].patient_key for i in val}


def test_training_smoke_loss_falls_and_exports(synth_dir, tmp_path):
    cfg = TrainConfig(
        data=str(synth_dir), out=str(tmp_path / "run"), backbone="resnet-lite", size=64, epochs=4,
        batch_size=16, lr=3e-3, seq_epochs=3, seq_hidden=16, val_fraction=0.34, seed=0,
    )
    summary = fit(cfg)
    loss = summary["cnn_loss"]
    assert len(loss) == 4 and loss[-1] < loss[0]
    card = load_model_card(tmp_path / "run" / "triton")
    assert card.input_size == 64 and card.backbone == "resnet-lite"
    assert card.metrics["onnx_max_abs_diff"]["slice_cnn"] < 1e-4
    assert card.training["n_series"] == 6 and card.training["split"] == "patient-grouped"
    # resume: a finished run continues from its checkpoint without retraining
    again = fit(TrainConfig(**{**cfg.__dict__, "resume": True, "export_dir": str(tmp_path / "again")}))
    assert again["cnn_loss"] == loss
    # `triage-node export` re-exports the run's checkpoints with the same card
    import typer
    from typer.testing import CliRunner

    from worker.model.cli import register

    app = typer.Typer()
    register(app)
    args = ["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "re"), "--reselect-operating-points"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    # the run's config points at its latest export ("again"), whose card (and Device UID) is kept;
    # operating points chosen again on the same validation series come out the same
    before, after = load_model_card(tmp_path / "again"), load_model_card(tmp_path / "re")
    assert after.device_uid == before.device_uid
    for op in ("high_sensitivity", "balanced"):
        assert after.operating_points[op] == pytest.approx(before.operating_points[op], abs=1e-6)
    rep = evaluate(tmp_path / "run" / "triton", synth_dir, tmp_path / "report", n_boot=50, update_card=True)
    assert rep["n_studies"] == 6
    for f in ("report.md", "report.json", "study_roc.png", "study_pr.png"):
        assert (tmp_path / "report" / f).stat().st_size > 0
    assert "Not for clinical use" in (tmp_path / "report" / "report.md").read_text()
    assert load_model_card(tmp_path / "run" / "triton").metrics["test"]["n_studies"] == 6
