"""Which data may go, and why (or why not).

A study may be deleted only when all of it is finished: no series still receiving, no
job queued or running, nothing waiting for delivery (DICOM outbox or HL7 to the RIS),
nothing given up on in the last ``undelivered_days`` (an operator may still send it
again), and no legal hold. Such a study goes once its last image is older than
``instances_days``, or earlier, oldest first, while the disk is above its high
watermark. Nothing else ever makes an unfinished study deletable.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from triage_node.db.models import (
    AuditEvent,
    HL7OutboxItem,
    Instance,
    Job,
    JobState,
    OutboxItem,
    OutboxState,
    Result,
    Series,
    SeriesState,
    Study,
)
from triage_node.retention.policy import DiskUse, Policy
from triage_node.timeutil import utcnow

ACTIVE_JOBS = (JobState.queued.value, JobState.running.value)
GIVEN_UP = (OutboxState.dead.value, OutboxState.refused.value)


def aware(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


@dataclass(frozen=True)
class StudyVerdict:
    """One study: how old, how big, and whether (and why) it may be deleted."""

    study_id: int
    study_uid: str
    last_received_at: datetime
    instances: int
    size_bytes: int
    finished: bool
    reason: str  # why it is kept, or why it goes

    def as_dict(self, now: datetime) -> dict[str, Any]:
        return {
            "study_uid": self.study_uid,
            "last_received_at": self.last_received_at.isoformat(timespec="seconds"),
            "age_days": round((now - self.last_received_at).total_seconds() / 86400, 1),
            "instances": self.instances,
            "size_bytes": self.size_bytes,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class ResultFiles:
    """The SR/SC folder of one finished job."""

    result_id: int
    job_id: int
    study_uid: str
    output_dir: str


@dataclass
class Plan:
    """What a run would delete now (`triage_node.retention.deletion.run` re-checks each item)."""

    now: datetime
    disk: DiskUse
    by_age: list[StudyVerdict] = field(default_factory=list)
    by_disk: list[StudyVerdict] = field(default_factory=list)
    kept: list[StudyVerdict] = field(default_factory=list)  # past their age, not finished
    results: list[ResultFiles] = field(default_factory=list)
    outbox_rows: int = 0
    hl7_rows: int = 0
    audit_rows: int = 0
    audit_before: datetime | None = None

    @property
    def studies(self) -> list[StudyVerdict]:
        return self.by_age + self.by_disk


def _outbox_blocks(
    session: Session, policy: Policy, now: datetime, uids: Collection[str] | None
) -> dict[str, str]:
    """study_uid -> why its outbox (DICOM or HL7) holds it back."""
    recent = Policy.cutoff(now, policy.undelivered_days)
    blocks: dict[str, str] = {}
    for model, what in ((OutboxItem, "object"), (HL7OutboxItem, "HL7 message")):
        rows = session.execute(
            select(model.study_uid, model.state, func.count(), func.max(model.next_attempt_at))
            .where(model.state != OutboxState.delivered.value,
                   *([model.study_uid.in_(uids)] if uids is not None else []))
            .group_by(model.study_uid, model.state)
        ).all()
        for uid, state, count, last in rows:
            if state == OutboxState.pending.value:
                blocks[uid] = f"{count} {what}(s) not yet delivered"
            elif state in GIVEN_UP and recent is not None and (aware(last) or now) > recent:
                blocks.setdefault(
                    uid, f"{count} {what}(s) {state} less than {policy.undelivered_days} days ago"
                )
    return blocks


def study_verdicts(
    session: Session, policy: Policy, now: datetime, only: Collection[int] | None = None
) -> list[StudyVerdict]:
    """Every study (or those in ``only``), oldest last image first, with why it is kept."""

    def among(column: Any) -> list[Any]:
        return [column.in_(list(only))] if only is not None else []

    last = dict(session.execute(
        select(Series.study_id, func.max(Series.last_received_at))
        .where(*among(Series.study_id)).group_by(Series.study_id)
    ).all())
    receiving = set(session.scalars(
        select(Series.study_id)
        .where(Series.state == SeriesState.receiving.value, *among(Series.study_id)).distinct()
    ))
    active = set(session.scalars(
        select(Job.study_id).where(Job.state.in_(ACTIVE_JOBS), *among(Job.study_id)).distinct()
    ))
    sizes = {
        sid: (n, b) for sid, n, b in session.execute(
            select(Series.study_id, func.count(Instance.id), func.coalesce(func.sum(Instance.size_bytes), 0))
            .join(Instance, Instance.series_id == Series.id)
            .where(*among(Series.study_id))
            .group_by(Series.study_id)
        ).all()
    }
    studies = session.execute(
        select(Study.id, Study.study_uid, Study.received_at, Study.legal_hold).where(*among(Study.id))
    ).all()
    outbox = _outbox_blocks(session, policy, now, [s[1] for s in studies] if only is not None else None)
    verdicts = []
    for sid, uid, received, hold in studies:
        at = aware(last.get(sid)) or aware(received) or now
        if hold:
            why = "legal hold"
        elif sid in receiving:
            why = "a series is still receiving"
        elif sid in active:
            why = "not yet triaged (a job is queued or running)"
        elif uid in outbox:
            why = outbox[uid]
        else:
            why = ""
        n, size = sizes.get(sid, (0, 0))
        verdicts.append(StudyVerdict(sid, uid, at, int(n), int(size), not why, why))
    verdicts.sort(key=lambda v: (v.last_received_at, v.study_id))
    return verdicts


def _result_files(session: Session, policy: Policy, now: datetime, skip: set[int]) -> list[ResultFiles]:
    """SR/SC folders of finished jobs older than ``results_days`` whose objects are all delivered."""
    cutoff = Policy.cutoff(now, policy.results_days)
    if cutoff is None:
        return []
    recent = Policy.cutoff(now, policy.undelivered_days)
    blocked: set[int] = set()
    for job_id, state, last in session.execute(
        select(OutboxItem.job_id, OutboxItem.state, OutboxItem.next_attempt_at)
        .where(OutboxItem.state != OutboxState.delivered.value, OutboxItem.job_id.is_not(None))
    ).all():
        if job_id is not None and (state not in GIVEN_UP or (recent is not None and (aware(last) or now) > recent)):
            blocked.add(job_id)
    rows = session.execute(
        select(Result.id, Result.job_id, Study.id, Study.study_uid, Result.output_dir, Job.finished_at,
               Result.created_at)
        .join(Job, Job.id == Result.job_id)
        .join(Study, Study.id == Result.study_id)
        .where(Result.files_deleted_at.is_(None), Result.output_dir.is_not(None),
               Study.legal_hold.is_(False), Job.state.not_in(ACTIVE_JOBS))
    ).all()
    out = []
    for rid, job_id, sid, uid, folder, finished, created in rows:
        when = aware(finished) or aware(created)
        if folder is None or sid in skip or job_id in blocked or when is None or when > cutoff:
            continue
        out.append(ResultFiles(rid, job_id, uid, folder))
    return out


def make_plan(session: Session, policy: Policy, disk: DiskUse, now: datetime | None = None) -> Plan:
    """What is due for deletion now, by age and by disk use, and what is kept past its age."""
    now = now or utcnow()
    plan = Plan(now=now, disk=disk)
    cutoff = Policy.cutoff(now, policy.instances_days)
    over = disk.bytes_above(policy.disk_low_percent) if disk.percent > policy.disk_high_percent else 0
    for v in study_verdicts(session, policy, now):
        old = cutoff is not None and v.last_received_at <= cutoff
        if not v.finished:
            if old:
                plan.kept.append(v)
        elif old:
            plan.by_age.append(_with_reason(v, f"last image older than {policy.instances_days} days"))
            over -= v.size_bytes
        elif over > 0:
            reason = (f"disk {disk.percent:.1f}% of {disk.basis} above "
                      f"{policy.disk_high_percent:g}%, oldest finished first")
            plan.by_disk.append(_with_reason(v, reason))
            over -= v.size_bytes
    plan.results = _result_files(session, policy, now, {v.study_id for v in plan.studies})
    _count_rows(session, policy, plan)
    return plan


def _with_reason(v: StudyVerdict, reason: str) -> StudyVerdict:
    return StudyVerdict(v.study_id, v.study_uid, v.last_received_at, v.instances, v.size_bytes,
                        v.finished, reason)


def delivered_before(model: Any, cutoff: datetime) -> list[Any]:
    """Outbox rows delivered before ``cutoff``, except those of studies on legal hold."""
    held = select(Study.study_uid).where(Study.legal_hold.is_(True))
    return [model.state == OutboxState.delivered.value, model.delivered_at <= cutoff,
            model.study_uid.not_in(held)]


def _count_rows(session: Session, policy: Policy, plan: Plan) -> None:
    cutoff = Policy.cutoff(plan.now, policy.outbox_days)
    if cutoff is not None:
        for model, attr in ((OutboxItem, "outbox_rows"), (HL7OutboxItem, "hl7_rows")):
            setattr(plan, attr, session.scalar(
                select(func.count()).select_from(model).where(*delivered_before(model, cutoff))
            ) or 0)
    plan.audit_before = Policy.cutoff(plan.now, policy.audit_days)
    if plan.audit_before is not None:
        plan.audit_rows = session.scalar(
            select(func.count()).select_from(AuditEvent).where(AuditEvent.at < plan.audit_before)
        ) or 0


def recheck(session: Session, policy: Policy, study_id: int, now: datetime) -> StudyVerdict | None:
    """The study's verdict inside the deleting transaction (an image may have arrived since)."""
    found = study_verdicts(session, policy, now, only=[study_id])
    return found[0] if found else None
