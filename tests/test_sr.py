"""DICOM SR writer (TID 1500): write/read round trip and dciodvfy."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from triage_node import CLASSES
from triage_node.peers import dciodvfy
from triage_node.synth.ct_series import ct_slice_dataset
from worker.pipeline.inference_core import StudyPrediction
from worker.pipeline.overlay import build_overlays, overlay_keys, select_key_slices
from worker.pipeline.sr import ReportError, build_sr
from worker.pipeline.sr_codes import CODES, summary

SYNTHETIC_USE = (
    "Intended use: pipeline verification only. Trained on synthetic phantoms, not on patient "
    "images. Not for clinical use."
)


@dataclass(frozen=True)
class Card:
    """The fields of worker.inference.card.ModelCard that the writers read."""

    name: str = "ich-effnet-b0"
    version: str = "0.3.1"
    device_uid: str = "1.2.826.0.1.3680043.8.498.4242"
    intended_use: str = SYNTHETIC_USE


def make_ct_series(n: int = 8, size: int = 64, deidentified: bool = False, rows: int | None = None) -> list[Dataset]:
    """Axial CT slices as a scanner would send them (``deidentified``: no PatientName etc.,
    SOPClassUID only in the file meta), with a bright blob on slices 3-4."""
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    rows = rows or size
    out = []
    for z in range(n):
        img = np.full((rows, size), 1024 + 35, dtype=np.int16)
        if z in (3, 4):
            img[rows // 3 : rows // 2, size // 4 : size // 2] = 1024 + 75
        ds = ct_slice_dataset(img, study_uid=study, series_uid=series, frame_uid=frame, instance_number=z + 1,
                              position=[-64.0, -64.0, 5.0 * z])
        ds.SeriesNumber = 2
        if deidentified:
            del ds.SOPClassUID
        else:
            ds.PatientName = "DOE^JANE"
            ds.PatientID = "PID0001234"
            ds.PatientBirthDate = "19600101"
            ds.PatientSex = "F"
            ds.StudyDate = "20260105"
            ds.StudyTime = "101500"
            ds.AccessionNumber = "ACC42"
            ds.ReferringPhysicianName = "WHO^DR"
            ds.StudyID = "7"
        out.append(ds)
    return out


def hu_volume(series: list[Dataset]) -> np.ndarray:
    return np.stack(
        [
            np.frombuffer(ds.PixelData, dtype=np.int16).reshape(ds.Rows, ds.Columns).astype(np.float32)
            + float(ds.RescaleIntercept)
            for ds in series
        ]
    )


def make_prediction(n: int, positive: tuple[str, ...] = ("any", "subdural"), seed: int = 0) -> StudyPrediction:
    rng = np.random.default_rng(seed)
    slice_probs = rng.uniform(0.01, 0.2, size=(n, len(CLASSES)))
    for name in positive:
        c = CLASSES.index(name)
        slice_probs[3, c], slice_probs[4, c] = 0.93, 0.81
    study = slice_probs.max(axis=0)
    thresholds = np.full(len(CLASSES), 0.4)
    decision = {c: bool(study[k] >= thresholds[k]) for k, c in enumerate(CLASSES)}
    return StudyPrediction(
        slice_probs=slice_probs,
        cnn_slice_probs=slice_probs,
        study_probs=study,
        cnn_study_probs=study,
        features=np.zeros((n, 4, 2, 2), dtype=np.float32),
        thresholds=thresholds,
        decision=decision,
        key_slices={c: int(np.argmax(slice_probs[:, k])) for k, c in enumerate(CLASSES)},
        operating_point="high_sensitivity",
    )


def make_report(series, prediction, card=Card(), k=2):
    keys = select_key_slices(prediction.slice_probs, prediction.decision, k)
    yy, xx = np.mgrid[0:32, 0:32]
    heat = np.exp(-((yy - 12) ** 2 + (xx - 12) ** 2) / 40.0)
    heatmaps = {key: heat for key in overlay_keys(keys)}
    overlays = build_overlays(series, hu_volume(series), prediction, card, keys, heatmaps)
    sr = build_sr(series, prediction, card, overlays, keys)
    return sr, overlays, keys


def _concepts(ds: Dataset):
    """Every (value type, concept name code, item) in an SR content tree."""
    for item in ds.get("ContentSequence", []):
        yield item.ValueType, item.ConceptNameCodeSequence[0].CodeValue, item
        yield from _concepts(item)


def test_sr_round_trip_carries_findings_probabilities_and_references(tmp_path: Path):
    series = make_ct_series()
    prediction = make_prediction(len(series))
    sr, overlays, keys = make_report(series, prediction)
    path = tmp_path / "sr.dcm"
    sr.save_as(path)
    ds = pydicom.dcmread(path)

    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert ds.Modality == "SR"
    assert ds.StudyInstanceUID == series[0].StudyInstanceUID
    assert ds.SeriesInstanceUID not in {series[0].SeriesInstanceUID, overlays[0].SeriesInstanceUID}
    assert ds.VerificationFlag == "UNVERIFIED"
    assert ds.CompletionFlag == "COMPLETE"
    assert ds.PatientID == "PID0001234"

    # Template 1500, procedure reported = CT head, not the algorithm.
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    procedure = [i for vt, code, i in _concepts(ds) if code == "121058"]
    assert procedure[0].ConceptCodeSequence[0].CodeValue == "24725-4"

    # Contributing equipment names the algorithm; the card's Device UID is in General Equipment.
    assert ds.DeviceUID == Card.device_uid
    equipment = [e for e in ds.ContributingEquipmentSequence if e.get("ManufacturerModelName") == Card.name]
    assert equipment[0].ManufacturerModelName == Card.name
    assert Card.version in equipment[0].SoftwareVersions

    # TID 4019 algorithm name and version.
    texts = {code: i.TextValue for vt, code, i in _concepts(ds) if vt == "TEXT"}
    assert texts["111001"] == Card.name and texts["111003"] == Card.version
    # Algorithm Parameters (111002): the operating point and where its thresholds came from.
    parameters = {i.TextValue for vt, code, i in _concepts(ds) if vt == "TEXT" and code == "111002"}
    assert parameters == {"operating_point=high_sensitivity", "thresholds=model-card"}

    # One finding per class: present/absent at the operating point, probability as NUM.
    found = summary(ds)
    assert set(found) == set(CLASSES)
    for k, name in enumerate(CLASSES):
        assert found[name]["present"] is prediction.decision[name]
        assert found[name]["probability"] == pytest.approx(prediction.study_probs[k], abs=1e-6)
    assert found["subdural"]["present"] and not found["epidural"]["present"]

    # Key slices (Source of Measurement) and overlays (Best illustration) are referenced,
    # and listed as evidence of the same study.
    images = [i for vt, code, i in _concepts(ds) if vt == "IMAGE"]
    referenced = {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in images}
    key_uids = {series[i].SOPInstanceUID for v in keys.values() for i in v}
    assert key_uids <= referenced
    assert {o.SOPInstanceUID for o in overlays} <= referenced
    evidence = {
        sop.ReferencedSOPInstanceUID
        for study in ds.CurrentRequestedProcedureEvidenceSequence
        for ser in study.ReferencedSeriesSequence
        for sop in ser.ReferencedSOPSequence
    }
    assert key_uids | {o.SOPInstanceUID for o in overlays} <= evidence

    # The synthetic-weights notice is in the report.
    assert any("synthetic phantoms" in t for t in texts.values())
    assert hd.sr.Comprehensive3DSR.from_dataset(ds).VerificationFlag == "UNVERIFIED"


def test_sr_passes_dciodvfy(tmp_path: Path):
    series = make_ct_series()
    sr, _, _ = make_report(series, make_prediction(len(series)))
    path = tmp_path / "sr.dcm"
    sr.save_as(path)
    result = dciodvfy(path)
    assert result.ok, result.output


def test_deidentified_source_without_patient_name_or_sop_class(tmp_path: Path):
    series = make_ct_series(deidentified=True)
    assert "PatientName" not in series[0] and "SOPClassUID" not in series[0]
    sr, overlays, _ = make_report(series, make_prediction(len(series)))
    path = tmp_path / "sr.dcm"
    sr.save_as(path)
    ds = pydicom.dcmread(path)
    assert ds.PatientName == "" and ds.PatientID in ("", None)
    assert "PatientName" not in series[0], "the source headers must not be modified"
    assert dciodvfy(path).ok, dciodvfy(path).output
    overlays[0].save_as(tmp_path / "sc.dcm")
    assert dciodvfy(tmp_path / "sc.dcm").ok


def test_negative_study_reports_every_class_absent_and_no_synthetic_text_for_other_cards(tmp_path):
    series = make_ct_series()
    prediction = make_prediction(len(series), positive=())
    card = Card(intended_use="Research use only. Not for clinical use.")
    sr, overlays, keys = make_report(series, prediction, card=card)
    assert keys == {"any": [int(np.argmax(prediction.slice_probs[:, 0]))]}
    assert len(overlays) == 1
    found = summary(sr)
    assert not any(v["present"] for v in found.values())
    texts = [i.TextValue for vt, _, i in _concepts(sr) if vt == "TEXT"]
    assert not any("synthetic" in t for t in texts)


def test_codes_table_covers_every_class_with_a_known_scheme():
    assert tuple(CODES) == CLASSES
    for code in CODES.values():
        assert code.finding.scheme_designator in {"SCT", "99ICHTRIAGE"}


def test_inconsistent_inputs_are_refused():
    series = make_ct_series(n=4)
    prediction = make_prediction(4, positive=())
    with pytest.raises(ReportError, match="outside"):
        build_sr(series, prediction, Card(), [], {"any": [9]})
    other = make_ct_series(n=1)
    with pytest.raises(ReportError, match="studies"):
        build_sr(series + other, make_prediction(5, positive=()), Card(), [], {"any": [0]})
    with pytest.raises(ReportError, match="no source"):
        build_sr([], prediction, Card(), [], {})


def test_writers_never_log_patient_identifiers():
    from structlog.testing import capture_logs

    series = make_ct_series()
    with capture_logs() as logs:
        make_report(series, make_prediction(len(series)))
    assert logs, "the writers log what they built"
    text = repr(logs)
    for phi in ("DOE^JANE", "PID0001234", "19600101", "ACC42"):
        assert phi not in text


def labels_as_probabilities(labels_csv: Path, sop_uids) -> np.ndarray:
    """Per-slice 'probabilities' from the synthetic ground truth (0.05 / 0.95)."""
    import csv

    truth = {}
    with open(labels_csv) as f:
        for row in csv.DictReader(f):
            _, sop, cls = row["ID"].split("_")
            truth[(sop, cls)] = int(row["Label"])
    return np.array(
        [[0.95 if truth.get((sop, c), 0) else 0.05 for c in CLASSES] for sop in sop_uids]
    )


def test_report_of_a_synthetic_deidentified_jpeg_lossless_study(tmp_path: Path):
    from triage_node.synth import write_dataset
    from worker.pipeline.preprocess import load_series

    truth = write_dataset(
        tmp_path / "study", studies=1, seed=3, positive_fraction=1.0, rows=256,
        components=("axial",), profile="rsna", transfer_syntax="jpeg-lossless",
    )[0]
    files = sorted((tmp_path / "study" / truth.study_uid).rglob("*.dcm"))
    assert "PatientName" not in pydicom.dcmread(files[0], stop_before_pixels=True)
    volume = load_series(files)
    probs = labels_as_probabilities(tmp_path / "study" / "labels.csv", volume.sop_uids)
    prediction = make_prediction(len(files), positive=())
    prediction = StudyPrediction(
        slice_probs=probs, cnn_slice_probs=probs, study_probs=probs.max(axis=0),
        cnn_study_probs=probs.max(axis=0), features=prediction.features, thresholds=prediction.thresholds,
        decision={c: bool(probs[:, k].max() >= 0.4) for k, c in enumerate(CLASSES)},
        key_slices={}, operating_point="balanced",
    )
    keys = select_key_slices(probs, prediction.decision, 1)
    assert set(keys) == {"any", *truth.subtypes}
    heat = {key: np.ones((16, 16), dtype=np.float32) * 0.5 for key in overlay_keys(keys)}
    overlays = build_overlays(volume.datasets, volume.hu, prediction, Card(), keys, heat)
    sr = build_sr(volume.datasets, prediction, Card(), overlays, keys)
    assert {k for k, v in summary(sr).items() if v["present"]} == {"any", *truth.subtypes}
    for n, ds in enumerate([sr, *overlays]):
        path = tmp_path / f"out{n}.dcm"
        ds.save_as(path)
        result = dciodvfy(path)
        assert result.ok, result.output
        assert pydicom.dcmread(path).StudyInstanceUID == truth.study_uid


def test_same_uids_give_the_same_document():
    series = make_ct_series()
    prediction = make_prediction(len(series))
    keys = select_key_slices(prediction.slice_probs, prediction.decision, 1)
    uids = {"series_instance_uid": generate_uid(), "sop_instance_uid": generate_uid()}
    first = build_sr(series, prediction, Card(), [], keys, **uids)
    second = build_sr(series, prediction, Card(), [], keys, **uids)
    for ds in (first, second):
        for keyword in ("ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime"):
            ds.pop(keyword, None)
        for item in ds.ContributingEquipmentSequence:
            item.pop("ContributionDateTime", None)
    assert first.to_json() == second.to_json()
