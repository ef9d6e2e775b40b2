"""DICOMweb read side (PS3.18): QIDO-RS search and WADO-RS retrieve, so a viewer can
show what the node holds: the received series (spool) and the result series it wrote
(the SR and the overlay secondary captures under ``<data_dir>/results/<job_id>/``).

Implemented resources (PS3.18 10.4 Retrieve, 10.6 Search), under ``/dicom-web`` and
the alias ``/dicomweb`` (`triage_node.api.auth.DICOMWEB_PREFIXES`):

- ``GET /studies`` (QIDO; matching on StudyInstanceUID, PatientID, PatientName,
  AccessionNumber, StudyDate, ModalitiesInStudy; ``limit``/``offset``)
- ``GET /studies/{study}/series`` (QIDO; Modality, SeriesInstanceUID)
- ``GET /studies/{study}/series/{series}/instances`` (QIDO)
- ``GET /studies/{study}``, ``.../series/{series}`` and ``.../instances/{instance}``
  (WADO-RS, ``multipart/related; type="application/dicom"``, each object exactly as
  stored, its transfer syntax named in the part header)
- ``GET /studies/{study}/metadata``, ``.../series/{series}/metadata`` and
  ``.../instances/{instance}/metadata`` (``application/dicom+json``; Pixel Data as a
  BulkDataURI naming the instance's frames, PS3.18 F.2.6)

Frames and rendered images are in `triage_node.api.dicomweb_pixels`; which objects the
node holds is read by `triage_node.api.dicomweb_held`. Every resource
needs a viewer token.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from typing import Annotated, Any

import pydicom
from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from triage_node.api.auth import DICOMWEB_PREFIXES, require_role
from triage_node.api.deps import SessionDep
from triage_node.api.dicomweb_held import HeldInstance, HeldSeries, held_series
from triage_node.db.models import Study

#: Mounted under each of `DICOMWEB_PREFIXES` by ``create_app``.
router = APIRouter(tags=["dicomweb"])
DICOM_JSON = "application/dicom+json"
Viewer = Annotated[Any, Depends(require_role("viewer"))]


def _attr(vr: str, value: Any) -> dict[str, Any]:
    """One DICOM JSON attribute (PS3.18 F.2)."""
    if value is None or value == "" or value == []:
        return {"vr": vr}
    values = value if isinstance(value, list) else [value]
    if vr == "PN":
        values = [{"Alphabetic": str(v)} for v in values]
    return {"vr": vr, "Value": values}


def base_url(request: Request) -> str:
    """The DICOMweb root the request came in on, for RetrieveURL and BulkDataURI values."""
    path, root = request.scope["path"], request.scope.get("root_path", "")
    if root and path.startswith(root):  # servers differ on whether path includes root_path
        path = path[len(root):]
    prefix = next((p for p in DICOMWEB_PREFIXES if path.startswith(p + "/")), DICOMWEB_PREFIXES[0])
    return str(request.base_url).rstrip("/") + prefix


def study_or_404(session: Session, study_uid: str) -> Study:
    study = session.scalars(select(Study).where(Study.study_uid == study_uid)).one_or_none()
    if study is None:
        raise HTTPException(404, "no such study")
    return study


def series_or_404(session: Session, study: Study, series_uid: str) -> HeldSeries:
    for series in held_series(session, study):
        if series.series_uid == series_uid:
            return series
    raise HTTPException(404, "no such series")


# -- QIDO-RS --------------------------------------------------------------------------
def _study_json(study: Study, series: list[HeldSeries], base: str) -> dict[str, Any]:
    modalities = sorted({s.modality for s in series if s.modality})
    return {
        "00080020": _attr("DA", study.study_date),
        "00080050": _attr("SH", study.accession_number),
        "00080061": _attr("CS", modalities),
        "00081030": _attr("LO", study.study_description),
        "00081190": _attr("UR", f"{base}/studies/{study.study_uid}"),
        "00100010": _attr("PN", study.patient_name),
        "00100020": _attr("LO", study.patient_id),
        "0020000D": _attr("UI", study.study_uid),
        "00201206": _attr("IS", len(series)),
        "00201208": _attr("IS", sum(len(s.instances) for s in series)),
    }


def _match(value: str | None, wanted: str | None) -> bool:
    """QIDO matching: exact, or ``*``/``?`` wildcards (PS3.4 C.2.2.2.4), case-sensitive."""
    if wanted is None or wanted == "":
        return True
    if value is None:
        return False
    import fnmatch

    return fnmatch.fnmatchcase(value, wanted) if any(c in wanted for c in "*?") else value == wanted


def _sql_match(column: Any, wanted: str) -> Any:
    """QIDO wildcard matching in SQL: ``*`` and ``?`` become ``%`` and ``_``."""
    if not any(c in wanted for c in "*?"):
        return column == wanted
    escaped = wanted.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return column.like(escaped.replace("*", "%").replace("?", "_"), escape="\\")


def _date_match(value: str | None, wanted: str | None) -> bool:
    """Single date or ``from-to`` range (PS3.4 C.2.2.2.5)."""
    if not wanted:
        return True
    if value is None:
        return False
    if "-" in wanted:
        lo, _, hi = wanted.partition("-")
        return (not lo or value >= lo) and (not hi or value <= hi)
    return value == wanted


@router.get("/studies", summary="QIDO-RS: search for studies")
def search_studies(
    request: Request,
    session: SessionDep,
    _p: Viewer,
    StudyInstanceUID: str | None = None,  # noqa: N803 - DICOM keywords as query names
    PatientID: str | None = None,  # noqa: N803
    PatientName: str | None = None,  # noqa: N803
    AccessionNumber: str | None = None,  # noqa: N803
    StudyDate: str | None = None,  # noqa: N803
    ModalitiesInStudy: str | None = None,  # noqa: N803
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> Response:
    stmt = select(Study).order_by(Study.received_at.desc(), Study.id.desc())
    if StudyInstanceUID:
        stmt = stmt.where(Study.study_uid.in_(StudyInstanceUID.split(",")))
    for column, wanted in ((Study.patient_id, PatientID), (Study.accession_number, AccessionNumber)):
        if wanted:
            stmt = stmt.where(_sql_match(column, wanted))
    if PatientName:
        # PN matching is case-insensitive at most sites (PS3.4 C.2.2.2.1); viewers'
        # study lists send ``*text*``.
        stmt = stmt.where(_sql_match(func.lower(Study.patient_name), PatientName.lower()))
    base = base_url(request)
    out = []
    # Series are looked at only for candidates, and only until the page is full.
    for study in session.scalars(stmt):
        if not _date_match(study.study_date, StudyDate):
            continue
        series = held_series(session, study)
        if ModalitiesInStudy and ModalitiesInStudy not in {s.modality for s in series}:
            continue
        out.append(_study_json(study, series, base))
        if len(out) >= offset + limit:
            break
    page = out[offset : offset + limit]
    return JSONResponse(page, media_type=DICOM_JSON) if page else Response(status_code=204)


def _series_json(study_uid: str, series: HeldSeries, base: str) -> dict[str, Any]:
    return {
        "00080060": _attr("CS", series.modality),
        "0008103E": _attr("LO", series.description),
        "00081190": _attr("UR", f"{base}/studies/{study_uid}/series/{series.series_uid}"),
        "0020000D": _attr("UI", study_uid),
        "0020000E": _attr("UI", series.series_uid),
        "00200011": _attr("IS", series.series_number),
        "00201209": _attr("IS", len(series.instances)),
    }


@router.get("/studies/{study_uid}/series", summary="QIDO-RS: series of a study")
def search_series(
    study_uid: str,
    request: Request,
    session: SessionDep,
    _p: Viewer,
    Modality: str | None = None,  # noqa: N803
    SeriesInstanceUID: str | None = None,  # noqa: N803
) -> Response:
    study = study_or_404(session, study_uid)
    base = base_url(request)
    out = [
        _series_json(study_uid, s, base)
        for s in held_series(session, study)
        if _match(s.modality, Modality) and _match(s.series_uid, SeriesInstanceUID)
    ]
    return JSONResponse(out, media_type=DICOM_JSON) if out else Response(status_code=204)


@router.get("/studies/{study_uid}/series/{series_uid}/instances", summary="QIDO-RS: instances of a series")
def search_instances(study_uid: str, series_uid: str, request: Request, session: SessionDep,
                     _p: Viewer) -> Response:
    series = series_or_404(session, study_or_404(session, study_uid), series_uid)
    base = base_url(request)
    out = [
        {
            "00080016": _attr("UI", i.sop_class_uid),
            "00080018": _attr("UI", i.sop_uid),
            "00081190": _attr("UR", f"{base}/studies/{study_uid}/series/{series_uid}/instances/{i.sop_uid}"),
            "0020000D": _attr("UI", study_uid),
            "0020000E": _attr("UI", series_uid),
            "00200013": _attr("IS", i.instance_number),
        }
        for i in series.instances
    ]
    return JSONResponse(out, media_type=DICOM_JSON) if out else Response(status_code=204)


# -- WADO-RS --------------------------------------------------------------------------
def transfer_syntax(instance: HeldInstance) -> str:
    if instance.transfer_syntax:
        return instance.transfer_syntax
    meta = pydicom.filereader.read_file_meta_info(instance.path)
    return str(meta.TransferSyntaxUID)


def _multipart(instances: Iterable[HeldInstance], boundary: str) -> Iterator[bytes]:
    for instance in instances:
        yield (
            f"--{boundary}\r\nContent-Type: application/dicom; transfer-syntax={transfer_syntax(instance)}"
            f"\r\nContent-Location: {instance.sop_uid}\r\n\r\n"
        ).encode()
        yield instance.path.read_bytes()
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def _retrieve(instances: list[HeldInstance]) -> StreamingResponse:
    for instance in instances:
        if not instance.path.is_file():
            raise HTTPException(410, f"object {instance.sop_uid} is no longer on disk")
    boundary = uuid.uuid4().hex
    media = f'multipart/related; type="application/dicom"; boundary={boundary}'
    return StreamingResponse(_multipart(instances, boundary), media_type=media)


@router.get("/studies/{study_uid}", summary="WADO-RS: retrieve a study")
def retrieve_study(study_uid: str, session: SessionDep, _p: Viewer) -> StreamingResponse:
    series = held_series(session, study_or_404(session, study_uid))
    return _retrieve([i for s in series for i in s.instances])


@router.get("/studies/{study_uid}/series/{series_uid}", summary="WADO-RS: retrieve a series")
def retrieve_series(study_uid: str, series_uid: str, session: SessionDep, _p: Viewer) -> StreamingResponse:
    return _retrieve(series_or_404(session, study_or_404(session, study_uid), series_uid).instances)


def instance_or_404(session: Session, study_uid: str, series_uid: str, sop_uid: str) -> HeldInstance:
    series = series_or_404(session, study_or_404(session, study_uid), series_uid)
    for instance in series.instances:
        if instance.sop_uid == sop_uid:
            return instance
    raise HTTPException(404, "no such instance")


@router.get("/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}",
            summary="WADO-RS: retrieve an instance")
def retrieve_instance(study_uid: str, series_uid: str, sop_uid: str, session: SessionDep,
                      _p: Viewer) -> StreamingResponse:
    return _retrieve([instance_or_404(session, study_uid, series_uid, sop_uid)])


def instance_url(base: str, study_uid: str, instance: HeldInstance) -> str:
    return f"{base}/studies/{study_uid}/series/{instance.series_uid}/instances/{instance.sop_uid}"


def _metadata(instance: HeldInstance, study_uid: str, base: str) -> dict[str, Any]:
    """The instance as DICOM JSON, Pixel Data replaced by a BulkDataURI (PS3.18 F.2.6).

    The URI names the instance's frames (``.../frames/1,2,...``), which a viewer fetches
    as ``application/octet-stream`` parts; large values are read only when asked for.
    """
    if not instance.path.is_file():
        raise HTTPException(410, f"object {instance.sop_uid} is no longer on disk")
    ds = pydicom.dcmread(instance.path, defer_size=1024)
    has_pixels = "PixelData" in ds
    if has_pixels:
        del ds.PixelData
    out = ds.to_json_dict()
    if has_pixels:
        frames = ",".join(str(n) for n in range(1, int(ds.get("NumberOfFrames") or 1) + 1))
        encapsulated = pydicom.uid.UID(transfer_syntax(instance)).is_compressed
        vr = "OB" if encapsulated or int(ds.get("BitsAllocated") or 8) <= 8 else "OW"
        out["7FE00010"] = {"vr": vr, "BulkDataURI": f"{instance_url(base, study_uid, instance)}/frames/{frames}"}
    return out


def _metadata_response(instances: Iterable[HeldInstance], study_uid: str, request: Request) -> Response:
    base = base_url(request)
    return JSONResponse([_metadata(i, study_uid, base) for i in instances], media_type=DICOM_JSON)


@router.get("/studies/{study_uid}/metadata", summary="WADO-RS: study metadata")
def study_metadata(study_uid: str, request: Request, session: SessionDep, _p: Viewer) -> Response:
    series = held_series(session, study_or_404(session, study_uid))
    return _metadata_response((i for s in series for i in s.instances), study_uid, request)


@router.get("/studies/{study_uid}/series/{series_uid}/metadata", summary="WADO-RS: series metadata")
def series_metadata(study_uid: str, series_uid: str, request: Request, session: SessionDep,
                    _p: Viewer) -> Response:
    series = series_or_404(session, study_or_404(session, study_uid), series_uid)
    return _metadata_response(series.instances, study_uid, request)


@router.get("/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}/metadata",
            summary="WADO-RS: instance metadata")
def instance_metadata(study_uid: str, series_uid: str, sop_uid: str, request: Request,
                      session: SessionDep, _p: Viewer) -> Response:
    instance = instance_or_404(session, study_uid, series_uid, sop_uid)
    return _metadata_response([instance], study_uid, request)


__all__ = [
    "DICOM_JSON", "Viewer", "base_url", "instance_or_404", "instance_url", "router", "transfer_syntax",
]
