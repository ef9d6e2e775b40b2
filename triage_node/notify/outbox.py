"""The HL7 outbox: each message to the RIS kept until it is acknowledged or given up.

Like the DICOM outbox (``worker/pipeline/delivery.py``), and in the same states
(`OutboxState`): ``enqueue`` stores the built message (its MSH-10 included, so that
every retry is the same message); ``deliver_due`` sends due rows in order, one MLLP
exchange each (``mllp.send``):

- accepted (``AA``): state ``delivered``, audit ``notify.hl7`` outcome ``ok``.
- refused (``AE``/``AR``): state ``refused`` at once, audit ``notify.hl7`` outcome
  ``refused`` with the RIS's error text, and ``notify.hl7.dead_letter``.
- unreachable (no connection, no ACK in time): audit ``notify.hl7`` outcome
  ``unreachable``; tried again after ``min(delivery_backoff_cap_s, delivery_backoff_base_s *
  2**(attempts-1))``; after ``hl7_max_attempts`` tries state ``dead`` and
  ``notify.hl7.dead_letter``.

Rows are claimed with a conditional UPDATE that moves ``next_attempt_at`` past a lease, so
two workers never send one row at once. ``requeue`` (``triage-node hl7 retry``) puts
dead-lettered rows back. Logs and audit rows name the study and MSH-10, never the patient.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from triage_node.config import Settings
from triage_node.db import audit
from triage_node.db.models import HL7OutboxItem, OutboxState
from triage_node.db.session import transaction
from triage_node.logs import get_logger
from triage_node.notify.mllp import Endpoint, SendResult, send
from triage_node.timeutil import as_utc, utcnow

log = get_logger(__name__)

ACTION = "notify.hl7"




def enqueue(
    session_factory: sessionmaker[Session],
    *,
    message: str,
    control_id: str,
    message_type: str,
    study_uid: str,
    job_id: int | None = None,
    trigger: str = "result",
    dedup_key: str | None = None,
) -> int:
    """Store one message, due now, in its own transaction; returns the row id.

    A ``dedup_key`` already stored (the same job's message of the same type, from a job
    run twice) returns the existing row's id and stores nothing.
    """
    if dedup_key is not None:
        with session_factory() as session:
            existing = session.scalars(
                select(HL7OutboxItem.id).where(HL7OutboxItem.dedup_key == dedup_key)
            ).first()
        if existing is not None:
            return existing
    try:
        with transaction(session_factory) as session:
            item = HL7OutboxItem(
                job_id=job_id, study_uid=study_uid, message_type=message_type, control_id=control_id,
                dedup_key=dedup_key, trigger=trigger, message=message, state=OutboxState.pending,
                attempts=0, next_attempt_at=utcnow(),
            )
            session.add(item)
            session.flush()
            item_id = item.id
    except IntegrityError:  # a concurrent enqueue of the same dedup_key won
        with session_factory() as session:
            return session.scalars(
                select(HL7OutboxItem.id).where(HL7OutboxItem.dedup_key == dedup_key)
            ).one()
    log.info("hl7.enqueued", study_uid=study_uid, message_type=message_type, control_id=control_id,
             trigger=trigger)
    return item_id


@dataclass
class HL7Report:
    """What one ``deliver_due`` call did, in rows; ``results`` by row id."""

    sent: int = 0
    retrying: int = 0
    refused: int = 0
    dead: int = 0
    results: dict[int, SendResult] | None = None

    def as_dict(self) -> dict[str, int]:
        return {"sent": self.sent, "retrying": self.retrying, "refused": self.refused, "dead": self.dead}


def _claim(session_factory: sessionmaker[Session], now: datetime, lease: datetime, limit: int,
           ids: list[int] | None) -> list[int]:
    with transaction(session_factory) as session:
        due = (
            select(HL7OutboxItem.id)
            .where(HL7OutboxItem.state == OutboxState.pending, HL7OutboxItem.next_attempt_at <= now)
            .order_by(HL7OutboxItem.id)
            .limit(limit)
        )
        if ids is not None:
            due = due.where(HL7OutboxItem.id.in_(ids))
        candidates = session.scalars(due).all()
        if not candidates:
            return []
        claimed = session.execute(
            update(HL7OutboxItem)
            .where(
                HL7OutboxItem.id.in_(candidates),
                HL7OutboxItem.state == OutboxState.pending,
                HL7OutboxItem.next_attempt_at <= now,
            )
            .values(next_attempt_at=lease)
            .returning(HL7OutboxItem.id)
        ).scalars().all()
    return sorted(claimed)


def deliver_due(
    session_factory: sessionmaker[Session],
    settings: Settings,
    now: datetime | None = None,
    *,
    ids: list[int] | None = None,
    limit: int = 100,
) -> HL7Report:
    """Send every due pending row (or only those of ``ids``), oldest first."""
    report = HL7Report(results={})
    if not settings.hl7_host:
        return report
    now = as_utc(now or utcnow())
    endpoint = Endpoint.from_settings(settings)
    lease = now + timedelta(seconds=max(120.0, 4 * endpoint.timeout_s))
    for item_id in _claim(session_factory, now, lease, limit, ids):
        with session_factory() as session:
            item = session.get(HL7OutboxItem, item_id)
            assert item is not None
            message, control_id = item.message, item.control_id
        result = send(endpoint, message, control_id)
        report.results[item_id] = result  # type: ignore[index]
        state = _record(session_factory, settings, endpoint, item_id, result, now)
        if state == OutboxState.delivered:
            report.sent += 1
        elif state == OutboxState.refused:
            report.refused += 1
        elif state == OutboxState.dead:
            report.dead += 1
        else:
            report.retrying += 1
    return report


def backoff(settings: Settings, attempts: int) -> timedelta:
    """Delay after ``attempts`` failed tries: the DICOM outbox's exponential, capped backoff."""
    seconds = settings.delivery_backoff_base_s * (2 ** max(0, attempts - 1))
    return timedelta(seconds=min(settings.delivery_backoff_cap_s, seconds))


def _record(session_factory: sessionmaker[Session], settings: Settings, endpoint: Endpoint,
            item_id: int, result: SendResult, now: datetime) -> OutboxState:
    with transaction(session_factory) as session:
        item = session.get(HL7OutboxItem, item_id)
        assert item is not None
        item.attempts += 1
        item.ack_code = result.ack_code
        common = dict(
            actor="node", study_uid=item.study_uid, job_id=item.job_id, message_type=item.message_type,
            control_id=item.control_id, trigger=item.trigger, attempts=item.attempts,
            ack=result.ack_code, peer=endpoint.address,
        )
        if result.outcome == "accepted":
            item.state, item.delivered_at, item.last_error = OutboxState.delivered, utcnow(), None
            audit.record(session, ACTION, outcome="ok", **common)
            log.info("hl7.acknowledged", study_uid=item.study_uid, message_type=item.message_type,
                     ack=result.ack_code, attempt=item.attempts)
            return OutboxState.delivered
        item.last_error = f"{result.outcome}: {result.detail}"[:2000]
        audit.record(session, ACTION, outcome=result.outcome, error=result.detail, **common)
        if result.outcome == "refused":
            item.state = OutboxState.refused
        elif item.attempts >= settings.hl7_max_attempts:
            item.state = OutboxState.dead
        else:
            item.next_attempt_at = now + backoff(settings, item.attempts)
        log.warning("hl7.not_acknowledged", study_uid=item.study_uid, message_type=item.message_type,
                    outcome=result.outcome, ack=result.ack_code, attempt=item.attempts, state=str(item.state))
        if item.state != OutboxState.pending:
            audit.record(session, f"{ACTION}.dead_letter", outcome=str(item.state), reason=result.outcome,
                         error=result.detail, **common)
        return OutboxState(item.state)


def requeue(
    session: Session,
    *,
    item_id: int | None = None,
    dead: bool = False,
    actor: str = "cli",
    now: datetime | None = None,
) -> int:
    """Put rows back to pending for a fresh series of tries, each audited
    (``notify.hl7.requeued``): ``item_id`` in any state but delivered, or with ``dead``
    every dead and refused row."""
    if (item_id is None) == (not dead):
        raise ValueError("give either item_id or dead=True")
    query = select(HL7OutboxItem)
    if item_id is not None:
        query = query.where(HL7OutboxItem.id == item_id, HL7OutboxItem.state != OutboxState.delivered)
    else:
        query = query.where(HL7OutboxItem.state.in_([OutboxState.dead, OutboxState.refused]))
    when = as_utc(now or utcnow())
    n = 0
    for item in session.scalars(query):
        previous = item.state
        item.state, item.attempts, item.next_attempt_at = OutboxState.pending, 0, when
        audit.record(session, f"{ACTION}.requeued", actor=actor, study_uid=item.study_uid, job_id=item.job_id,
                     message_type=item.message_type, control_id=item.control_id, previous_state=str(previous))
        n += 1
    return n
