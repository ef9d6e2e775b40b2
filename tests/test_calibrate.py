"""Site calibration (``triage-node calibrate``): threshold choice, refusals, the site file at
serving, the SR parameter, and the command end to end on synthetic studies."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from tests.test_sr import make_ct_series, make_prediction, make_report
from tests.worklist_factory import migrated_database
from triage_node import CLASSES
from triage_node.cli import build_app
from triage_node.config import DEFAULT_MODEL_CARD
from triage_node.db.models import AuditEvent
from triage_node.peers import dciodvfy
from triage_node.synth import write_dataset
from worker.inference.card import load_model_card
from worker.inference.site import SITE_FILE, Sample, SiteCalibrationError
from worker.model.calibrate import (
    CalibrationRefused,
    choose_thresholds,
    min_positives_for,
    site_thresholds,
    target_sensitivity_point,
    write_site_file,
)
from worker.pipeline.sr import algorithm_identification

SHIPPED = DEFAULT_MODEL_CARD.parent
# any: 10 positives, 10 negatives; one negative (0.58) scores above most positives
NEGATIVES = [0.05, 0.1, 0.15, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.58]
POSITIVES = [0.2, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]
CARD_THRESHOLDS = {"high_sensitivity": np.full(6, 0.11), "balanced": np.full(6, 0.66)}


def _sample(positives=POSITIVES, negatives=NEGATIVES, subtype_positives: int = 2):
    """[n, 6] labels and scores: ``any`` and ``subdural`` from the two lists, the other
    subtypes with ``subtype_positives`` positives among the ``any`` positives."""
    n_pos, n = len(positives), len(positives) + len(negatives)
    y = np.zeros((n, 6), dtype=np.uint8)
    p = np.tile(np.r_[positives, negatives][:, None], (1, 6))
    y[:n_pos, 0] = y[:n_pos, 5] = 1
    y[:subtype_positives, 1:5] = 1
    return y, p


def test_minimum_positives_follow_from_the_target():
    assert [min_positives_for(t) for t in (0.8, 0.9, 0.95)] == [5, 10, 20]
    with pytest.raises(ValueError):
        min_positives_for(1.0)


def test_target_point_keeps_the_best_specificity_at_its_lowest_threshold():
    y = np.r_[np.ones(10), np.zeros(10)]
    point = target_sensitivity_point(y, np.r_[POSITIVES, NEGATIVES], 0.90)
    assert (point.threshold, point.sensitivity, point.specificity) == (0.55, 0.9, 0.9)
    point = target_sensitivity_point(y, np.r_[POSITIVES, NEGATIVES], 0.95)
    assert (point.threshold, point.sensitivity, point.specificity) == (0.2, 1.0, 0.3)
    # 0.52 and 0.55 give the same specificity: the lower one catches the tenth positive too
    lifted = [0.52, *POSITIVES[1:]]
    point = target_sensitivity_point(y, np.r_[lifted, NEGATIVES], 0.90)
    assert (point.threshold, point.sensitivity, point.specificity) == (0.52, 1.0, 0.9)


def test_thresholds_chosen_per_class_and_rare_subtypes_keep_the_card_threshold():
    y, p = _sample()
    got = choose_thresholds(y, p, CARD_THRESHOLDS, target_sensitivity=0.95, min_positives=10)
    ops = got["operating_points"]
    assert ops["high_sensitivity"]["any"] == 0.2 and ops["balanced"]["any"] == 0.55
    assert ops["high_sensitivity"]["subdural"] == 0.2 and ops["balanced"]["subdural"] == 0.55
    # two positives are too few: the card's thresholds stay, and the file says why
    assert set(got["kept_card_threshold"]) == {"epidural", "intraparenchymal", "intraventricular", "subarachnoid"}
    assert "2 positive and 18 negative" in got["kept_card_threshold"]["epidural"]
    for c in ("epidural", "subarachnoid"):
        assert ops["high_sensitivity"][c] == 0.11 and ops["balanced"][c] == 0.66
        assert got["results"]["balanced"][c]["source"] == "model card"
    r = got["results"]["balanced"]["any"]
    assert (r["source"], r["n_pos"], r["n_neg"], r["tp"], r["fp"]) == ("site", 10, 10, 9, 1)
    assert r["sensitivity"] == 0.9 and r["sensitivity_ci95"][0] == pytest.approx(0.555, abs=1e-3)
    assert r["specificity"] == 0.9 and r["specificity_ci95"][1] == pytest.approx(0.997, abs=1e-3)


def test_sample_too_small_for_any_is_refused_with_what_to_add():
    y, p = _sample(positives=POSITIVES[1:])
    with pytest.raises(CalibrationRefused) as info:
        choose_thresholds(y, p, CARD_THRESHOLDS)
    text = str(info.value)
    assert "9 studies positive for 'any' and 10 negative" in text
    assert "at least 10 positives and 10 negatives" in text and "Add at least 1 positive and 0 negative" in text
    assert info.value.n_studies == 19
    with pytest.raises(CalibrationRefused, match="at least 10 positives and 12 negatives"):
        choose_thresholds(*_sample(), CARD_THRESHOLDS, min_negatives=12)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """The shipped card in a folder of its own (never written into deploy/)."""
    out = tmp_path / "model"
    out.mkdir()
    for name in ("model_card.json", "cam_head.npz"):
        shutil.copy(SHIPPED / name, out / name)
    return out


def _write_site(model_dir: Path, **card_update):
    card = load_model_card(model_dir).model_copy(update=card_update)
    chosen = choose_thresholds(*_sample(), card_thresholds=CARD_THRESHOLDS)
    site = site_thresholds(card, chosen, Sample(data="/site/sample", format="synth", n_studies=20,
                                                failed_series=0, unreadable_files=0), 0.9)
    write_site_file(site, model_dir / SITE_FILE)
    return site


def test_site_file_beside_the_card_sets_the_served_thresholds(model_dir: Path):
    card_text = (model_dir / "model_card.json").read_text()
    before = load_model_card(model_dir)
    assert before.threshold_source == "model card" and before.site is None
    site = _write_site(model_dir)
    after = load_model_card(model_dir / "model_card.json")
    assert after.threshold_source == f"site calibration {site.digest} ({site.calibrated_utc[:10]})"
    np.testing.assert_array_equal(after.thresholds("high_sensitivity"), [0.55, 0.11, 0.11, 0.11, 0.11, 0.55])
    np.testing.assert_array_equal(after.thresholds("balanced"), [0.55, 0.66, 0.66, 0.66, 0.66, 0.55])
    assert after.operating_points == before.operating_points  # the card itself is unchanged
    assert (model_dir / "model_card.json").read_text() == card_text
    assert "site" not in after.model_dump(mode="json")


def test_site_file_for_other_weights_or_edited_by_hand_is_refused(model_dir: Path):
    _write_site(model_dir, device_uid="1.2.826.0.1.3680043.8.498.1")
    with pytest.raises(SiteCalibrationError, match=r"calibrated for model .* \(Device UID 1\.2\.826\.0\.1\.3680043\.8\.498\.1\)"):
        load_model_card(model_dir)
    (model_dir / SITE_FILE).unlink()
    _write_site(model_dir)
    data = json.loads((model_dir / SITE_FILE).read_text())
    data["operating_points"]["balanced"]["any"] = 0.3
    (model_dir / SITE_FILE).write_text(json.dumps(data))
    with pytest.raises(SiteCalibrationError, match="does not match the thresholds"):
        load_model_card(model_dir)


def test_sr_names_the_source_of_the_thresholds(model_dir: Path, tmp_path: Path):
    def parameters(card):
        item = algorithm_identification(card, "balanced")
        return [i.TextValue for i in item if i.ConceptNameCodeSequence[0].CodeValue == "111002"]

    assert parameters(load_model_card(model_dir)) == ["operating_point=balanced", "thresholds=model-card"]
    site = _write_site(model_dir)
    card = load_model_card(model_dir)
    assert parameters(card) == ["operating_point=balanced", f"thresholds=site:{site.digest}"]
    series = make_ct_series()
    sr, _, _ = make_report(series, make_prediction(len(series)), card=card)
    sr.save_as(tmp_path / "sr.dcm")
    ds = pydicom.dcmread(tmp_path / "sr.dcm")
    assert f"thresholds=site:{site.digest}".encode() in ds.to_json().encode()
    result = dciodvfy(tmp_path / "sr.dcm")
    assert result.ok, result.output


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def site_sample(tmp_path_factory) -> Path:
    """12 labelled synthetic studies (6 positive for any, 6 negative), axial series only."""
    out = tmp_path_factory.mktemp("site-sample")
    truths = write_dataset(out, 12, 12, positive_fraction=0.5, rows=256, components=("axial",))
    assert sum(t.positive for t in truths) == 6
    return out


@pytest.fixture
def node(tmp_path: Path, model_dir: Path, monkeypatch):
    for key in ("TRIAGE_DATABASE_URL", "TRIAGE_DATA_DIR"):
        monkeypatch.delenv(key, raising=False)
    for name in ("models", "models-gpu"):
        shutil.copytree(SHIPPED / name, model_dir / name)
    db = next(migrated_database(f"sqlite:///{tmp_path / 'triage.db'}"))

    def events():
        with db.factory() as session:
            return [(e.action, e.outcome, e.detail) for e in session.scalars(select(AuditEvent).order_by(AuditEvent.id))]

    return tmp_path, model_dir, events


def _calibrate(data_dir: Path, model_dir: Path, sample: Path, *extra: str):
    args = ["calibrate", "--model", str(model_dir), "--data", str(sample), "--format", "synth",
            "--data-dir", str(data_dir), *extra]
    return CliRunner().invoke(build_app(), args)


def test_calibrate_command_refuses_a_small_sample_and_writes_a_site_file_for_an_adequate_one(site_sample, node):
    data_dir, model_dir, events = node
    result = _calibrate(data_dir, model_dir, site_sample)
    assert result.exit_code == 1, result.output
    assert "calibration refused, no site file written" in result.output
    assert "6 studies positive for 'any' and 6 negative" in result.output
    assert not (model_dir / SITE_FILE).exists()
    [(action, outcome, detail)] = events()
    assert (action, outcome, detail["n_studies"]) == ("model.calibration_refused", "refused", 12)
    assert detail["device_uid"] == load_model_card(model_dir).device_uid

    result = _calibrate(data_dir, model_dir, site_sample, "--min-positives", "3", "--min-negatives", "3")
    assert result.exit_code == 0, result.output
    site = json.loads((model_dir / SITE_FILE).read_text())
    card = load_model_card(model_dir)
    assert (site["device_uid"], site["model_version"]) == (card.device_uid, card.version)
    assert site["sample"]["n_studies"] == 12 and site["sample"]["format"] == "synth"
    assert site["results"]["high_sensitivity"]["any"]["sensitivity"] >= 0.9
    assert card.threshold_source.startswith(f"site calibration {site['digest']}")
    assert set(site["kept_card_threshold"]) < set(CLASSES[1:])
    for c in site["kept_card_threshold"]:
        assert card.thresholds("balanced")[CLASSES.index(c)] == card.operating_points["balanced"][c]
    assert f"digest {site['digest']}" in result.output and "sensitivity [95% CI]" in result.output
    action, outcome, detail = events()[-1]
    assert (action, outcome, detail["digest"], detail["n_studies"]) == ("model.calibrated", "ok", site["digest"], 12)
    assert detail["site_file"] == str((model_dir / SITE_FILE).resolve())

    # new weights in the folder, the old site file still there: refused before any inference
    card_data = json.loads((model_dir / "model_card.json").read_text())
    (model_dir / "model_card.json").write_text(json.dumps({**card_data, "device_uid": "1.2.3.4"}))
    result = _calibrate(data_dir, model_dir, site_sample, "--min-positives", "3", "--min-negatives", "3")
    assert result.exit_code == 1 and "Move it aside" in result.output
    assert json.loads((model_dir / SITE_FILE).read_text()) == site
    assert events()[-1][:2] == ("model.calibration_refused", "refused")
