"""What the node holds, as its DICOMweb resources serve it.

The received series (the newest version of each instance in the spool) and the result
series the worker wrote (the SR and the overlay secondary captures found in each job's
result folder), per study. Kept apart from ``triage_node.api.dicomweb_read``: this reads
the database and the result folders and knows nothing of HTTP; the search, retrieve
and pixel resources (``dicomweb_read``, ``dicomweb_pixels``) all serve from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pydicom
from sqlalchemy import select
from sqlalchemy.orm import Session

from triage_node.db.models import Instance, Result, Series, Study
from triage_node.worklist.result_files import ObjectRef, result_objects

__all__ = ["HeldInstance", "HeldSeries", "held_series"]


@dataclass(frozen=True)
class HeldInstance:
    """One object the node can serve."""

    series_uid: str
    sop_uid: str
    sop_class_uid: str
    instance_number: int | None
    path: Path
    transfer_syntax: str | None


@dataclass
class HeldSeries:
    series_uid: str
    modality: str | None
    series_number: int | None
    description: str | None
    instances: list[HeldInstance]


def _spool_series(session: Session, study: Study) -> list[HeldSeries]:
    out = []
    for series in session.scalars(select(Series).where(Series.study_id == study.id).order_by(Series.id)):
        newest: dict[str, Instance] = {}
        for inst in session.scalars(
            select(Instance).where(Instance.series_id == series.id).order_by(Instance.version)
        ):
            newest[inst.sop_uid] = inst
        out.append(
            HeldSeries(
                series_uid=series.series_uid,
                modality=series.modality,
                series_number=series.series_number,
                description=series.description,
                instances=[
                    HeldInstance(series.series_uid, i.sop_uid, i.sop_class_uid, i.instance_number,
                                 Path(i.path), i.transfer_syntax)
                    for i in sorted(newest.values(), key=lambda i: (i.instance_number or 0, i.id))
                ],
            )
        )
    return out


def _result_series(session: Session, study: Study) -> list[HeldSeries]:
    refs: list[ObjectRef] = result_objects(session.scalars(select(Result).where(Result.study_id == study.id)))
    by_series: dict[str, HeldSeries] = {}
    for ref in refs:
        if ref.study_uid != study.study_uid:
            continue
        held = by_series.setdefault(
            ref.series_uid,
            HeldSeries(ref.series_uid, ref.modality, None, None, []),
        )
        if ref.sop_uid not in {i.sop_uid for i in held.instances}:
            held.instances.append(
                HeldInstance(ref.series_uid, ref.sop_uid, ref.sop_class_uid, ref.instance_number,
                             ref.path, None)
            )
    for held in by_series.values():
        if held.instances:
            first = pydicom.dcmread(held.instances[0].path, stop_before_pixels=True)
            held.series_number = int(first.SeriesNumber) if first.get("SeriesNumber") not in (None, "") else None
            held.description = str(first.get("SeriesDescription") or "") or None
    return list(by_series.values())


def held_series(session: Session, study: Study) -> list[HeldSeries]:
    """Received series first, then the node's result series."""
    spool = _spool_series(session, study)
    known = {s.series_uid for s in spool}
    return spool + [s for s in _result_series(session, study) if s.series_uid not in known]
