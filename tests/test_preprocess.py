"""Preprocessing: HU conversion (RSNA fix), slice sorting (tilt, missing slice), inputs."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, RLELossless

from triage_node.synth.ct_series import ct_slice_dataset
from worker.pipeline.preprocess import (
    WINDOWS,
    SeriesError,
    Volume,
    load_series,
    make_inputs,
    needs_rsna_fix,
    to_hu,
    window,
)


def ct_slice(
    stored: np.ndarray,
    position,
    orientation=(1, 0, 0, 0, 1, 0),
    *,
    intercept=-1024.0,
    bits_stored=16,
    signed=True,
    sop_class_in_dataset=True,
    series_uid="1.2.3.4",
) -> Dataset:
    ds = ct_slice_dataset(
        stored.astype(np.int16 if signed else np.uint16), study_uid="1.2.3", series_uid=series_uid,
        instance_number=1, position=[float(v) for v in position], orientation=list(orientation),
        slice_thickness=None, bits_stored=bits_stored, intercept=intercept,
    )
    if not sop_class_in_dataset:  # de-identified exports keep it only in the file meta
        del ds.SOPClassUID
    return ds


def test_window_maps_center_and_edges():
    hu = np.array([-1000.0, 0.0, 40.0, 80.0, 1000.0])
    out = window(hu, 40, 80)
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0])
    with pytest.raises(ValueError):
        window(hu, 40, 0)


def test_rsna_intercept_fix_shifts_and_wraps():
    # RSNA-style: unsigned 12-bit with intercept 0 in the header, values stored offset by -1000 mod 4096
    true_hu = np.array([[-1000, 0], [40, 2000]], dtype=np.float32)
    stored = true_hu.astype(np.int64) % 4096  # what the broken files hold: HU modulo 4096 (air -> 3096)
    ds = ct_slice(stored.astype(np.uint16), (0, 0, 0), intercept=0.0, bits_stored=12, signed=False)
    assert needs_rsna_fix(ds)
    np.testing.assert_array_equal(to_hu(ds), true_hu)


def test_ordinary_slice_is_not_touched_by_rsna_fix():
    stored = np.array([[0, 1024], [1064, 3000]], dtype=np.int16)
    ds = ct_slice(stored, (0, 0, 0), intercept=-1024.0)
    assert not needs_rsna_fix(ds)
    np.testing.assert_array_equal(to_hu(ds), stored.astype(np.float32) - 1024)


def _tilted_series(n=8, tilt_deg=18.5, spacing=5.0, drop=(3,)):
    t = np.deg2rad(tilt_deg)
    row = np.array([1.0, 0.0, 0.0])
    col = np.array([0.0, np.cos(t), -np.sin(t)])
    normal = np.cross(row, col)
    slices = []
    for k in range(n):
        if k in drop:
            continue
        pos = np.array([-100.0, -100.0, 0.0]) + k * spacing * normal
        # tilt also shifts y per slice; encode the index in the pixels
        img = np.full((4, 4), 1024 + 10 * k, dtype=np.int16)
        slices.append(ct_slice(img, pos, orientation=(*row, *col)))
    return slices, normal


def test_sorting_follows_normal_with_tilt_and_missing_slice(tmp_path):
    slices, normal = _tilted_series()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(slices))
    paths = []
    for i in order:
        p = tmp_path / f"{i:03d}_{slices[i].SOPInstanceUID}.dcm"
        slices[i].save_as(p, enforce_file_format=True)
        paths.append(p)
    vol = load_series(paths)
    assert isinstance(vol, Volume)
    np.testing.assert_array_equal(vol.hu[:, 0, 0], [10 * k for k in (0, 1, 2, 4, 5, 6, 7)])
    assert vol.missing_slices == 1
    assert vol.spacing[0] == pytest.approx(5.0)
    np.testing.assert_allclose(vol.normal, normal)
    assert vol.sop_uids == tuple(s.SOPInstanceUID for s in slices)
    assert all("PixelData" not in d for d in vol.datasets)
    assert [d.SOPInstanceUID for d in vol.datasets] == list(vol.sop_uids)


def test_sorting_is_not_by_z_alone():
    # Tilted and descending z: z decreases while the projection on the normal increases.
    slices, _ = _tilted_series(n=5, tilt_deg=60.0, drop=())
    vol = load_series(list(reversed(slices)))
    np.testing.assert_array_equal(vol.hu[:, 0, 0], [0, 10, 20, 30, 40])


def test_sop_class_only_in_file_meta_and_rle_compressed(tmp_path):
    img = np.arange(16, dtype=np.int16).reshape(4, 4) + 1000
    ds = ct_slice(img, (0, 0, 0), sop_class_in_dataset=False)
    ds.compress(RLELossless)
    p = tmp_path / "a.dcm"
    ds.save_as(p, enforce_file_format=True)
    assert "SOPClassUID" not in pydicom.dcmread(p)
    vol = load_series([p])
    np.testing.assert_array_equal(vol.hu[0], img.astype(np.float32) - 1024)
    assert vol.datasets[0].SOPClassUID == CTImageStorage


def test_load_series_rejects_empty_and_mixed_shapes():
    with pytest.raises(SeriesError):
        load_series([])
    a = ct_slice(np.zeros((4, 4), np.int16), (0, 0, 0))
    b = ct_slice(np.zeros((6, 6), np.int16), (0, 0, 5))
    with pytest.raises(SeriesError):
        load_series([a, b])


@pytest.mark.parametrize("variant", ["windows", "adjacent", "mixed"])
def test_make_inputs_channels(variant):
    hu = np.stack([np.full((8, 8), v, np.float32) for v in (0.0, 40.0, 80.0, 600.0)])
    x = make_inputs(hu, variant=variant, size=16)
    assert x.shape == (4, 3, 16, 16) and x.dtype == np.float32
    assert x.min() >= 0.0 and x.max() <= 1.0
    s = 1  # slice index with neighbours 0 and 2
    if variant == "windows":
        expect = [window(40.0, *WINDOWS[w]) for w in ("brain", "subdural", "bone")]
    elif variant == "adjacent":
        expect = [window(v, *WINDOWS["brain"]) for v in (0.0, 40.0, 80.0)]
    else:
        expect = [window(0.0, *WINDOWS["brain"]), window(40.0, *WINDOWS["subdural"]), window(80.0, *WINDOWS["bone"])]
    np.testing.assert_allclose(x[s, :, 5, 5], np.asarray(expect, np.float32).ravel(), atol=1e-6)
    if variant != "windows":
        # the first slice repeats itself as its missing neighbour
        np.testing.assert_allclose(x[0, 0], x[0, 0].mean(), atol=1e-6)


def test_make_inputs_pads_non_square_with_air():
    hu = np.full((1, 8, 4), 40.0, np.float32)
    x = make_inputs(hu, variant="windows", size=8)
    assert x[0, 0, 4, 0] == pytest.approx(0.0)  # padded column is air
    assert x[0, 0, 4, 4] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        make_inputs(hu, variant="nope", size=8)
