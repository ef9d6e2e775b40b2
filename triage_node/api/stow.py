"""STOW-RS: ``POST /dicom-web/studies[/{study}]`` (PS3.18 10.5, Store Transaction).

The request is ``multipart/related; type="application/dicom"`` (PS3.18 8.6.1.2): each
part one Part 10 file. The body is parsed as it streams in (python-multipart), and
each part goes through the same `InstanceStore.store` as a C-STORE (validation,
durable spool, rows, audit), so nothing is acknowledged before it is on disk.

The response (PS3.18 10.5.3, Table 10.5.3-1/2) is ``application/dicom+json`` with
ReferencedSOPSequence (0008,1199) for stored instances, FailedSOPSequence (0008,1198)
with FailureReason (0008,1197) for the others, and RetrieveURL (0008,1190) of the
study and of each stored instance. HTTP status: 200 when every instance was stored,
202 when some failed, 409 when all failed, 415 for a content type other than
multipart/related of application/dicom, 400 for a body that is not valid multipart,
413 for a part larger than ``max_object_mb`` (deflated parts: once inflated), 503 with
Retry-After while ``max_stow_requests`` requests are already being received.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from io import BytesIO
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydicom import dcmread
from pydicom.errors import BytesLengthException, InvalidDicomError
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from triage_node.api.deps import Sender
from triage_node.api.dicomweb_read import base_url
from triage_node.db import audit
from triage_node.db.session import transaction
from triage_node.dicom_status import StoreStatus
from triage_node.ingest.header import OBJECT_TOO_LARGE
from triage_node.ingest.inflate import is_deflated, meta_sop_uids
from triage_node.logs import get_logger

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

log = get_logger(__name__)

#: Mounted under each of `triage_node.api.auth.DICOMWEB_PREFIXES` by ``create_app``.
router = APIRouter(tags=["dicomweb"])

DICOM_JSON = "application/dicom+json"
#: FailureReason values (PS3.18 Table 10.5.3-3 refers to the PS3.4 status codes).
CANNOT_UNDERSTAND = StoreStatus.CANNOT_UNDERSTAND
#: The instance's StudyInstanceUID differs from the study in the request URL
#: (PS3.18 10.5.1.1.1): "Error: Data Set does not match SOP Class".
STUDY_UID_MISMATCH = StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
PROCESSING_FAILURE = StoreStatus.PROCESSING_FAILURE
#: Seconds a client is asked to wait when ``max_stow_requests`` are under way.
BUSY_RETRY_AFTER_S = 5


class StowError(Exception):
    """A request-level failure, turned into an HTTP status once (STYLE.md 11)."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


@dataclass
class _Part:
    headers: dict[str, str]
    data: bytes


@dataclass
class _Collector:
    """python-multipart callbacks that collect finished parts."""

    #: Largest part kept in memory (``max_object_mb``); a larger one ends the request: 413.
    max_part_bytes: int
    done: list[_Part] = field(default_factory=list)
    ended: bool = False
    _headers: dict[str, str] = field(default_factory=dict)
    _field: bytearray = field(default_factory=bytearray)
    _value: bytearray = field(default_factory=bytearray)
    _data: bytearray = field(default_factory=bytearray)

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._begin,
            "on_header_field": lambda d, s, e: self._field.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._value.extend(d[s:e]),
            "on_header_end": self._header_end,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _begin(self) -> None:
        self._headers, self._data = {}, bytearray()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        self._data.extend(data[start:end])
        if len(self._data) > self.max_part_bytes:
            raise StowError(
                413, f"a part is larger than {self.max_part_bytes // 2**20} MiB (max_object_mb)"
            )

    def _header_end(self) -> None:
        self._headers[self._field.decode("latin-1").strip().lower()] = (
            self._value.decode("latin-1").strip()
        )
        self._field, self._value = bytearray(), bytearray()

    def _part_end(self) -> None:
        self.done.append(_Part(self._headers, bytes(self._data)))
        self._data = bytearray()

    def _end(self) -> None:
        self.ended = True


def check_content_type(content_type: str | None) -> bytes:
    """The multipart boundary, or `StowError` 415/400 (PS3.18 10.5.1.2)."""
    if not content_type:
        raise StowError(415, "Content-Type must be multipart/related; type=\"application/dicom\"")
    media, params = parse_options_header(content_type)
    if media.lower() != b"multipart/related":
        raise StowError(415, f"unsupported media type {media.decode('latin-1')!r}")
    kind = params.get(b"type", b"application/dicom").strip().lower()
    if kind != b"application/dicom":
        raise StowError(
            415, f"unsupported type {kind.decode('latin-1')!r}: only application/dicom parts"
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise StowError(400, "multipart boundary missing")
    if len(boundary) > 70:  # RFC 2046 5.1.1
        raise StowError(400, "multipart boundary longer than 70 characters")
    return boundary


def as_part10(data: bytes) -> bytes:
    """Add the 128-byte preamble and ``DICM`` prefix (PS3.10 7.1) when a part starts
    directly with its File Meta Information (group 0002), as some STOW clients send
    it (e.g. pydicom's ``dcmwrite`` of a dataset without a preamble). The encoded meta
    and dataset bytes are kept exactly as sent."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        return data
    if data[:2] == b"\x02\x00" and data[4:6] in (b"UL", b"OB", b"UI"):
        return b"\x00" * 128 + b"DICM" + data
    return data


def _attr(vr: str, value: Any) -> dict[str, Any]:
    return {"vr": vr, "Value": [value]}


def _header_uids(data: bytes) -> tuple[str | None, str | None, str | None]:
    """(StudyInstanceUID, SOPClassUID, SOPInstanceUID) of a part, as far as readable.

    Of a deflated part only the file meta is read (pydicom would inflate the whole data
    set, without a bound): the store inflates it within the limit and checks its study.
    """
    try:
        if is_deflated(data):
            return (None, *meta_sop_uids(data))
        ds = dcmread(BytesIO(data), stop_before_pixels=True,
                     specific_tags=["StudyInstanceUID", "SOPClassUID", "SOPInstanceUID"])
        # Values are converted on access: a malformed one raises here, not in the caller.
        meta = getattr(ds, "file_meta", None)
        sop_class = ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta else None)
        sop_uid = ds.get("SOPInstanceUID") or (
            meta.get("MediaStorageSOPInstanceUID") if meta else None
        )
        study = ds.get("StudyInstanceUID")
    except (InvalidDicomError, ValueError, TypeError, EOFError, OSError, KeyError,
            AttributeError, IndexError, NotImplementedError, BytesLengthException,
            RecursionError, OverflowError, struct.error):
        return None, None, None  # the store refuses it with the matching status
    return (str(study) if study else None, str(sop_class) if sop_class else None,
            str(sop_uid) if sop_uid else None)


@dataclass
class StowResult:
    referenced: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    studies: set[str] = field(default_factory=set)
    series: set[str] = field(default_factory=set)
    duplicates: int = 0

    def fail(self, sop_class: str | None, sop_uid: str | None, reason: int) -> None:
        item: dict[str, Any] = {"00081197": _attr("US", int(reason))}
        if sop_class:
            item["00081150"] = _attr("UI", sop_class)
        if sop_uid:
            item["00081155"] = _attr("UI", sop_uid)
        self.failed.append(item)


def _store_part(
    part: _Part, store: Any, principal_name: str, peer: str, base: str,
    target_study: str | None, result: StowResult,
) -> None:
    """Store one part and add its Referenced/Failed SOP item (runs in a worker thread)."""
    media = parse_options_header(part.headers.get("content-type", "application/dicom"))[0]
    part.data = as_part10(part.data)
    study, sop_class, sop_uid = _header_uids(part.data)
    if media.lower() != b"application/dicom":
        result.fail(sop_class, sop_uid, CANNOT_UNDERSTAND)
        return
    if target_study is not None and study is not None and study != target_study:
        result.fail(sop_class, sop_uid, STUDY_UID_MISMATCH)
        return
    outcome = store.store(part.data, calling_ae=principal_name[:16], peer=peer, source="stow",
                          expected_study=target_study)
    if outcome.status == OBJECT_TOO_LARGE:  # a deflated part, past the limit once inflated
        raise StowError(413, f"{outcome.reason}: the request ends here")
    if not outcome.stored:
        result.fail(getattr(outcome, "sop_class_uid", None) or sop_class,
                    outcome.sop_uid or sop_uid, outcome.status or PROCESSING_FAILURE)
        return
    sop_class = getattr(outcome, "sop_class_uid", None) or sop_class
    url = (f"{base}/studies/{outcome.study_uid}/series/{outcome.series_uid}"
           f"/instances/{outcome.sop_uid}")
    result.referenced.append({
        "00081150": _attr("UI", sop_class),
        "00081155": _attr("UI", outcome.sop_uid),
        "00081190": _attr("UR", url),
    })
    result.studies.add(outcome.study_uid)
    if outcome.duplicate:
        result.duplicates += 1
    else:
        result.series.add(outcome.series_uid)


class StowSlots:
    """At most ``limit`` STOW-RS requests receiving at once (``max_stow_requests``).

    Each request holds its part bodies in memory and a thread while it stores them; as
    ``max_associations`` does for the DICOM port, the cap keeps a flood of slow or large
    requests from taking the node's memory and threads. Used from the event loop only,
    so the count needs no lock.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    def take(self) -> bool:
        if self.active >= self.limit:
            return False
        self.active += 1
        return True

    def give_back(self) -> None:
        self.active -= 1


def _slots(state: Any) -> StowSlots:
    slots = getattr(state, "stow_slots", None)
    if slots is None:  # no await between the look and the set: one per app
        slots = state.stow_slots = StowSlots(state.store.settings.max_stow_requests)
    return slots


async def _stow(request: Request, principal: Any, target_study: str | None) -> Response:
    slots = _slots(request.app.state)
    if not slots.take():
        detail = f"{slots.limit} STOW-RS requests are under way (max_stow_requests); retry later"
        log.warning("stow.busy", active=slots.active, limit=slots.limit)
        await run_in_threadpool(_audit, request.app.state.session_factory, principal, StowResult(),
                                503, target_study, detail)
        return JSONResponse({"detail": detail}, status_code=503,
                            headers={"Retry-After": str(BUSY_RETRY_AFTER_S)})
    try:
        return await _receive(request, principal, target_study)
    finally:
        slots.give_back()


async def _receive(request: Request, principal: Any, target_study: str | None) -> Response:
    state = request.app.state
    store, tracker = state.store, getattr(state, "tracker", None)
    peer = request.client.host if request.client else "unknown"
    base = base_url(request)  # RetrieveURLs name the prefix the request came in on
    result = StowResult()
    try:
        boundary = check_content_type(request.headers.get("content-type"))
        collector = _Collector(max_part_bytes=store.settings.max_object_mb * 2**20)
        parser = MultipartParser(boundary, collector.callbacks())
        try:
            async for chunk in request.stream():
                parser.write(chunk)
                while collector.done:
                    part = collector.done.pop(0)
                    await run_in_threadpool(_store_part, part, store, principal.name, peer,
                                            base, target_study, result)
            parser.finalize()
        except MultipartParseError as exc:
            raise StowError(400, f"malformed multipart body: {exc}") from None
        except ClientDisconnect:
            # Audited and logged like any ended request; the parts stored stay stored.
            raise StowError(400, "client disconnected before the end of the body") from None
        for part in collector.done:
            await run_in_threadpool(_store_part, part, store, principal.name, peer, base,
                                    target_study, result)
        if not collector.ended:
            raise StowError(400, "multipart body ends before its closing boundary")
        if not result.referenced and not result.failed:
            raise StowError(400, "no parts in the multipart body")
    except StowError as exc:
        await run_in_threadpool(_audit, state.session_factory, principal, result, exc.status_code,
                                target_study, exc.detail)
        log.warning("stow.refused", status=exc.status_code, detail=exc.detail)
        stored_series = sorted(result.series)
        if tracker is not None and stored_series:
            await run_in_threadpool(tracker.association_finished, stored_series)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)
    if tracker is not None and result.series:
        # The end of the request is the end of the "association" (fast path).
        await run_in_threadpool(tracker.association_finished, sorted(result.series))
    body: dict[str, Any] = {}
    studies = {target_study} if target_study else result.studies
    if len(studies) == 1 and result.referenced:
        body["00081190"] = _attr("UR", f"{base}/studies/{next(iter(studies))}")
    if result.referenced:
        body["00081199"] = {"vr": "SQ", "Value": result.referenced}
    if result.failed:
        body["00081198"] = {"vr": "SQ", "Value": result.failed}
    status = 200 if not result.failed else (202 if result.referenced else 409)
    await run_in_threadpool(_audit, state.session_factory, principal, result, status,
                            target_study, None)
    log.info("stow.done", status=status, stored=len(result.referenced),
             failed=len(result.failed), duplicates=result.duplicates)
    return JSONResponse(body, status_code=status, media_type=DICOM_JSON)


def _audit(session_factory: Any, principal: Any, result: StowResult, status: int,
           target_study: str | None, error: str | None) -> None:
    outcome = "ok" if status == 200 else ("partial" if status == 202 else "error")
    with transaction(session_factory) as session:
        audit.record(
            session, "stow.request", actor=principal.actor, outcome=outcome,
            study_uid=target_study or (next(iter(result.studies)) if len(result.studies) == 1
                                       else None),
            http_status=status, stored=len(result.referenced), failed=len(result.failed),
            duplicates=result.duplicates, studies=len(result.studies), error=error,
        )


@router.post(
    "/studies",
    summary="STOW-RS: store instances (PS3.18 10.5)",
    response_class=JSONResponse,
    responses={200: {"content": {DICOM_JSON: {}}}, 202: {"description": "some failed"},
               409: {"description": "all failed"}, 413: {"description": "a part too large"},
               415: {"description": "wrong media type"},
               503: {"description": "max_stow_requests under way; see Retry-After"}},
)
async def store_instances(request: Request, principal: Sender) -> Response:
    return await _stow(request, principal, None)


@router.post(
    "/studies/{study_uid}",
    summary="STOW-RS: store instances of one study (PS3.18 10.5)",
    response_class=JSONResponse,
    responses={200: {"content": {DICOM_JSON: {}}}, 202: {"description": "some failed"},
               409: {"description": "all failed"}, 413: {"description": "a part too large"},
               415: {"description": "wrong media type"},
               503: {"description": "max_stow_requests under way; see Retry-After"}},
)
async def store_study_instances(study_uid: str, request: Request, principal: Sender) -> Response:
    return await _stow(request, principal, study_uid)
