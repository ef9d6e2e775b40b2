"""pynetdicom event handlers of the listener (STYLE.md 2, 3).

Handlers are short: they bind the calling AE and peer to the log context, hand the
work to injected objects (bound through pynetdicom's ``(event, handler, [args])``
tuples) and return named statuses. Nothing slow runs here beyond the durable write
that must happen before the C-STORE response.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable

import structlog
from pynetdicom import evt
from pynetdicom.events import Event

from sqlalchemy.exc import SQLAlchemyError

from triage_node.db import audit
from triage_node.db.session import transaction
from triage_node.ingest.access import AccessPolicy
from triage_node.ingest.store import SUCCESS, InstanceStore
from triage_node.logs import get_logger

__all__ = [
    "ASSOCIATE_RJ_CALLED_AE",
    "ASSOCIATE_RJ_CALLING_AE",
    "ASSOCIATE_RJ_LOCAL_LIMIT",
    "SeenSeries",
    "event_handlers",
]

log = get_logger(__name__)

# A-ASSOCIATE-RJ (result, source, reason/diag.), PS3.8 9.3.4, Table 9-21.
#: rejected-permanent, DICOM UL service-user, calling-AE-title-not-recognized
ASSOCIATE_RJ_CALLING_AE = (0x01, 0x01, 0x03)
#: rejected-permanent, DICOM UL service-user, called-AE-title-not-recognized
ASSOCIATE_RJ_CALLED_AE = (0x01, 0x01, 0x07)
#: rejected-transient, DICOM UL service-provider (presentation), local-limit-exceeded
ASSOCIATE_RJ_LOCAL_LIMIT = (0x02, 0x03, 0x02)


class SeenSeries:
    """Series UIDs stored on each open association, for the completeness fast path."""

    def __init__(self) -> None:
        self._by_assoc: dict[int, set[str]] = {}
        self._lock = threading.Lock()

    def add(self, assoc: object, series_uid: str) -> None:
        with self._lock:
            self._by_assoc.setdefault(id(assoc), set()).add(series_uid)

    def pop(self, assoc: object) -> list[str]:
        with self._lock:
            return sorted(self._by_assoc.pop(id(assoc), set()))

    def open_count(self) -> int:
        with self._lock:
            return len(self._by_assoc)


def _peer(event: Event) -> tuple[str, str]:
    """(calling AE, peer IP) of the association; usable from EVT_REQUESTED on."""
    assoc = event.assoc
    primitive = assoc.requestor.primitive
    calling = primitive.calling_ae_title if primitive is not None else assoc.requestor.ae_title
    try:
        address = assoc.requestor.address
    except ValueError:
        address = "?"
    return str(calling).strip(), address


def handle_conn_open(event: Event) -> None:
    """EVT_CONN_OPEN: disable Nagle on the accepted socket.

    Without TCP_NODELAY, a small C-STORE-RSP waits for the peer's delayed ACK
    (about 40 ms per image on Linux; DESIGN.md "Hard-won facts").
    """
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # a socket already closed by the peer
            pass


def handle_requested(
    event: Event, policy: AccessPolicy, ae_title: str, store: InstanceStore
) -> None:
    """EVT_REQUESTED: admission control before negotiation (PS3.8 7.1.1).

    Sends A-ASSOCIATE-RJ with the matching reason and ends the association for
    an unknown called AE title, an unknown caller (AE + IP allow-list), or when the
    spool is below the free-disk watermark.
    """
    calling_ae, peer = _peer(event)
    with structlog.contextvars.bound_contextvars(calling_ae=calling_ae, peer=peer):
        called = str(event.assoc.requestor.primitive.called_ae_title).strip()
        reject: tuple[int, int, int] | None = None
        why = ""
        if called != ae_title:
            reject, why = ASSOCIATE_RJ_CALLED_AE, "called AE title not recognised"
        elif not policy.allows(calling_ae, peer):
            reject, why = ASSOCIATE_RJ_CALLING_AE, "calling AE title not recognised"
        elif store.below_watermark():
            reject, why = ASSOCIATE_RJ_LOCAL_LIMIT, "free disk below the watermark"
        if reject is None:
            log.debug("association requested")
            return
        log.warning("association rejected", reason=why, called_ae=called)
        _audit_rejection(store, calling_ae, peer, called, why, reject)
        assoc = event.assoc
        assoc.acse.send_reject(*reject)
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()


def _audit_rejection(
    store: InstanceStore, calling_ae: str, peer: str, called: str, why: str,
    reject: tuple[int, int, int],
) -> None:
    """Audit row ``association.rejected``, committed before the A-ASSOCIATE-RJ goes out."""
    try:
        with transaction(store.session_factory) as session:
            audit.record(
                session,
                "association.rejected",
                actor=f"ae:{calling_ae}@{peer}"[:64],
                outcome="failed",
                reason=why,
                called_ae=called[:16],
                result=reject[0],
                source=reject[1],
                diagnostic=reject[2],
            )
    except SQLAlchemyError:
        log.error("audit row for a rejected association could not be written")


def handle_echo(event: Event) -> int:
    """EVT_C_ECHO: Verification SOP Class (PS3.4 Annex A)."""
    calling_ae, peer = _peer(event)
    with structlog.contextvars.bound_contextvars(calling_ae=calling_ae, peer=peer):
        log.debug("C-ECHO")
    return SUCCESS


def handle_store(event: Event, store: InstanceStore, seen: SeenSeries) -> int:
    """EVT_C_STORE: store the dataset exactly as received (PS3.4 Annex B).

    ``event.encoded_dataset()`` gives the preamble, a file meta group built from the
    request and the dataset bytes as they came off the wire, without decoding.
    """
    calling_ae, peer = _peer(event)
    with structlog.contextvars.bound_contextvars(calling_ae=calling_ae, peer=peer):
        data = event.encoded_dataset()
        outcome = store.store(
            data,
            calling_ae=calling_ae,
            peer=peer,
            source="dimse",
            expected_sop_class=str(event.context.abstract_syntax),
            expected_sop_instance=str(event.request.AffectedSOPInstanceUID or "") or None,
        )
        if outcome.stored and outcome.series_uid:
            seen.add(event.assoc, outcome.series_uid)
        return outcome.status


def handle_finished(
    event: Event,
    seen: SeenSeries,
    association_finished: Callable[[list[str]], object] | None,
) -> None:
    """EVT_RELEASED / EVT_ABORTED / EVT_CONN_CLOSE: tell completeness which series arrived.

    Idempotent per association: whichever of the events fires first reports the
    series, the others find nothing left.
    """
    series_uids = seen.pop(event.assoc)
    if not series_uids or association_finished is None:
        return
    calling_ae, peer = _peer(event)
    with structlog.contextvars.bound_contextvars(calling_ae=calling_ae, peer=peer):
        log.info("association finished", trigger=event.event.name, series=len(series_uids))
        try:
            association_finished(series_uids)
        except Exception:  # noqa: BLE001 - never let it kill the association thread
            log.exception("association_finished failed")


def event_handlers(
    store: InstanceStore,
    policy: AccessPolicy,
    ae_title: str,
    seen: SeenSeries,
    association_finished: Callable[[list[str]], object] | None = None,
    nodelay: bool = True,
) -> list[tuple]:
    """The ``evt_handlers`` list for ``AE.start_server``."""
    handlers: list[tuple] = [
        (evt.EVT_REQUESTED, handle_requested, [policy, ae_title, store]),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [store, seen]),
    ]
    if nodelay:
        handlers.append((evt.EVT_CONN_OPEN, handle_conn_open))
    finished_events: Iterable = (evt.EVT_RELEASED, evt.EVT_ABORTED, evt.EVT_CONN_CLOSE)
    handlers.extend((e, handle_finished, [seen, association_finished]) for e in finished_events)
    return handlers
