"""The outbox: one row per object and destination, delivered with retries.

Rows are added by `triage_node.outbox.enqueue_outbox` (the one writer, idempotent on (SOP
Instance UID, destination)); ``deliver_due`` sends every due pending row, one batch per destination, each destination in its own thread
so that a slow or dead peer never holds up the others. Outcomes (see ``destinations.py``):

- sent: state ``delivered``, audit ``delivery.sent``.
- unreachable (no connection, timeout, abort, HTTP 5xx): retried after
  ``min(cap, base * 2**(attempts-1))`` seconds; after ``delivery_max_attempts`` tries the
  row is dead-lettered (state ``dead``, audit ``delivery.dead_letter``).
- refused by the peer (DIMSE failure status, permanent association rejection, HTTP 4xx):
  audit ``delivery.failed`` with outcome ``refused`` and the status; after
  ``delivery_refused_max_attempts`` tries the row is set aside (state ``refused``, audit
  ``delivery.dead_letter``).
- invalid (the local file cannot be read): dead-lettered at once.

Each failed try is audited as ``delivery.failed`` with the outcome. Rows are claimed with a
conditional UPDATE (a lease on ``next_attempt_at``) so that two workers never send the same
row at the same time; a worker that dies mid-send leaves the row due again when the lease
ends (at-least-once delivery; a PACS stores a repeated SOP Instance once). The retry
policy and the tally of one pass are in ``worker.pipeline.delivery_policy``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta

from sqlalchemy import and_, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from triage_node.config import Settings
from triage_node.db import audit
from triage_node.db.models import Job, OutboxItem, OutboxState
from triage_node.db.session import transaction
from triage_node.logs import get_logger
from triage_node.setting_types import Destination
from triage_node.timeutil import as_utc, utcnow
from worker import metrics
from worker.pipeline.delivery_policy import DeliveryPolicy, DeliveryReport
from worker.pipeline.destinations import SendItem, SendOutcome, send

log = get_logger(__name__)

ACTOR = "worker"


def deliver_due(
    session_factory: sessionmaker[Session],
    settings: Settings | Sequence[Destination],
    now: datetime | None = None,
    *,
    policy: DeliveryPolicy | None = None,
) -> DeliveryReport:
    """Send every due pending outbox row to its destination.

    Parameters
    ----------
    session_factory : sessionmaker
    settings : Settings or sequence of Destination
        Settings give the destinations and the retry policy; a bare list of destinations
        uses ``policy`` (or the defaults).
    now : datetime, optional
        The current time (UTC); rows with ``next_attempt_at <= now`` are due.

    Returns
    -------
    DeliveryReport
    """
    now = as_utc(now or utcnow())
    if isinstance(settings, Settings):
        destinations = list(settings.destinations)
        policy = policy or DeliveryPolicy.from_settings(settings)
    else:
        destinations = list(settings)
        policy = policy or DeliveryPolicy()
    by_name = {d.name: d for d in destinations}
    report = DeliveryReport()

    with transaction(session_factory) as session:
        due = session.execute(
            select(OutboxItem.destination, func.count())
            .where(OutboxItem.state == OutboxState.pending, OutboxItem.next_attempt_at <= now)
            .group_by(OutboxItem.destination)
        ).all()
    work = []
    for name, count in due:
        if name not in by_name:
            report.unknown_destination += int(count)
            log.warning("outbox_unknown_destination", destination=name, rows=int(count))
            continue
        work.append(by_name[name])
    if not work:
        return report

    with ThreadPoolExecutor(max_workers=len(work), thread_name_prefix="deliver") as pool:
        futures = {d.name: pool.submit(_deliver_destination, session_factory, d, policy, now) for d in work}
        for name, future in futures.items():
            counts = future.result()
            report.by_destination[name] = dict(counts)
            report.sent += counts["sent"]
            report.retrying += counts["retrying"]
            report.refused += counts["refused"]
            report.dead += counts["dead"]
    log.info(
        "outbox_delivered",
        sent=report.sent,
        retrying=report.retrying,
        refused=report.refused,
        dead=report.dead,
    )
    return report


def _claim(
    session_factory: sessionmaker[Session], destination: Destination, policy: DeliveryPolicy, now: datetime
) -> list[SendItem]:
    """Claim up to ``batch_size`` due rows of one destination by moving their next try past
    a lease; a concurrent claimer's UPDATE finds them no longer due."""
    lease = now + timedelta(seconds=max(120.0, 4 * destination.timeout_s))
    with transaction(session_factory) as session:
        ids = session.scalars(
            select(OutboxItem.id)
            .where(
                OutboxItem.destination == destination.name,
                OutboxItem.state == OutboxState.pending,
                OutboxItem.next_attempt_at <= now,
            )
            .order_by(OutboxItem.next_attempt_at, OutboxItem.id)
            .limit(policy.batch_size)
        ).all()
        if not ids:
            return []
        claimed = session.execute(
            update(OutboxItem)
            .where(
                and_(
                    OutboxItem.id.in_(ids),
                    OutboxItem.state == OutboxState.pending,
                    OutboxItem.next_attempt_at <= now,
                )
            )
            .values(next_attempt_at=lease)
            .returning(OutboxItem.id, OutboxItem.sop_uid, OutboxItem.study_uid, OutboxItem.path)
        ).all()
    return sorted((SendItem(int(r[0]), r[1], r[2], r[3]) for r in claimed), key=lambda i: i.item_id)


def _deliver_destination(
    session_factory: sessionmaker[Session], destination: Destination, policy: DeliveryPolicy, now: datetime
) -> Counter:
    counts: Counter = Counter(sent=0, retrying=0, refused=0, dead=0)
    while True:
        items = _claim(session_factory, destination, policy, now)
        if not items:
            return counts
        try:
            outcomes = send(
                destination,
                items,
                calling_ae=policy.calling_ae,
                tls_cert=policy.tls_cert,
                tls_key=policy.tls_key,
            )
        except Exception as exc:  # noqa: BLE001 - a bug or odd peer must not lose the claim
            log.exception("delivery_send_error", destination=destination.name)
            outcomes = [SendOutcome(i.item_id, "unreachable", None, f"{type(exc).__name__}: {exc}") for i in items]
        counts.update(_record(session_factory, destination, policy, now, outcomes))
        if len(items) < policy.batch_size or all(o.outcome == "unreachable" for o in outcomes):
            return counts


def _record(
    session_factory: sessionmaker[Session],
    destination: Destination,
    policy: DeliveryPolicy,
    now: datetime,
    outcomes: Sequence[SendOutcome],
) -> Counter:
    counts: Counter = Counter()
    arrived: list[tuple[datetime | None, datetime]] = []
    with transaction(session_factory) as session:
        for o in outcomes:
            item = session.get(OutboxItem, o.item_id)
            if item is None or item.state != OutboxState.pending:
                continue
            item.attempts += 1
            common = dict(
                actor=ACTOR,
                study_uid=item.study_uid,
                sop_uid=item.sop_uid,
                job_id=item.job_id,
                destination=destination.name,
                kind=destination.kind.value,
                attempts=item.attempts,
                status=o.status,
            )
            if o.outcome == "sent":
                item.state = OutboxState.delivered
                item.delivered_at = utcnow()
                item.last_error = None
                audit.record(session, "delivery.sent", outcome="ok", **common)
                counts["sent"] += 1
                if item.job_id is not None and item.reason == "result" and _job_complete_at(session, item):
                    job = session.get(Job, item.job_id)
                    arrived.append((job.last_instance_at if job else None, item.delivered_at))
                continue
            item.last_error = f"{o.outcome}: {o.detail}"[:2000]
            audit.record(session, "delivery.failed", outcome=o.outcome, detail_text=o.detail[:500], **common)
            if o.outcome == "invalid":
                final = OutboxState.dead
            elif o.outcome == "refused" and item.attempts >= policy.refused_max_attempts:
                final = OutboxState.refused
            elif item.attempts >= policy.max_attempts:
                final = OutboxState.dead
            else:
                final = None
            if final is None:
                item.next_attempt_at = now + policy.backoff(item.attempts)
                counts["retrying"] += 1
            else:
                item.state = final
                audit.record(
                    session, "delivery.dead_letter", outcome=final.value, reason=o.outcome, **common
                )
                counts["refused" if final is OutboxState.refused else "dead"] += 1
            log.warning(
                "delivery_failed",
                destination=destination.name,
                sop_uid=item.sop_uid,
                outcome=o.outcome,
                status=o.status,
                attempts=item.attempts,
                state=str(item.state),
            )
    # Observed once committed, so a rolled-back batch is not counted.
    for o in outcomes:
        metrics.count_try(destination.name, o.outcome)
    for last_instance_at, delivered_at in arrived:
        metrics.observe_delivered(destination.name, last_instance_at, delivered_at)
    return counts


def _job_complete_at(session: Session, item: OutboxItem) -> bool:
    """True when ``item`` (just marked delivered) was the job's last result object still
    owed to its destination: the moment the whole result is at that PACS."""
    session.flush()
    left = session.scalar(
        select(func.count()).select_from(OutboxItem).where(
            OutboxItem.job_id == item.job_id,
            OutboxItem.destination == item.destination,
            OutboxItem.reason == "result",
            OutboxItem.state != OutboxState.delivered,
        )
    )
    return not left


def requeue(
    session: Session,
    *,
    item_id: int | None = None,
    dead: bool = False,
    actor: str = "cli",
    now: datetime | None = None,
) -> int:
    """Put rows back to pending for a fresh series of tries (``outbox retry``).

    ``item_id`` requeues that row whatever its state except delivered; ``dead`` requeues
    every dead and refused row. Each requeued row is audited (``delivery.requeued``).
    """
    if (item_id is None) == (not dead):
        raise ValueError("give either item_id or dead=True")
    query = select(OutboxItem)
    if item_id is not None:
        query = query.where(OutboxItem.id == item_id, OutboxItem.state != OutboxState.delivered)
    else:
        query = query.where(OutboxItem.state.in_([OutboxState.dead, OutboxState.refused]))
    when = as_utc(now or utcnow())
    n = 0
    for item in session.scalars(query):
        previous = item.state
        item.state = OutboxState.pending
        item.attempts = 0
        item.next_attempt_at = when
        audit.record(
            session,
            "delivery.requeued",
            actor=actor,
            study_uid=item.study_uid,
            sop_uid=item.sop_uid,
            job_id=item.job_id,
            destination=item.destination,
            previous_state=str(previous),
        )
        n += 1
    return n
