"""Geometry of a series from its recorded attributes: plane, slice spacing, field of view.

Series selection uses these when ImageType (0008,0008) is absent, as in de-identified
research exports: an axial stack of a head is recognised by ImageOrientationPatient
(PS3.3 C.7.6.2.1.1), evenly spaced ImagePositionPatient along the slice normal and
Rows x PixelSpacing (C.7.6.3, C.7.6.2.1.1) of a head's size.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass

from triage_node.db.models import Series

__all__ = ["Plane", "field_of_view", "orientation", "plane", "slice_spacing"]


def orientation(text: str | None) -> tuple[float, ...] | None:
    """ImageOrientationPatient as recorded (six backslash-separated values), or None."""
    if not text:
        return None
    try:
        values = tuple(float(v) for v in text.split("\\"))
    except ValueError:
        return None
    if len(values) != 6 or not all(math.isfinite(v) for v in values):
        return None
    return values


@dataclass(frozen=True)
class Plane:
    """The slice plane: how far the slice normal is from each patient axis, in degrees."""

    from_axial: float
    from_coronal: float
    from_sagittal: float

    @property
    def name(self) -> str:
        """The nearest standard plane (the normal of an axial slice is the z axis)."""
        nearest = min((self.from_axial, "axial"), (self.from_coronal, "coronal"),
                      (self.from_sagittal, "sagittal"))
        return nearest[1]


def plane(cosines: tuple[float, ...]) -> Plane | None:
    """Angles of the slice normal (row cosines x column cosines) from the patient axes."""
    r, c = cosines[:3], cosines[3:]
    n = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    norm = math.sqrt(sum(v * v for v in n))
    if norm < 1e-6:
        return None  # row and column directions parallel: not an image plane

    def angle(component: float) -> float:
        return math.degrees(math.acos(min(1.0, abs(component) / norm)))

    return Plane(from_axial=angle(n[2]), from_coronal=angle(n[1]), from_sagittal=angle(n[0]))


def slice_spacing(positions: Iterable[float | None]) -> tuple[float | None, float | None]:
    """(median gap, largest departure of a gap from it) between sorted slice positions, in mm.

    (None, None) when fewer than two slices, or any slice, have a position.
    """
    values = list(positions)
    if len(values) < 2 or any(v is None for v in values):
        return None, None
    ordered = sorted(float(v) for v in values if v is not None)
    gaps = [b - a for a, b in zip(ordered, ordered[1:], strict=False)]
    median = statistics.median(gaps)
    return median, max(abs(g - median) for g in gaps)


def field_of_view(series: Series) -> tuple[float, float] | None:
    """(Rows x row spacing, Columns x column spacing) in mm, or None when unknown."""
    if not (series.rows and series.columns and series.pixel_spacing_row and series.pixel_spacing_column):
        return None
    return series.rows * series.pixel_spacing_row, series.columns * series.pixel_spacing_column
