"""Overlay series (Secondary Capture): key slices, heat map, burned-in text, dciodvfy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from tests.test_sr import Card, hu_volume, make_ct_series, make_prediction
from triage_node import CLASSES
from triage_node.peers import dciodvfy
from worker.pipeline.overlay import (
    MIN_RENDER_SIZE,
    build_overlays,
    heat_to_image_frame,
    overlay_keys,
    patient_orientation,
    select_key_slices,
    to_png,
)
from worker.pipeline.sr_codes import overlay_class

SC_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"


def _gaussian(size: int, cy: float, cx: float, sigma: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2)).astype(np.float32)


def test_key_slices_top_k_per_positive_class_and_one_for_a_negative_study():
    probs = np.zeros((6, len(CLASSES)))
    probs[:, 0] = [0.1, 0.9, 0.3, 0.95, 0.2, 0.5]
    probs[:, 5] = [0.7, 0.1, 0.8, 0.2, 0.9, 0.1]
    decision = {c: c in ("any", "subdural") for c in CLASSES}
    assert select_key_slices(probs, decision, 2) == {"any": [3, 1], "subdural": [4, 2]}
    assert select_key_slices(probs, decision, 10)["any"] == [3, 1, 5, 2, 4, 0]
    negative = {c: False for c in CLASSES}
    assert select_key_slices(probs, negative, 3) == {"any": [3]}
    with pytest.raises(ValueError):
        select_key_slices(probs[:, :3], decision, 2)


def test_overlays_round_trip_as_secondary_capture(tmp_path: Path):
    series = make_ct_series(n=8, size=64)
    prediction = make_prediction(len(series))
    keys = select_key_slices(prediction.slice_probs, prediction.decision, 2)
    heat = _gaussian(32, 12, 12, 4)
    overlays = build_overlays(
        series, hu_volume(series), prediction, Card(), keys, {k: heat for k in overlay_keys(keys)}
    )
    assert [(overlay_class(o), int(o.ImageComments.split("slice=")[1].split()[0])) for o in overlays] == overlay_keys(keys)
    assert len(overlays) == 4  # any + subdural, two slices each

    series_uids = set()
    for n, sc in enumerate(overlays):
        path = tmp_path / f"sc{n}.dcm"
        sc.save_as(path)
        ds = pydicom.dcmread(path)
        series_uids.add(ds.SeriesInstanceUID)
        assert ds.SOPClassUID == SC_IMAGE_STORAGE
        assert ds.StudyInstanceUID == series[0].StudyInstanceUID
        assert ds.SeriesInstanceUID != series[0].SeriesInstanceUID
        assert ds.BurnedInAnnotation == "YES"
        assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert "heat map" in ds.DerivationDescription
        name, index = overlay_keys(keys)[n]
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == series[index].SOPInstanceUID
        assert ds.PhotometricInterpretation == "RGB" and ds.BitsAllocated == 8
        assert ds.PatientName == "DOE^JANE"
        pixels = ds.pixel_array
        assert pixels.shape == (MIN_RENDER_SIZE, MIN_RENDER_SIZE, 3)
        # Heat map: colour (R, G, B differ) around the peak at (12, 12) of 32 -> (192, 192).
        peak = pixels[180:200, 180:200].astype(int)
        assert np.abs(peak[..., 0] - peak[..., 2]).mean() > 30
        # Far from the peak and from the text the image stays gray (R == G == B).
        plain = pixels[300:400, 400:500].astype(int)
        assert np.abs(plain[..., 0] - plain[..., 2]).max() <= 1
        # Burned-in text: yellow warning lines at the bottom, white class line at the top.
        bottom = pixels[-80:, :300].astype(int)
        assert ((bottom[..., 0] > 200) & (bottom[..., 1] > 200) & (bottom[..., 2] < 80)).sum() > 200
        top = pixels[:40, :300].astype(int)
        assert (top.min(axis=-1) > 230).sum() > 100
        result = dciodvfy(path)
        assert result.ok, result.output
    assert len(series_uids) == 1


def test_heat_map_from_the_padded_model_frame_lands_on_the_same_anatomy():
    # A 48x64 image is padded to 64x64 (8 rows above and below) before the model sees it.
    heat_model = _gaussian(32, 16, 8, 2)  # in a 32x32 model frame: centre row, left quarter
    heat = heat_to_image_frame(heat_model, (48, 64))
    assert heat.shape == (48, 64)
    y, x = np.unravel_index(np.argmax(heat), heat.shape)
    assert abs(y - 24) <= 2 and abs(x - 16) <= 2
    same = np.random.default_rng(0).random((48, 64)).astype(np.float32)
    assert np.array_equal(heat_to_image_frame(same, (48, 64)), same)


def test_patient_orientation_from_image_orientation():
    series = make_ct_series(n=1)
    assert patient_orientation(series[0]) == ("L", "P")
    series[0].ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # sagittal
    assert patient_orientation(series[0]) == ("P", "F")


def test_render_example_png(tmp_path: Path):
    series = make_ct_series(n=8, size=64)
    prediction = make_prediction(len(series))
    keys = select_key_slices(prediction.slice_probs, prediction.decision, 1)
    overlays = build_overlays(
        series, hu_volume(series), prediction, Card(), keys,
        {k: _gaussian(32, 13, 12, 4) for k in overlay_keys(keys)},
    )
    png = tmp_path / "overlay.png"
    to_png(overlays[-1], str(png))
    with Image.open(png) as img:
        assert img.mode == "RGB" and img.size == (MIN_RENDER_SIZE, MIN_RENDER_SIZE)


def test_no_colour_over_air_or_below_the_floor():
    from worker.pipeline.overlay import render_overlay

    hu = np.full((64, 64), 35.0, dtype=np.float32)
    hu[:, 32:] = -1000.0  # air on the right half
    heat = np.ones((64, 64), dtype=np.float32)
    heat[:16] = 0.1  # weak activation at the top
    rgb = render_overlay(hu, heat, [], []).astype(int)
    spread = np.abs(rgb[..., 0] - rgb[..., 2])
    assert spread[200:500, 300:500].max() <= 1  # air stays black
    assert spread[10:50, 10:200].max() <= 1  # below the floor stays gray
    assert spread[200:500, 10:200].min() > 30  # strong heat inside the head is coloured
