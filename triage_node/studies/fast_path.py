"""The fast path's test: does a series look complete at association release?

A series is complete when its InstanceNumbers (0020,0013) are contiguous, its slice
positions (ImagePositionPatient projected on the slice normal, PS3.3 C.7.6.2.1.1) are
evenly spaced, and the count equals NumberOfSeriesRelatedInstances (0020,1209) /
ImagesInAcquisition (0020,1002) where the sender gave one.

Kept apart from ``triage_node.studies.completeness``, which decides when to ask (at
association release, or after the stability timer) and what follows (selection, jobs,
the queue): the test is a pure function of the series' statistics, read once per series
by `series_stats`, and is tested on its own.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from triage_node.db.models import Instance
from triage_node.timeutil import as_utc

#: Relative tolerance on slice spacing for the fast path (plus `SPACING_ABS_MM`).
SPACING_REL_TOLERANCE = 0.02
SPACING_ABS_MM = 0.01


@dataclass(frozen=True)
class SeriesStats:
    """The latest version of each instance of a series, as needed for completeness."""

    count: int
    instance_numbers: list[int | None]
    positions: list[float | None]
    last_received_at: datetime | None


def series_stats(session: Session, series_id: int) -> SeriesStats:
    rows = session.execute(
        select(
            Instance.sop_uid,
            Instance.version,
            Instance.instance_number,
            Instance.slice_position,
            Instance.received_at,
        ).where(Instance.series_id == series_id)
    ).all()
    latest: dict[str, Any] = {}
    for row in rows:
        if row.sop_uid not in latest or row.version > latest[row.sop_uid].version:
            latest[row.sop_uid] = row
    received = [as_utc(r.received_at) for r in rows if r.received_at is not None]
    return SeriesStats(
        count=len(latest),
        instance_numbers=[r.instance_number for r in latest.values()],
        positions=[r.slice_position for r in latest.values()],
        last_received_at=max(received) if received else None,
    )


def fast_path_complete(stats: SeriesStats, expected: int | None) -> tuple[bool, str]:
    """Whether a series looks complete at association release, and why (not).

    Parameters
    ----------
    stats : SeriesStats
        From `series_stats`.
    expected : int or None
        NumberOfSeriesRelatedInstances / ImagesInAcquisition when the sender gave it.
    """
    n = stats.count
    if n == 0:
        return False, "no instances"
    if expected is not None and expected > 0 and n != expected:
        return False, f"{n} of {expected} expected instances"
    numbers = [v for v in stats.instance_numbers if v is not None]
    if len(numbers) != len(stats.instance_numbers):
        return False, "instance numbers missing"
    unique = sorted(set(numbers))
    if len(unique) != n:
        return False, "instance numbers repeat"
    if unique[-1] - unique[0] + 1 != n:
        return False, f"instance numbers {unique[0]}..{unique[-1]} have gaps"
    if n >= 2:
        positions = sorted(p for p in stats.positions if p is not None)
        if len(positions) != len(stats.positions):
            return False, "slice positions missing"
        gaps = [b - a for a, b in zip(positions, positions[1:], strict=False)]
        spacing = statistics.median(gaps)
        if spacing <= SPACING_ABS_MM:
            return False, "slices share a position"
        tolerance = SPACING_ABS_MM + SPACING_REL_TOLERANCE * spacing
        worst = max(abs(g - spacing) for g in gaps)
        if worst > tolerance:
            return False, f"slice spacing uneven (median {spacing:.3f} mm, off by {worst:.3f} mm)"
    return True, "contiguous instance numbers, even spacing"
