"""Rendering: labels follow the voxels, geometry follows the gantry tilt, speed."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from triage_node import CLASSES, SUBTYPES
from triage_node.synth import Lesion, StudySpec, render_axial, sample_study_spec
from triage_node.synth.anatomy import sample_anatomy
from triage_node.synth.render import MIN_BLOOD_MM2


def _unit(*v):
    v = np.asarray(v, dtype=float)
    return tuple((v / np.linalg.norm(v)).tolist())


def _known_spec(lesions: tuple[Lesion, ...]) -> StudySpec:
    anatomy = dataclasses.replace(sample_anatomy(np.random.default_rng(2)), rotation_deg=(0.0, 0.0, 0.0))
    return StudySpec(anatomy=anatomy, lesions=lesions, head_center=(0.0, 6.0, -40.0), fov_mm=240.0,
                     streak_hu=15.0, noise_seed=77)


ALL_FIVE = (
    Lesion("epidural", "focal", _unit(1, -0.1, 0.35), (26.0, 14.0), 72.0),
    Lesion("subdural", "convexity", _unit(-1, 0.2, 0.45), (65.0, 9.0), 66.0),
    Lesion("intraparenchymal", "focal", (-21.0, -4.0, 2.0), (13.0, 0.7), 76.0, 3.0),
    Lesion("intraventricular", "level", (0.0, 10.0, 8.0), (16.0,), 70.0),
    Lesion("subarachnoid", "basal", (0.0, -6.0, -16.0), (32.0, 0.0), 64.0),
)


@pytest.fixture(scope="module")
def pair():
    """The same head and noise with and without the five lesions."""
    pos = render_axial(_known_spec(ALL_FIVE), rows=256)
    neg = render_axial(_known_spec(()), rows=256)
    return pos, neg


def test_each_subtype_is_visible_and_any_is_the_or(pair) -> None:
    pos, neg = pair
    assert pos.labels.shape == (pos.hu.shape[0], len(CLASSES))
    for i, name in enumerate(SUBTYPES):
        assert pos.labels[:, 1 + i].any(), f"{name} never labelled"
    np.testing.assert_array_equal(pos.labels[:, 0], pos.labels[:, 1:].any(axis=1))
    assert not pos.labels[:, 0].all(), "lesions should not reach every slice"
    assert not neg.labels.any() and not neg.masks.any()


def test_positive_slices_hold_acute_blood_in_the_mask(pair) -> None:
    pos, _ = pair
    area = pos.pixel_spacing[0] * pos.pixel_spacing[1]
    for i, name in enumerate(SUBTYPES):
        for k in np.flatnonzero(pos.labels[:, 1 + i]):
            m = ((pos.masks[k] >> i) & 1).astype(bool)
            assert m.sum() * area >= MIN_BLOOD_MM2
            hu = pos.hu[k][m]
            assert 50.0 <= np.median(hu) <= 90.0, (name, k, np.median(hu))
            assert np.mean((hu > 40) & (hu < 100)) > 0.75, (name, k)


def test_negative_slices_do_not_differ_from_the_lesion_free_head(pair) -> None:
    """Same anatomy and noise: where a slice is labelled negative, no blood was added."""
    pos, neg = pair
    area = pos.pixel_spacing[0] * pos.pixel_spacing[1]
    np.testing.assert_array_equal(pos.positions, neg.positions)
    for k in range(pos.hu.shape[0]):
        added = (pos.hu[k] - neg.hu[k]) > 20.0
        if pos.labels[k, 0]:
            assert added.sum() * area >= MIN_BLOOD_MM2, k
        else:
            assert added.sum() * area < MIN_BLOOD_MM2, (k, added.sum())


def test_blood_is_denser_than_the_surrounding_brain(pair) -> None:
    pos, neg = pair
    m = pos.masks > 0
    brain = (neg.hu > 15) & (neg.hu < 50) & ~m
    assert np.median(pos.hu[m]) - np.median(neg.hu[brain]) > 20.0


@pytest.mark.parametrize("tilt", [0.0, 17.5, -12.0])
@pytest.mark.parametrize("descending", [False, True])
def test_positions_follow_the_tilted_slice_normal(tilt: float, descending: bool) -> None:
    spec = sample_study_spec(np.random.default_rng(5), positive_fraction=0.0)
    s = render_axial(spec, rows=128, slice_thickness_mm=5.0, tilt_deg=tilt, descending=descending)
    row, col = np.asarray(s.orientation[:3]), np.asarray(s.orientation[3:])
    assert abs(row @ col) < 1e-9 and np.isclose(np.linalg.norm(col), 1.0)
    normal = np.cross(row, col)
    assert np.isclose(np.degrees(np.arccos(normal @ [0, 0, 1])), abs(tilt))
    steps = np.diff(s.positions, axis=0)
    expected = -5.0 if descending else 5.0
    np.testing.assert_allclose(steps @ normal, expected, atol=1e-6)
    # The table moves along z: IPP steps have no x/y component (PS3.3 C.7.6.2.1.1).
    np.testing.assert_allclose(steps[:, :2], 0.0, atol=1e-6)


def test_render_is_deterministic_and_fast_enough() -> None:
    spec = sample_study_spec(np.random.default_rng(9), positive_fraction=1.0)
    render_axial(spec, rows=256, n_slices=4)  # warm-up
    start = time.process_time()
    a = render_axial(spec, rows=256, n_slices=32)
    cpu = time.process_time() - start
    b = render_axial(spec, rows=256, n_slices=32)
    np.testing.assert_array_equal(a.hu, b.hu)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.hu.dtype == np.float32 and np.all(a.hu == np.rint(a.hu))
    assert cpu < 4.0, f"render_axial(256, 32 slices) took {cpu:.2f} s of CPU"
