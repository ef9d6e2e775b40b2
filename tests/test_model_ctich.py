"""CT-ICH (PhysioNet layout): import, the JPEG path against the DICOM serving path, framing, folds.

The parity test renders a synthetic DICOM series into CT-ICH-style JPEGs (brain window
40/120, 8-bit, another matrix size, JPEG-compressed) and checks that the training path
(JPEG) and the serving path (DICOM HU) hand the CNN the same inputs.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from triage_node import CLASSES
from triage_node.synth import write_dataset
from worker.model import physionet
from worker.model.augment import augment
from worker.model.crossval import fold_thresholded, patient_folds
from worker.model.data import CachedSet, index_dataset, record_inputs
from worker.pipeline.input_frame import InputFrame, find_head_frame, head_box
from worker.pipeline.preprocess import WINDOWS, channel_plan, load_series, series_inputs, window

ROOT = Path(__file__).resolve().parents[1]
HEADER = ["PatientNumber", "SliceNumber", "Intraventricular", "Intraparenchymal", "Subarachnoid", "Epidural", "Subdural", "No_Hemorrhage", "Fracture_Yes_No"]
PLAN = channel_plan("adjacent", ("brain_wide",))


def write_ctich(root: Path, patients: dict[int, list[np.ndarray]], labels: dict[tuple[int, int], dict[str, int]] | None = None, quality: int = 95) -> None:
    """A PhysioNet-layout folder from brain-window images (0..1) per patient, slice 1 first."""
    rows = []
    for pid, images in patients.items():
        d = root / "Patients_CT" / f"{pid:03d}" / "brain"
        d.mkdir(parents=True, exist_ok=True)
        for n, img in enumerate(images, start=1):
            Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)).save(d / f"{n}.jpg", quality=quality)
            lab = (labels or {}).get((pid, n), {})
            row = {h: 0 for h in HEADER}
            row.update({"PatientNumber": pid, "SliceNumber": n, **lab})
            row["No_Hemorrhage"] = 0 if any(lab.values()) else 1
            rows.append(row)
    with open(root / physionet.LABEL_FILE, "w", newline="") as fh:
        w = csv.DictWriter(fh, HEADER)
        w.writeheader()
        w.writerows(rows)


@pytest.fixture(scope="module")
def synthetic_series(tmp_path_factory) -> list[Path]:
    out = tmp_path_factory.mktemp("synth")
    write_dataset(out, 1, 3, positive_fraction=1.0, rows=512, components=("axial",))
    return sorted(p for p in out.rglob("*.dcm"))


def test_jpeg_and_dicom_paths_give_the_same_inputs(tmp_path, synthetic_series):
    vol = load_series(synthetic_series)
    served, frame = series_inputs(vol, PLAN, WINDOWS, 160, "head")
    # CT-ICH style: brain window 40/120, 8-bit JPEG at 650 x 650 although the matrix is 512
    jpegs = [np.asarray(Image.fromarray(window(s, 40, 120), mode="F").resize((650, 650), Image.BILINEAR)) for s in vol.hu]
    write_ctich(tmp_path, {49: jpegs})
    index = index_dataset(tmp_path, "physionet-ich")
    trained, _, jframe, shape = record_inputs(index.series[0], PLAN, WINDOWS, 160, "head")
    assert shape == (650, 650)
    assert trained.shape == served.shape
    # the same head region, whatever the matrix: frames agree as fractions of the slice
    assert np.allclose(np.asarray(jframe.as_tuple()) / 650, np.asarray(frame.as_tuple()) / 512, atol=0.02)
    # 8-bit and JPEG rounding and a second resampling: 0.008 mean (1 HU), 0.015 at the 90th
    # percentile; what is left sits on the sharp skull edges, a fraction of a pixel apart
    diff = np.abs(trained - served)
    assert diff.mean() < 0.015, diff.mean()
    assert np.percentile(diff, 90) < 0.03
    # and the head fills the frame: most of the input is not air
    assert (served[:, 1] > 0.05).mean() > 0.3


def test_ctich_window_recovers_hu_levels():
    """pixel/255 of the CT-ICH brain JPEG is the brain_wide window: air 0, CSF, brain, blood, bone 1."""
    hu = np.array([-1000.0, 8.0, 35.0, 70.0, 1200.0])
    px = np.round(window(hu, *physionet.JPEG_WINDOW) * 255)
    assert px.tolist() == [0.0, 60.0, 117.0, 191.0, 255.0]
    assert WINDOWS["brain_wide"] == physionet.JPEG_WINDOW


def test_other_windows_cannot_come_from_jpegs(tmp_path):
    write_ctich(tmp_path, {50: [np.full((64, 64), 0.5)] * 2})
    rec = index_dataset(tmp_path, "physionet-ich").series[0]
    with pytest.raises(ValueError, match="cannot be made from CT-ICH"):
        record_inputs(rec, channel_plan("windows"), WINDOWS, 32, "head")


def test_physionet_labels_and_slice_order(tmp_path):
    imgs = [np.full((64, 64), v) for v in (0.1, 0.2, 0.3)]
    write_ctich(tmp_path, {49: imgs, 101: imgs[:2]}, {(49, 2): {"Epidural": 1, "Subdural": 1}, (101, 1): {"Intraventricular": 1}})
    ix = index_dataset(tmp_path, "physionet-ich")
    assert [r.patient_key for r in ix.series] == ["ctich-49", "ctich-101"]
    a = ix.series[0]
    assert [p.name for p in a.paths] == ["1.jpg", "2.jpg", "3.jpg"]
    y = np.stack([ix.labels[u] for u in a.sop_uids])
    assert y[1].tolist() == [1, 1, 0, 0, 0, 1] and y[0].sum() == 0
    assert ix.labels[ix.series[1].sop_uids[0]][CLASSES.index("intraventricular")] == 1
    # stable identifiers: the same slice has the same UID in every run
    assert a.sop_uids[0] == physionet.slice_uid(49, 1) == index_dataset(tmp_path, "physionet-ich").series[0].sop_uids[0]
    assert len(set(a.sop_uids)) == 3


def test_flat_copy_conversion(tmp_path):
    src = tmp_path / "flat"
    for kind in ("Brain", "Bone"):
        for folder, names in (("Positiv", ["491", "4910", "1001"]), ("Negativ", ["492", "10012"])):
            d = src / "Data" / kind / folder
            d.mkdir(parents=True)
            for n in names:
                Image.fromarray(np.zeros((8, 8), np.uint8)).save(d / f"{n}.jpg")
    (src / "DataPreprocessing").mkdir()
    rows = [(49, 1), (49, 2), (49, 10), (100, 1), (100, 12)]
    with open(src / "DataPreprocessing" / physionet.LABEL_FILE, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(HEADER)
        for p, s in rows:
            w.writerow([p, s, 0, 0, 0, 0, 0, 1, 0])
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "ctich_from_flat_copy.py"), "--src", str(src), "--out", str(out)], capture_output=True, text=True, check=True)
    assert "without an image: 0" in done.stdout
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("brain/*.jpg")) == [
        "Patients_CT/049/brain/1.jpg", "Patients_CT/049/brain/10.jpg", "Patients_CT/049/brain/2.jpg",
        "Patients_CT/100/brain/1.jpg", "Patients_CT/100/brain/12.jpg",
    ]
    assert len(index_dataset(out, "physionet-ich").series) == 2


def _head(rows: int, cols: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    y, x = np.mgrid[:rows, :cols]
    img = np.zeros((rows, cols), np.float32)
    img[((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1] = 0.5
    return img


def test_head_frame_ignores_the_table_and_maps_back():
    img = _head(512, 512, 230, 256, 150, 120)
    img[470:474, 60:450] = 1.0  # a thin head-rest arc below the head
    frame = find_head_frame(img[None, ::4, ::4], 512, 512)
    assert abs(frame.side - 300 * 1.12) < 12  # the head's 300-pixel height plus margins, not the arc
    assert abs(frame.y0 + frame.side / 2 - 230) < 6 and abs(frame.x0 + frame.side / 2 - 256) < 6
    # a heat map in the frame lands on the slice at the same place
    heat = np.zeros((10, 10), np.float32)
    heat[2, 7] = 1.0
    back = frame.to_image(heat, (512, 512))
    yy, xx = np.unravel_index(np.argmax(back), back.shape)
    assert abs(yy - (frame.y0 + 2.5 * frame.side / 10)) < frame.side / 10
    assert abs(xx - (frame.x0 + 7.5 * frame.side / 10)) < frame.side / 10


def test_no_head_falls_back_to_the_centred_frame():
    assert find_head_frame(np.zeros((3, 16, 32)), 64, 128) == InputFrame.centred(64, 128)
    assert head_box(np.zeros((20, 20), bool)) is None


@pytest.mark.parametrize("n_slices", [1, 2])
def test_one_or_two_slices_get_a_full_input(n_slices, synthetic_series):
    vol = load_series(synthetic_series[:n_slices])
    x, frame = series_inputs(vol, PLAN, WINDOWS, 64, "head")
    assert x.shape == (n_slices, 3, 64, 64)
    assert np.array_equal(x[0, 0], x[0, 1])  # the missing neighbour repeats the edge slice
    assert frame.side > 0 and np.isfinite(x).all()


def test_augment_keeps_air_and_range():
    gen = torch.Generator().manual_seed(0)
    x = torch.zeros(6, 3, 32, 32)
    x[:, :, 8:24, 8:24] = 0.5
    y = augment(x, gen, adjacent=True)
    assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1
    assert float(y[:, :, :3, :3].abs().max()) == 0.0  # air in the corners stays air
    assert not torch.equal(y, x)


def _cache(keys: list[str], positive: list[bool]) -> CachedSet:
    labels = np.zeros((len(keys) * 2, 6), np.uint8)
    for i, p in enumerate(positive):
        labels[2 * i, 0] = p
    return CachedSet(np.zeros((len(keys) * 2, 1)), labels, np.arange(0, 2 * len(keys) + 1, 2), keys, keys, keys, {})


def test_folds_hold_each_patient_once_stratified_and_never_synthetic():
    keys = [f"ctich-{i}" for i in range(20)] + ["synth-a", "synth-b"]
    positive = [i % 4 == 0 for i in range(20)] + [True, False]
    folds = patient_folds(_cache(keys, positive), 5, seed=1)
    flat = sorted(i for f in folds for i in f)
    assert flat == list(range(20))  # every real patient once; synthetic never tested
    assert all(sum(positive[i] for i in f) == 1 for f in folds)  # 5 positives over 5 folds


def test_fold_thresholds_never_come_from_the_fold_itself():
    # fold 0 scores everything 10x lower: thresholds chosen on fold 1 miss all its positives
    y = np.zeros((8, 6), np.uint8)
    y[[0, 1, 4, 5], 0] = 1
    p = np.tile(np.array([[0.9], [0.8], [0.2], [0.1], [0.9], [0.8], [0.2], [0.1]]), (1, 6))
    p[:4] /= 10
    got = fold_thresholded({"study_y": y, "study_seq": p, "fold": np.array([0, 0, 0, 0, 1, 1, 1, 1])})
    r = got["high_sensitivity"]["any"]
    assert (r["tp"], r["fn"]) == (2, 2)


@pytest.mark.parametrize("n_slices", [1, 2])
def test_short_studies_get_a_sensible_answer_from_the_shipped_model(n_slices, synthetic_series):
    """A study of one or two slices: inputs with repeated edges, a sequence model that corrects, not overturns."""
    from triage_node.config import DEFAULT_MODEL_CARD, DEFAULT_MODEL_REPOSITORY
    from worker.inference.card import load_model_card
    from worker.pipeline.inference_core import card_inputs, onnx_callables, run_study

    card = load_model_card(DEFAULT_MODEL_CARD)
    slice_fn, sequence_fn = onnx_callables(str(DEFAULT_MODEL_REPOSITORY.parent), threads=1)
    vol = load_series(synthetic_series)
    full = run_study(card_inputs(vol, card)[0], slice_fn, sequence_fn, card)
    k = min(int(np.argmax(full.cnn_slice_probs[:, 0])), vol.n_slices - n_slices)
    wanted = set(vol.sop_uids[k : k + n_slices])  # the slices around the most suspicious one
    short_vol = load_series([p for p in synthetic_series if pydicom_uid(p) in wanted])
    short = run_study(card_inputs(short_vol, card)[0], slice_fn, sequence_fn, card)
    assert short.slice_probs.shape == (n_slices, 6) and np.isfinite(short.study_probs).all()
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    gap = np.abs(logit(np.clip(short.slice_probs, 1e-6, 1 - 1e-6)) - logit(np.clip(short.cnn_slice_probs, 1e-6, 1 - 1e-6)))
    assert gap.max() < 4.0, gap


def pydicom_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_evaluate_reads_the_physionet_layout_with_the_shipped_model(tmp_path, synthetic_series):
    """`triage-node evaluate --format physionet-ich` on CT-ICH-style JPEGs, through the serving path."""
    import json

    vol = load_series(synthetic_series)
    jpegs = [window(s, *physionet.JPEG_WINDOW) for s in vol.hu]
    write_ctich(tmp_path / "data", {49: jpegs, 50: jpegs[::-1]}, {(49, n): {"Epidural": 1} for n in (10, 11)})
    out = tmp_path / "report"
    tn = Path(sys.executable).parent / "triage-node"
    done = subprocess.run([str(tn), "evaluate", "--model", str(ROOT / "deploy" / "triton"), "--data", str(tmp_path / "data"),
                           "--format", "physionet-ich", "--out", str(out), "--n-boot", "20", "--threads", "1"],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rep = json.loads((out / "report.json").read_text())
    assert rep["n_studies"] == 2 and rep["failed_series"] == 0
    assert rep["study_level"]["any"]["n_pos"] == 1 and rep["n_slices"] == 2 * vol.n_slices
    assert (out / "report.md").is_file() and (out / "study_roc.png").is_file()
