"""``/api/studies/{StudyInstanceUID}``: what the node found, and PNG renders of its overlays."""

from __future__ import annotations

import io
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Query, Response
from pydantic import BaseModel, Field

from triage_node.api.auth import require_role
from triage_node.api.deps import Admin, SessionDep, SessionFactoryDep
from triage_node.db.models import Job, Result
from triage_node.retention.hold import UnknownStudy, set_legal_hold
from triage_node.timeutil import as_utc
from triage_node.worklist.queries import study_detail
from triage_node.worklist.result_files import ObjectRef, study_objects

router = APIRouter(tags=["studies"])

#: Structured Report storage SOP classes (PS3.4 B.5) share this prefix.
SR_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."

#: Job timestamps in pipeline order; a stage's time is the gap to the previous stamp.
STAGES = (
    ("last_instance_at", None),
    ("series_complete_at", "completeness"),
    ("enqueued_at", "enqueue"),
    ("started_at", "queue_wait"),
    ("inferred_at", "inference"),
    ("reported_at", "reporting"),
    ("delivered_at", "delivery"),
)


class SeriesOut(BaseModel):
    series_uid: str
    series_number: int | None
    modality: str | None
    description: str | None
    instance_count: int
    state: str
    selection: str | None
    selection_reason: str | None


class ObjectOut(BaseModel):
    sop_uid: str
    series_uid: str
    kind: str = Field(description="sr or overlay")
    png_url: str | None
    wado_url: str


class ResultOut(BaseModel):
    job_id: int
    version: int
    state: str
    series_uid: str | None
    error: str | None
    positive: bool | None
    probabilities: dict[str, float]
    decisions: dict[str, bool]
    key_slices: dict[str, Any]
    model_name: str | None
    model_version: str | None
    operating_point: str | None
    sr_sop_uid: str | None
    sr_series_uid: str | None
    overlay_series_uid: str | None
    objects: list[ObjectOut]
    stage_seconds: dict[str, float] = Field(description="Seconds spent in each pipeline stage")
    total_seconds: float | None = Field(description="Last instance received to result reported")
    created_at: datetime


class StudyOut(BaseModel):
    study_uid: str
    patient_name: str | None
    patient_id: str | None
    accession_number: str | None
    study_date: str | None
    study_description: str | None
    modality: str | None
    received_at: datetime
    worklist_id: int | None
    status: str | None
    priority_class: str | None
    manual_priority_class: str | None
    manual_set_by: str | None
    score: float | None
    series: list[SeriesOut]
    results: list[ResultOut] = Field(description="All job versions, newest first")



def stage_seconds(job: Job) -> tuple[dict[str, float], float | None]:
    """Per-stage durations from the job's timestamps, and the end-to-end time."""
    out: dict[str, float] = {}
    previous = as_utc(job.last_instance_at)
    for attr, stage in STAGES:
        stamp = as_utc(getattr(job, attr))
        if stamp is None:
            continue
        if stage is not None and previous is not None:
            out[stage] = round((stamp - previous).total_seconds(), 3)
        previous = stamp
    start, end = as_utc(job.last_instance_at), as_utc(job.reported_at)
    total = round((end - start).total_seconds(), 3) if start and end else None
    return out, total


def object_out(study_uid: str, ref: ObjectRef, result: Result | None) -> ObjectOut:
    overlay = result is not None and ref.series_uid == result.overlay_series_uid
    return ObjectOut(
        sop_uid=ref.sop_uid,
        series_uid=ref.series_uid,
        kind="overlay" if overlay else "sr",
        png_url=f"/api/studies/{study_uid}/objects/{ref.sop_uid}.png" if overlay else None,
        wado_url=f"/dicom-web/studies/{study_uid}/series/{ref.series_uid}/instances/{ref.sop_uid}",
    )


@router.get("/api/studies/{study_uid}", response_model=StudyOut, summary="One study's results")
def get_study(
    study_uid: str,
    session: SessionDep,
    _principal: Annotated[Any, Depends(require_role("viewer"))],
) -> StudyOut:
    """Per-class probabilities and decisions, key slices, overlay images, stage timings and
    every result version of the study."""
    detail = study_detail(session, study_uid)
    if detail is None:
        raise HTTPException(404, "no such study")
    objects = study_objects(session, study_uid)
    series_uids = {s.id: s.series_uid for s in detail.series}
    results = []
    for job in sorted(detail.jobs, key=lambda j: (j.created_at, j.id), reverse=True):
        result = detail.results.get(job.id)
        stages, total = stage_seconds(job)
        results.append(
            ResultOut(
                job_id=job.id,
                version=job.version,
                state=job.state,
                series_uid=series_uids.get(job.series_id),
                error=job.error,
                positive=None if result is None else bool(result.positive),
                probabilities={c: float(p) for c, p in (result.study_probabilities or {}).items()}
                if result else {},
                decisions={c: bool(v) for c, v in (result.decisions or {}).items()} if result else {},
                key_slices=(result.key_slices or {}) if result else {},
                model_name=result.model_name if result else None,
                model_version=result.model_version if result else None,
                operating_point=result.operating_point if result else None,
                sr_sop_uid=result.sr_sop_uid if result else None,
                sr_series_uid=result.sr_series_uid if result else None,
                overlay_series_uid=result.overlay_series_uid if result else None,
                objects=[object_out(study_uid, o, result) for o in objects if o.job_id == job.id],
                stage_seconds=stages,
                total_seconds=total,
                created_at=(result.created_at if result else job.created_at),
            )
        )
    study, entry = detail.study, detail.entry
    return StudyOut(
        study_uid=study.study_uid,
        patient_name=study.patient_name,
        patient_id=study.patient_id,
        accession_number=study.accession_number,
        study_date=study.study_date,
        study_description=study.study_description,
        modality=study.modality,
        received_at=study.received_at,
        worklist_id=entry.id if entry else None,
        status=entry.status if entry else None,
        priority_class=entry.priority_class if entry else None,
        manual_priority_class=entry.manual_priority_class if entry else None,
        manual_set_by=entry.manual_set_by if entry else None,
        score=entry.score if entry else None,
        series=[
            SeriesOut(
                series_uid=s.series_uid,
                series_number=s.series_number,
                modality=s.modality,
                description=s.description,
                instance_count=s.instance_count,
                state=s.state,
                selection=s.selection,
                selection_reason=s.selection_reason,
            )
            for s in detail.series
        ],
        results=results,
    )


# -- PNG renders -------------------------------------------------------------------
def render_png(path: Path, size: int | None = None) -> bytes:
    """Render a DICOM image (an SC overlay, RGB or monochrome) to PNG with Pillow.

    Monochrome images are shown with their first VOI window (PS3.3 C.11.2) when they
    have one, else min-max; ``size`` bounds the longer side (thumbnails).
    """
    import pydicom
    from PIL import Image

    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        pixels = pixels[0]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric.startswith("YBR"):
        from pydicom.pixels import convert_color_space

        pixels = convert_color_space(pixels, photometric, "RGB")
    if pixels.ndim == 3:
        image = Image.fromarray(np.ascontiguousarray(pixels.astype(np.uint8)), "RGB")
    else:
        data = pixels.astype(np.float64) * float(ds.get("RescaleSlope", 1) or 1) + float(
            ds.get("RescaleIntercept", 0) or 0
        )
        center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
        if center is not None and width is not None:
            c = float(center[0] if isinstance(center, pydicom.multival.MultiValue) else center)
            w = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
            lo, hi = c - w / 2, c + w / 2
        else:
            lo, hi = float(data.min()), float(data.max())
        scaled = np.clip((data - lo) / max(hi - lo, 1e-6), 0, 1) * 255
        if photometric == "MONOCHROME1":
            scaled = 255 - scaled
        image = Image.fromarray(scaled.astype(np.uint8), "L")
    if size:
        image.thumbnail((size, size))
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=False)
    return out.getvalue()


def find_object(session: Any, study_uid: str, sop_uid: str) -> ObjectRef:
    for ref in study_objects(session, study_uid):
        if ref.sop_uid == sop_uid:
            return ref
    raise HTTPException(404, "no such object")


@router.get(
    "/api/studies/{study_uid}/objects/{sop_uid}.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}},
    summary="PNG render of an overlay image",
)
def get_object_png(
    study_uid: str,
    sop_uid: str,
    session: SessionDep,
    _principal: Annotated[Any, Depends(require_role("viewer"))],
    size: Annotated[int | None, Query(ge=16, le=2048)] = None,
) -> Response:
    ref = find_object(session, study_uid, sop_uid)
    if ref.modality == "SR" or ref.sop_class_uid.startswith(SR_CLASS_PREFIX):
        raise HTTPException(415, "not an image")
    return Response(
        render_png(ref.path, size),
        media_type="image/png",
        headers={"Cache-Control": "private, max-age=3600"},
    )


__all__ = ["render_png", "router", "stage_seconds"]


class LegalHoldIn(BaseModel):
    model_config = {"extra": "forbid"}

    held: bool = Field(description="True: retention never deletes the study; false: release it")
    reason: str = Field("", max_length=500, description="Why (kept in the audit row; no patient names)")


class LegalHoldOut(BaseModel):
    study_uid: str
    held: bool
    changed: bool


@router.put("/api/studies/{study_uid}/legal-hold", response_model=LegalHoldOut,
            summary="Put a study on legal hold or release it (admin)")
def put_legal_hold(
    study_uid: str, body: LegalHoldIn, factory: SessionFactoryDep, principal: Admin
) -> LegalHoldOut:
    """Audited as ``study.legal_hold`` / ``study.legal_hold_released``."""
    try:
        changed = set_legal_hold(factory, study_uid, body.held, actor=principal.actor, reason=body.reason)
    except UnknownStudy:
        raise HTTPException(404, "no such study") from None
    return LegalHoldOut(study_uid=study_uid, held=body.held, changed=changed)
