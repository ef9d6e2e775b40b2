"""Senders: one batch of files to one destination, over DIMSE C-STORE or STOW-RS.

Each sender returns one `SendOutcome` per file and never raises for what a peer does: the
outcome tells a delivery (``sent``), a refusal by the peer (``refused``: a C-STORE failure
status, PS3.4 B.2.3; an association rejected permanently, PS3.8 7.1.1.9; no accepted
presentation context; an HTTP 4xx or a Failed SOP Sequence item, PS3.18 10.5.3), a peer that
could not be reached or did not answer (``unreachable``: connection refused, timeout,
association aborted or rejected transiently, HTTP 5xx/408/429), and a local problem with
the file (``invalid``). The outbox (``delivery.py``) turns these into retries, refusals and
dead letters.
"""

from __future__ import annotations

import ssl
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pydicom
import requests
from dicomweb_client import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.events import EventHandlerType
from pynetdicom.status import code_to_category

from triage_node.dicom_status import StoreStatus
from triage_node.logs import get_logger
from triage_node.setting_types import Destination, DestinationKind

log = get_logger(__name__)

Outcome = Literal["sent", "refused", "unreachable", "invalid"]
#: HTTP statuses that say "try again later" rather than "no" (RFC 9110).
TRANSIENT_HTTP = {408, 425, 429}
MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: presentation context IDs are odd numbers 1..255


@dataclass(frozen=True)
class SendItem:
    """One file to send: the outbox row id, its SOP Instance UID and path."""

    item_id: int
    sop_uid: str
    study_uid: str
    path: str


@dataclass(frozen=True)
class SendOutcome:
    item_id: int
    outcome: Outcome
    status: int | None = None  # DIMSE status or HTTP status
    detail: str = ""


def send(
    destination: Destination,
    items: Sequence[SendItem],
    *,
    calling_ae: str,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
) -> list[SendOutcome]:
    """Send ``items`` to ``destination`` in one association (DIMSE) or one request per study
    (DICOMweb); one outcome per item, in order."""
    if not items:
        return []
    datasets: dict[int, Dataset] = {}
    outcomes: dict[int, SendOutcome] = {}
    for item in items:
        try:
            ds = pydicom.dcmread(item.path)
            if "SOPClassUID" not in ds:  # de-identified files: only in the File Meta
                ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
            datasets[item.item_id] = ds
        except (OSError, InvalidDicomError, AttributeError) as exc:
            outcomes[item.item_id] = SendOutcome(item.item_id, "invalid", None, f"cannot read file: {exc}")
    ready = [i for i in items if i.item_id in datasets]
    if ready:
        if destination.kind is DestinationKind.dimse:
            sent = _send_dimse(destination, ready, datasets, calling_ae, tls_cert, tls_key)
        else:
            sent = _send_dicomweb(destination, ready, datasets, tls_cert, tls_key)
        outcomes.update({o.item_id: o for o in sent})
    return [outcomes[i.item_id] for i in items]


# --------------------------------------------------------------------------- DIMSE


def ssl_context(destination: Destination, tls_cert: Path | None, tls_key: Path | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(destination.tls_ca) if destination.tls_ca else None
    )
    if tls_cert is not None and tls_key is not None:
        ctx.load_cert_chain(str(tls_cert), str(tls_key))
    return ctx


def _send_dimse(
    destination: Destination,
    items: Sequence[SendItem],
    datasets: dict[int, Dataset],
    calling_ae: str,
    tls_cert: Path | None,
    tls_key: Path | None,
) -> list[SendOutcome]:
    """C-STORE every item over one association (PS3.4 Annex B, PS3.7 9.1.1)."""
    ae = AE(ae_title=calling_ae)
    timeout = destination.timeout_s
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    # Per SOP class: one context per non-little-endian transfer syntax of the files (so
    # compressed files go as they are, byte for byte) and one for the uncompressed ones.
    native = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    syntaxes: dict[str, set[str]] = defaultdict(set)
    for ds in datasets.values():
        syntaxes[ds.SOPClassUID].add(str(ds.file_meta.TransferSyntaxUID))
    contexts: list[tuple[str, list[str]]] = []
    for sop_class, found in syntaxes.items():
        contexts.extend((sop_class, [ts]) for ts in sorted(found) if ts not in native)
        contexts.append((sop_class, list(native)))
    for sop_class, ts_list in contexts[:MAX_CONTEXTS]:
        ae.add_requested_context(sop_class, ts_list)

    received: list[object] = []
    handlers: list[EventHandlerType] = [(evt.EVT_ACSE_RECV, lambda event: received.append(event.primitive))]
    assert destination.host is not None  # Destination requires host, port and AE title for dimse
    tls_args = (ssl_context(destination, tls_cert, tls_key), destination.host) if destination.tls else None
    try:
        assoc = ae.associate(
            destination.host,
            int(destination.port or 0),
            ae_title=str(destination.ae_title),
            tls_args=tls_args,
            evt_handlers=handlers,
        )
    except (OSError, ssl.SSLError) as exc:  # e.g. TLS set-up failure before the socket opens
        return [SendOutcome(i.item_id, "unreachable", None, f"connect: {exc}") for i in items]

    if not assoc.is_established:
        outcome, detail = _association_failure(assoc, received)
        log.warning("dimse_association_failed", destination=destination.name, outcome=outcome, detail=detail)
        return [SendOutcome(i.item_id, outcome, None, detail) for i in items]

    outcomes: list[SendOutcome] = []
    try:
        for item in items:
            if not assoc.is_established:
                outcomes.append(SendOutcome(item.item_id, "unreachable", None, "association lost"))
                continue
            try:
                status = assoc.send_c_store(Path(item.path))  # sent as stored
            except ValueError as exc:  # no accepted presentation context for this SOP class
                outcomes.append(SendOutcome(item.item_id, "refused", None, f"not accepted: {exc}"))
                continue
            if "Status" not in status:  # timeout, abort or invalid response: no answer
                outcomes.append(SendOutcome(item.item_id, "unreachable", None, "no C-STORE response"))
                continue
            code = int(status.Status)
            category = code_to_category(code)
            if category in ("Success", "Warning"):
                outcomes.append(SendOutcome(item.item_id, "sent", code, category.lower()))
            elif category == "Cancel":
                outcomes.append(SendOutcome(item.item_id, "unreachable", code, "cancelled"))
            else:
                comment = str(status.get("ErrorComment", "") or "")
                outcomes.append(
                    SendOutcome(item.item_id, "refused", code, f"C-STORE status 0x{code:04X} {comment}".strip())
                )
    finally:
        if assoc.is_established:
            assoc.release()
    return outcomes


def _association_failure(assoc: object, received: list[object]) -> tuple[Outcome, str]:
    """Tell a refusal (permanent A-ASSOCIATE-RJ, no acceptable context) from no answer."""
    for primitive in received:
        result = getattr(primitive, "result", None)
        if result == 0x01:
            reason = getattr(primitive, "reason_str", "")
            return "refused", f"association rejected (permanent): {reason}"
        if result == 0x02:
            reason = getattr(primitive, "reason_str", "")
            return "unreachable", f"association rejected (transient): {reason}"
        if result == 0x00:
            return "refused", "association accepted but no presentation context"
    if getattr(assoc, "is_aborted", False):
        return "unreachable", "association aborted"
    return "unreachable", "connection failed or timed out"


# --------------------------------------------------------------------------- DICOMweb


def dicomweb_session(
    destination: Destination, tls_cert: Path | None = None, tls_key: Path | None = None
) -> requests.Session:
    """HTTP session for ``destination``: its CA, basic auth, and the node's own certificate
    for mutual TLS on https:// URLs."""
    session = requests.Session()
    session.verify = str(destination.tls_ca) if destination.tls_ca else True
    if destination.username is not None and destination.password is not None:
        session.auth = (destination.username, destination.password.get_secret_value())
    if str(destination.url).startswith("https://") and tls_cert is not None and tls_key is not None:
        session.cert = (str(tls_cert), str(tls_key))
    return session


def dicomweb_client(destination: Destination, session: requests.Session) -> DICOMwebClient:
    """DICOMweb client on ``session`` with the bearer token, if any, and no HTTP retries
    (the outbox retries, with its own backoff)."""
    headers = {}
    if destination.token is not None:
        headers["Authorization"] = f"Bearer {destination.token.get_secret_value()}"
    client = DICOMwebClient(
        url=str(destination.url), session=session, headers=headers, timeout=destination.timeout_s
    )
    client.set_http_retry_params(retry=False)
    return client


def _send_dicomweb(
    destination: Destination, items: Sequence[SendItem], datasets: dict[int, Dataset],
    tls_cert: Path | None = None, tls_key: Path | None = None,
) -> list[SendOutcome]:
    """STOW-RS (PS3.18 10.5), one request per study."""
    session = dicomweb_session(destination, tls_cert, tls_key)
    client = dicomweb_client(destination, session)
    by_study: dict[str, list[SendItem]] = defaultdict(list)
    for item in items:
        by_study[item.study_uid].append(item)
    outcomes: list[SendOutcome] = []
    try:
        for study_uid, group in by_study.items():
            outcomes.extend(_stow_group(client, destination, study_uid, group, datasets))
    finally:
        session.close()
    return outcomes


def _failure_status(reason: object) -> int:
    """The peer's FailureReason (a PS3.4 status) where it gave one, else a processing failure."""
    return int(reason) if isinstance(reason, int) else StoreStatus.PROCESSING_FAILURE


def _stow_group(
    client: DICOMwebClient,
    destination: Destination,
    study_uid: str,
    group: list[SendItem],
    datasets: dict[int, Dataset],
) -> list[SendOutcome]:
    try:
        response = client.store_instances([datasets[i.item_id] for i in group])
    except requests.HTTPError as exc:
        code = exc.response.status_code if exc.response is not None else None
        transient = code is None or code >= 500 or code in TRANSIENT_HTTP
        kind: Outcome = "unreachable" if transient else "refused"
        failed = _failed_sops(exc.response)
        if not transient and failed:
            # A 409 lists what failed; the rest of the request was stored.
            return [
                SendOutcome(i.item_id, "refused", code, f"HTTP {code}: {failed[i.sop_uid]}")
                if i.sop_uid in failed
                else SendOutcome(i.item_id, "sent", code, "stored")
                for i in group
            ]
        return [SendOutcome(i.item_id, kind, code, f"HTTP {code}") for i in group]
    except (requests.ConnectionError, requests.Timeout) as exc:
        return [SendOutcome(i.item_id, "unreachable", None, type(exc).__name__) for i in group]
    failed = {
        str(item.ReferencedSOPInstanceUID): item.get("FailureReason")
        for item in response.get("FailedSOPSequence", [])
    }
    log.info("stow_rs_done", destination=destination.name, study_uid=study_uid, sent=len(group) - len(failed))
    return [
        SendOutcome(i.item_id, "refused", _failure_status(failed[i.sop_uid]), f"STOW-RS failure reason {failed[i.sop_uid]}")
        if i.sop_uid in failed
        else SendOutcome(i.item_id, "sent", 200, "stored")
        for i in group
    ]


def _failed_sops(response: requests.Response | None) -> dict[str, object]:
    if response is None or not response.content:
        return {}
    try:
        ds = Dataset.from_json(response.json())
    except (ValueError, TypeError, KeyError):  # not a DICOM JSON body (e.g. a plain error page)
        return {}
    return {str(i.ReferencedSOPInstanceUID): i.get("FailureReason") for i in ds.get("FailedSOPSequence", [])}
