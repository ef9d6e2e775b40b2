"""Result objects on disk: the SR and overlays the worker wrote under
``<data_dir>/results/<job_id>/``, for the study page and DICOMweb reads.

Kept apart from ``triage_node.worklist.queries``: these are found by reading the files'
headers (cached by folder modification time), not by a query; only the job's folder
comes from the database.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from triage_node.db.models import Result, Study

__all__ = ["ObjectRef", "result_objects", "study_objects"]


@dataclass(frozen=True)
class ObjectRef:
    """One DICOM object the node wrote: where it is and what it is."""

    path: Path
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    modality: str | None
    instance_number: int | None
    job_id: int


_OBJECT_CACHE: dict[str, tuple[float, list[ObjectRef]]] = {}


def _scan_output_dir(folder: Path, job_id: int) -> list[ObjectRef]:
    import pydicom

    try:
        mtime = folder.stat().st_mtime
    except OSError:
        return []
    key = str(folder)
    cached = _OBJECT_CACHE.get(key)
    if cached and cached[0] == mtime:
        return cached[1]
    refs = []
    for path in sorted(folder.glob("*.dcm")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (OSError, pydicom.errors.InvalidDicomError):
            continue
        number = ds.get("InstanceNumber")
        refs.append(
            ObjectRef(
                path=path,
                study_uid=str(ds.StudyInstanceUID),
                series_uid=str(ds.SeriesInstanceUID),
                sop_uid=str(ds.SOPInstanceUID),
                sop_class_uid=str(ds.SOPClassUID),
                modality=str(ds.get("Modality") or "") or None,
                instance_number=int(number) if number not in (None, "") else None,
                job_id=job_id,
            )
        )
    if len(_OBJECT_CACHE) > 1000:
        _OBJECT_CACHE.clear()
    _OBJECT_CACHE[key] = (mtime, refs)
    return refs


def result_objects(results: Iterable[Result]) -> list[ObjectRef]:
    """SR and overlay objects of ``results`` found in their output folders."""
    out: list[ObjectRef] = []
    for result in results:
        if result.output_dir:
            out.extend(_scan_output_dir(Path(result.output_dir), result.job_id))
    return out


def study_objects(session: Session, study_uid: str) -> list[ObjectRef]:
    """All result objects of one study (every job version)."""
    stmt = select(Result).join(Study, Study.id == Result.study_id).where(Study.study_uid == study_uid)
    return [o for o in result_objects(session.scalars(stmt)) if o.study_uid == study_uid]
