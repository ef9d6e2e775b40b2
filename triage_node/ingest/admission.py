"""Who may open an association (PS3.8 7.1.1, 9.3.4).

First, when the connection is accepted and before anything is read from it (`enter`):
the cap on concurrent connections and the cap per source address. A connection over
either is told A-ASSOCIATE-RJ (transient, local limit exceeded) without its request
being read (`triage_node.ingest.refusals`): it never gets a thread or a buffer.

Then once the A-ASSOCIATE-RQ is read (`check`), in this order: the called AE title,
the caller (calling AE title and source address against the allow-list), the
maximum PDU length the caller can receive, and the spool's free-disk watermark.

A refused caller gets an A-ASSOCIATE-RJ with the matching reason, and an audit row.
"""

from __future__ import annotations

import threading
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from triage_node.db import audit
from triage_node.db.session import transaction
from triage_node.ingest.access import AccessPolicy
from triage_node.ingest.store import InstanceStore
from triage_node.logs import get_logger

__all__ = [
    "ASSOCIATE_RJ_CALLED_AE",
    "ASSOCIATE_RJ_CALLING_AE",
    "ASSOCIATE_RJ_LOCAL_LIMIT",
    "ASSOCIATE_RJ_NO_REASON",
    "MIN_PEER_MAX_PDU",
    "Admission",
    "audit_association",
    "audit_rejection",
]

log = get_logger(__name__)

# A-ASSOCIATE-RJ (result, source, reason/diag.), PS3.8 9.3.4, Table 9-21.
#: rejected-permanent, DICOM UL service-user, calling-AE-title-not-recognized
ASSOCIATE_RJ_CALLING_AE = (0x01, 0x01, 0x03)
#: rejected-permanent, DICOM UL service-user, called-AE-title-not-recognized
ASSOCIATE_RJ_CALLED_AE = (0x01, 0x01, 0x07)
#: rejected-transient, DICOM UL service-provider (presentation), local-limit-exceeded
ASSOCIATE_RJ_LOCAL_LIMIT = (0x02, 0x03, 0x02)
#: rejected-permanent, DICOM UL service-user, no-reason-given (a maximum PDU length
#: the node cannot answer within)
ASSOCIATE_RJ_NO_REASON = (0x01, 0x01, 0x01)

#: Smallest maximum PDU length (PS3.8 D.1) a caller may announce, 0 (no limit)
#: aside: below it every response would be split into a PDU per few bytes.
MIN_PEER_MAX_PDU = 1024


def audit_rejection(session_factory: Any, calling_ae: str, peer: str, reason: str, **detail: Any) -> None:
    """Audit an ``association.rejected``, rate-summarised per peer address and reason.

    The first refusal of a window writes its row at once; the rest of a flood from that
    address is counted into one summary row (`triage_node.db.audit.record_refusal`), so a
    peer that retries in a loop cannot grow the audit table without bound.
    """
    audit.record_refusal(session_factory, "association.rejected", peer=peer, reason=reason,
                         actor=f"ae:{calling_ae}@{peer}"[:64], **detail)


def audit_association(
    session_factory: Any, action: str, calling_ae: str, peer: str, reason: str, **detail: Any
) -> None:
    """Commit an ``association.*`` audit row now; if the database is away, log that instead.

    The association is refused or ended either way: its outcome never waits on the audit.
    """
    try:
        with transaction(session_factory) as session:
            audit.record(
                session,
                action,
                actor=f"ae:{calling_ae}@{peer}"[:64],
                outcome="failed",
                reason=reason,
                **detail,
            )
    except SQLAlchemyError:
        log.error("audit row could not be written", action=action)


class Admission:
    """Admission control, and the count of open connections it let in.

    Parameters
    ----------
    policy : AccessPolicy
        The calling AE + address allow-list.
    ae_title : str
        The node's own (called) AE title.
    store : InstanceStore
        For the watermark and the audit rows.
    max_associations : int
        Connections open at once; one more is refused when accepted.
    max_per_source : int
        Connections open at once from one source address.
    """

    def __init__(
        self, policy: AccessPolicy, ae_title: str, store: InstanceStore, max_associations: int,
        max_per_source: int | None = None,
    ) -> None:
        self.policy = policy
        self.ae_title = ae_title
        self.store = store
        self.max_associations = max_associations
        self.max_per_source = max_per_source or max_associations
        self._open = 0
        self._by_source: dict[str, int] = {}
        self._lock = threading.Lock()

    def open_count(self) -> int:
        with self._lock:
            return self._open

    def enter(self, peer: str) -> str | None:
        """Count a connection just accepted from ``peer``: None, or why it is over a cap.

        A connection let in must be given back with `leave` when it ends.
        """
        with self._lock:
            if self._open >= self.max_associations:
                return "too many associations open"
            from_peer = self._by_source.get(peer, 0)
            if from_peer >= self.max_per_source:
                return "too many associations open from this address"
            self._open += 1
            self._by_source[peer] = from_peer + 1
            return None

    def leave(self, peer: str) -> None:
        with self._lock:
            self._open -= 1
            left = self._by_source.pop(peer, 1) - 1
            if left > 0:
                self._by_source[peer] = left

    def check(
        self, calling_ae: str, called_ae: str, peer: str, peer_max_pdu: int = 0
    ) -> tuple[int, int, int] | None:
        """None to accept the A-ASSOCIATE-RQ, else the A-ASSOCIATE-RJ fields."""
        reject: tuple[int, int, int] | None = None
        why = ""
        if called_ae != self.ae_title:
            reject, why = ASSOCIATE_RJ_CALLED_AE, "called AE title not recognised"
        elif not self.policy.allows(calling_ae, peer):
            reject, why = ASSOCIATE_RJ_CALLING_AE, "calling AE title not recognised"
        elif 0 < peer_max_pdu < MIN_PEER_MAX_PDU:
            reject = ASSOCIATE_RJ_NO_REASON
            why = f"maximum PDU length {peer_max_pdu} is below {MIN_PEER_MAX_PDU}"
        elif self.store.below_watermark():
            reject, why = ASSOCIATE_RJ_LOCAL_LIMIT, "free disk below the watermark"
        else:
            return None
        log.warning("association rejected", reason=why, called_ae=called_ae)
        self._audit_rejection(calling_ae, peer, called_ae, why, reject)
        return reject

    def _audit_rejection(
        self, calling_ae: str, peer: str, called: str, why: str, reject: tuple[int, int, int]
    ) -> None:
        """``association.rejected``, committed before the A-ASSOCIATE-RJ goes out (`audit_rejection`)."""
        audit_rejection(
            self.store.session_factory, calling_ae, peer, why,
            called_ae=called[:16], result=reject[0], source=reject[1], diagnostic=reject[2],
        )

