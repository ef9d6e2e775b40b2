"""``triage-node explain``: per-slice heat maps on the slice grid, audit overlays, the pointing game.

The runs use a copy of the shipped model (``deploy/triton``) and assert nothing that depends
on which weights are shipped: where a test needs a hit or a miss, it draws the mask where the
first run's map points (or away from it).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from triage_node import CLASSES
from triage_node.cli import build_app
from triage_node.synth import write_dataset
from worker.model.explain_run import explain_dataset, hottest_pixel, pointing_hit, read_mask
from worker.pipeline.explain import blood_region, slice_heatmaps
from worker.pipeline.input_frame import InputFrame
from worker.pipeline.overlay import compute_heatmaps
from worker.pipeline.preprocess import window

ROOT = Path(__file__).resolve().parent.parent
CTICH_HEADER = "PatientNumber,SliceNumber,Intraventricular,Intraparenchymal,Subarachnoid,Epidural,Subdural,No_Hemorrhage,Fracture_Yes_No"


def _model_copy(dst: Path, jpeg_windows: bool = False) -> Path:
    """The shipped model in ``dst``; with ``jpeg_windows`` every channel reads the CT-ICH brain window.

    The weights take any [N,3,S,S] input; the CT-ICH JPEGs hold only the 40/120 window, so a
    card made for DICOM windows is pointed at that one (a CT-ICH card already is).
    """
    shutil.copytree(ROOT / "deploy" / "triton", dst)
    if jpeg_windows:
        path = dst / "model_card.json"
        card = json.loads(path.read_text())
        card["windows"] = {"brain_wide": [40.0, 120.0]}
        card["channel_plan"] = [[offset, "brain_wide"] for offset, _ in card["channel_plan"]]
        path.write_text(json.dumps(card))
    return dst


def _index(out: Path) -> list[dict[str, str]]:
    with open(out / "index.csv", newline="") as fh:
        return list(csv.DictReader(fh))


# -- the hit rule, without a model ---------------------------------------------------------


def test_pointing_hit_when_the_hottest_pixel_is_inside_the_mask():
    heat = np.zeros((20, 30), np.float32)
    heat[5, 25] = 1.0
    heat[12, 3] = 0.9  # second hottest, inside the mask: does not count
    mask = np.zeros((20, 30), bool)
    mask[10:15, 0:6] = True
    assert hottest_pixel(heat) == (5, 25)
    assert not pointing_hit(heat, mask)
    mask[5, 25] = True
    assert pointing_hit(heat, mask)


def test_pointing_tolerance_counts_mask_pixels_within_that_distance():
    heat = np.zeros((40, 40), np.float32)
    heat[20, 20] = 1.0
    mask = np.zeros((40, 40), bool)
    mask[20, 25] = True  # 5 px to the right
    mask[24, 24] = True  # sqrt(32) = 5.66 px away
    assert not pointing_hit(heat, mask, tolerance=4)
    assert pointing_hit(heat, mask, tolerance=5)
    mask[20, 25] = False
    assert not pointing_hit(heat, mask, tolerance=5)  # a square window would call this a hit
    assert pointing_hit(heat, mask, tolerance=6)


def test_a_map_without_heat_points_nowhere_and_shapes_must_match():
    mask = np.ones((8, 8), bool)
    assert hottest_pixel(np.zeros((8, 8))) is None
    assert not pointing_hit(np.zeros((8, 8)), mask)
    with pytest.raises(ValueError, match="same shape"):
        pointing_hit(np.ones((8, 9)), mask)


def test_overlays_and_explain_share_the_slice_grid_maps():
    rng = np.random.default_rng(0)
    features, weight = rng.random((16, 4, 4)).astype(np.float32), rng.normal(size=(6, 16)).astype(np.float32)
    frame = InputFrame(-10, 5, 60)  # a frame that reaches beyond the slice
    maps = slice_heatmaps(features, weight, frame, (50, 70))
    assert list(maps) == list(CLASSES)
    hu = np.full((1, 50, 70), 35.0, np.float32)  # all brain: blood could be anywhere
    overlays = compute_heatmaps(features[None], weight, {"any": [0], "subdural": [0]}, frame, hu)
    kept = slice_heatmaps(features, weight, frame, (50, 70), where=blood_region(window(hu[0], 40, 120)))
    np.testing.assert_array_equal(overlays[("any", 0)], kept["any"])
    np.testing.assert_array_equal(overlays[("subdural", 0)], kept["subdural"])
    assert slice_heatmaps(features, weight, frame, (50, 70), ("any",), "campp")["any"].shape == (50, 70)
    with pytest.raises(ValueError, match="method"):
        slice_heatmaps(features, weight, frame, (50, 70), method="gradcam")


def test_heat_stays_where_blood_can_be():
    """Air, bone and the scalp outside the skull lose their heat; the peak moves into the brain."""
    yy, xx = np.mgrid[:64, :64]
    r = np.hypot(yy - 32, xx - 32)
    hu = np.full((64, 64), -1000.0, np.float32)
    hu[r < 28] = 40.0  # scalp
    hu[r < 26] = 1500.0  # skull
    hu[r < 23] = 35.0  # brain
    region = blood_region(window(hu, 40, 120))
    assert region[32, 32] and not region[32, 56] and not region[32, 60] and not region[0, 0]  # brain, skull, scalp, air
    # a map that peaks on the skull: restricted, its hottest pixel is inside the brain
    features = np.zeros((1, 8, 8), np.float32)
    features[0, 4, 7] = 1.0
    features[0, 4, 5] = 0.6
    frame = InputFrame(0, 0, 64)
    free = slice_heatmaps(features, np.ones((6, 1), np.float32), frame, (64, 64), ("any",))["any"]
    kept = slice_heatmaps(features, np.ones((6, 1), np.float32), frame, (64, 64), ("any",), where=region)["any"]
    assert not region[hottest_pixel(free)] and region[hottest_pixel(kept)]
    assert kept.max() == 1.0 and not kept[~region].any()
    # a slice where the skull is open (skull base): soft tissue still counts
    open_ring = window(np.where((r < 20) & (xx < 50), 35.0, -1000.0), 40, 120)
    assert blood_region(open_ring).sum() == (open_ring > 0.02).sum()


# -- synthetic DICOM through the CLI -------------------------------------------------------


@pytest.fixture(scope="module")
def synth_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("explain_synth")
    data = base / "data"
    write_dataset(data, 1, 11, positive_fraction=1.0, rows=256, components=("axial",))
    model = _model_copy(base / "model")
    out = base / "out"
    result = CliRunner().invoke(build_app(), ["explain", "--model", str(model), "--data", str(data), "--format", "synth",
                                              "--out", str(out), "--threads", "1", "--classes", "any,subdural"])
    assert result.exit_code == 0, result.output
    return data, model, out, result.output


def test_every_slice_gets_six_maps_on_its_own_grid(synth_run):
    data, _, out, output = synth_run
    rows = _index(out)
    n_files = len(list(data.rglob("*.dcm")))
    assert len(rows) == n_files and f"{n_files} slices of 1 series" in output
    assert sorted(int(r["slice_index"]) for r in rows) == list(range(n_files))
    for r in rows:
        with np.load(out / r["npz"]) as z:
            assert list(z.files[:6]) == list(CLASSES)
            for c in CLASSES:
                m = z[c]
                assert m.dtype == np.float32 and m.shape == (256, 256)
                assert m.min() >= 0.0 and m.max() <= 1.0
            assert z["probs"].shape == (6,)
            np.testing.assert_allclose(z["probs"], [float(r[f"p_{c}"]) for c in CLASSES], atol=1e-5)
            assert z["frame"].shape == (3,) and z["frame"][2] > 0
    assert any(np.load(out / r["npz"])["any"].max() > 0 for r in rows)


def test_pngs_show_each_slice_at_its_size_for_the_chosen_classes(synth_run):
    _, _, out, _ = synth_run
    rows = _index(out)
    for r in rows:
        for c in ("any", "subdural"):
            with Image.open(out / r[f"png_{c}"]) as img:
                assert img.mode == "RGB" and img.size == (256, 256)
    assert "png_epidural" not in rows[0]
    assert len(list((out / "png").glob("*.png"))) == 2 * len(rows)


def test_masks_folder_scores_dicom_slices_by_sop_uid(synth_run, tmp_path):
    data, model, out, output = synth_run
    assert "no slice labelled any=1 has a non-empty bleed mask" in output
    positives = [r for r in _index(out) if r["label_any"] == "1"]
    peaks = {r["sop_uid"]: hottest_pixel(np.load(out / r["npz"])["any"]) for r in positives}
    rows = [r for r in positives if peaks[r["sop_uid"]] is not None]
    assert len(rows) >= 5
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.fromarray(np.ones((128, 128), np.uint8)).save(masks / f"{rows[3]['sop_uid']}.png")  # not the slice's grid
    (masks / f"{rows[4]['sop_uid']}.png").write_bytes(b"not a png")
    for k, r in enumerate(rows[:3]):
        y, x = peaks[r["sop_uid"]]
        mask = np.zeros((256, 256), np.uint8)
        if k == 0:  # on the hottest pixel
            mask[max(y - 2, 0) : y + 3, max(x - 2, 0) : x + 3] = 1
        elif k == 1:  # in the corner farthest from it
            y, x = (0 if y > 127 else 250), (0 if x > 127 else 250)
            mask[y : y + 6, x : x + 6] = 1
        Image.fromarray(mask).save(masks / f"{r['sop_uid']}.png")  # k == 2: empty, not scored
    summary = explain_dataset(model, data, "synth", tmp_path / "out", threads=1, png=False, masks_dir=masks)
    game = json.loads((tmp_path / "out" / "pointing_game.json").read_text())
    assert (summary.pointing.n, summary.pointing.hits) == (2, 1) == (game["n"], game["hits"])
    hit = {r["sop_uid"]: r["pointing_hit"] for r in _index(tmp_path / "out")}
    assert [hit[r["sop_uid"]] for r in rows[:5]] == ["1", "0", "", "", ""]
    assert game["masks_unusable"] == 2 and game["masks_on_negative_slices"] == 0
    assert game["positive_slices"] == len(positives) and game["positive_slices_without_mask"] == len(positives) - 2
    assert game["hit_rate_ci95"][0] <= game["hit_rate"] <= game["hit_rate_ci95"][1]
    assert not (tmp_path / "out" / "png").exists()


# -- a hand-made CT-ICH layout with bleed masks --------------------------------------------


def _ctich(root: Path, n_slices: int = 5) -> None:
    """Patient 049: a grey head with a bright blob on every slice; slices 2-4 labelled intraparenchymal."""
    brain = root / "Patients_CT" / "049" / "brain"
    brain.mkdir(parents=True)
    yy, xx = np.mgrid[:64, :64]
    for n in range(1, n_slices + 1):
        img = np.where((yy - 32) ** 2 / 26**2 + (xx - 32) ** 2 / 22**2 <= 1, 115, 0)
        img = np.where((yy - 24 - 2 * n) ** 2 + (xx - 40) ** 2 <= 16, 200, img)  # the bleed
        Image.fromarray(img.astype(np.uint8)).save(brain / f"{n}.jpg", quality=95)
    lines = [CTICH_HEADER] + [f"49,{n},0,{int(2 <= n <= 4)},0,0,0,{int(not 2 <= n <= 4)},0" for n in range(1, n_slices + 1)]
    (root / "hemorrhage_diagnosis.csv").write_text("\n".join(lines) + "\n")


def _disc(centre: tuple[int, int], r: int = 3) -> np.ndarray:
    yy, xx = np.mgrid[:64, :64]
    return (((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) <= r * r).astype(np.uint8) * 255


def test_pointing_game_on_ctich_masks(tmp_path):
    data = tmp_path / "ctich"
    _ctich(data)
    model = _model_copy(tmp_path / "model", jpeg_windows=True)
    first = explain_dataset(model, data, "physionet-ich", tmp_path / "first", threads=1)
    assert first.slices == 5 and first.pointing.n == 0 and first.pointing.positive_slices == 3
    by_source = {r["source"]: r for r in _index(tmp_path / "first")}
    peaks = {n: hottest_pixel(np.load(tmp_path / "first" / by_source[f"Patients_CT/049/brain/{n}.jpg"]["npz"])["any"])
             for n in range(1, 6)}
    assert peaks[2] is not None and peaks[3] is not None
    brain = data / "Patients_CT" / "049" / "brain"
    far = (60 if peaks[3][0] < 32 else 3, 60 if peaks[3][1] < 32 else 3)
    masks = {
        1: _disc(peaks[1] or (32, 32)),  # negative slice: never scored
        2: _disc(peaks[2]),  # hit
        3: _disc(far),  # miss
        4: np.zeros((64, 64), np.uint8),  # empty mask: not scored
    }  # slice 5 (negative) has no mask file
    for n, m in masks.items():
        Image.fromarray(m).save(brain / f"{n}_HGE_Seg.jpg", quality=90)
    assert read_mask(brain / "2_HGE_Seg.jpg", 127)[peaks[2]]  # JPEG ringing stays below the level

    result = CliRunner().invoke(build_app(), ["explain", "--model", str(model), "--data", str(data), "--format",
                                              "physionet-ich", "--out", str(tmp_path / "out"), "--threads", "1"])
    assert result.exit_code == 0, result.output
    game = json.loads((tmp_path / "out" / "pointing_game.json").read_text())
    assert (game["n"], game["hits"], game["hit_rate"]) == (2, 1, 0.5)
    assert game["positive_slices"] == 3 and game["positive_slices_without_mask"] == 1
    assert game["masks_on_negative_slices"] == 1 and game["masks_unusable"] == 0
    assert game["hit_rate_ci95"] == pytest.approx([0.0126, 0.9874], abs=1e-4)
    assert "pointing game (cam, tolerance 0 px): 1/2 hits, rate 0.500" in result.output
    rows = {r["source"]: r for r in _index(tmp_path / "out")}
    assert [rows[f"Patients_CT/049/brain/{n}.jpg"]["pointing_hit"] for n in range(1, 6)] == ["", "1", "0", "", ""]
    for n in range(1, 6):
        r = rows[f"Patients_CT/049/brain/{n}.jpg"]
        with np.load(tmp_path / "out" / r["npz"]) as z:
            assert all(z[c].shape == (64, 64) for c in CLASSES)
        with Image.open(tmp_path / "out" / r["png_any"]) as img:
            assert img.size == (64, 64)
    # a tolerance as wide as the slice turns the miss into a hit
    wide = explain_dataset(model, data, "physionet-ich", tmp_path / "wide", threads=1, png=False, tolerance=90)
    assert (wide.pointing.n, wide.pointing.hits) == (2, 2)


def test_explain_refuses_a_card_whose_windows_the_jpegs_cannot_give(tmp_path):
    data = tmp_path / "ctich"
    _ctich(data, 2)
    model = _model_copy(tmp_path / "model")
    path = model / "model_card.json"
    card = json.loads(path.read_text())
    card["windows"] = {"brain": [40.0, 80.0]}  # a DICOM window: not what the JPEGs hold
    card["channel_plan"] = [[offset, "brain"] for offset, _ in card["channel_plan"]]
    path.write_text(json.dumps(card))
    result = CliRunner().invoke(build_app(), ["explain", "--model", str(model), "--data", str(data), "--format",
                                              "physionet-ich", "--out", str(tmp_path / "out"), "--threads", "1"])
    assert result.exit_code == 1
    assert "no labelled series could be explained" in result.output and "cannot be made from CT-ICH" in result.output
