"""Worklist priority: a class, a score, and ageing at read time.

Every study on the worklist has a priority class, in this order of urgency:

``STAT-AI``
    the latest current triage result is ICH-positive;
``STAT-order``
    the study was ordered STAT (``Study.requested_priority`` STAT/HIGH/URGENT, the
    values of Requested Procedure Priority (0040,1003), PS3.3 C.4.11) or it came from a
    calling AE listed in ``settings.stat_calling_aes``;
``routine``
    everything else.

Within a class, the stored ``score`` is ``max_c(weight_c * p_c)`` over the per-class
study probabilities of the current results, with ``settings.subtype_weights`` (so that
an epidural at 0.6 outranks an isolated subarachnoid at 0.6). Waiting time is added at
read time (``settings.ageing_per_hour`` per hour since the study arrived, see
``triage_node.worklist.queries``), so routine studies are not starved by newer ones.

A class that a person set (``WorklistEntry.manual_priority_class``) stands: the node
never moves the study below it (a person may lower a study, e.g. after reading a false
positive), and only a result that arrives after the person chose may raise it. Every
change of class or score is written to the audit trail with who and why.

The rules themselves (class order, score, the automatic class of one study's inputs)
are in ``triage_node.worklist.priority_rules``; this module applies them to the
database.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from triage_node.config import Settings, get_settings
from triage_node.db import audit
from triage_node.db.models import (
    AuditEvent,
    Job,
    JobState,
    PriorityClass,
    Result,
    Study,
    WorklistEntry,
    WorklistStatus,
)
from triage_node.logs import get_logger
from triage_node.timeutil import as_utc, utcnow
from triage_node.worklist.priority_rules import (
    PriorityError,
    PriorityInputs,
    automatic_priority,
    more_urgent,
    parse_class,
)

log = get_logger(__name__)

def current_results(session: Session, study_id: int) -> list[Result]:
    """Results of the study's jobs that are not superseded by a newer version."""
    stmt = (
        select(Result)
        .join(Job, Job.id == Result.job_id)
        .where(Result.study_id == study_id, Job.state != JobState.superseded.value)
        .order_by(Result.created_at, Result.id)
    )
    return list(session.scalars(stmt))


def inputs_for_study(session: Session, study: Study) -> PriorityInputs:
    """Collect `PriorityInputs` from the database rows of one study."""
    results = current_results(session, study.id)
    probabilities: dict[str, float] = {}
    for result in results:
        for name, p in (result.study_probabilities or {}).items():
            probabilities[name] = max(probabilities.get(name, 0.0), float(p))
    positive = any(r.positive for r in results) if results else None
    return PriorityInputs(
        positive=positive,
        probabilities=probabilities,
        requested_priority=study.requested_priority,
        calling_ae=study.calling_ae,
    )


def _resolve_study(session: Session, study: Study | int | str) -> Study:
    if isinstance(study, Study):
        return study
    if isinstance(study, int):
        found = session.get(Study, study)
    else:
        found = session.scalars(select(Study).where(Study.study_uid == study)).one_or_none()
    if found is None:
        raise PriorityError(f"no such study: {study!r}")
    return found



def manual_set_at(session: Session, study_uid: str) -> datetime | None:
    """When a person last set the study's class (from the audit trail), or None."""
    at = session.scalar(
        select(func.max(AuditEvent.at)).where(
            AuditEvent.study_uid == study_uid, AuditEvent.action == "worklist.manual_priority"
        )
    )
    return None if at is None else as_utc(at)


def get_or_create_entry(session: Session, study: Study) -> tuple[WorklistEntry, bool]:
    """The worklist entry of ``study``, created (routine, score 0) when missing."""
    entry = session.scalars(
        select(WorklistEntry).where(WorklistEntry.study_id == study.id)
    ).one_or_none()
    if entry is not None:
        return entry, False
    entry = WorklistEntry(
        study_id=study.id,
        status=WorklistStatus.new.value,
        priority_class=PriorityClass.routine.value,
        score=0.0,
        created_at=study.received_at or utcnow(),
    )
    session.add(entry)
    session.flush()
    return entry, True


def compute_priority(
    session: Session,
    study: Study | int | str,
    settings: Settings | None = None,
    *,
    actor: str = "worker",
    reason: str = "result",
    job_id: int | None = None,
) -> WorklistEntry:
    """Recompute and store the priority of one study's worklist entry.

    Creates the entry when the study has none. The class is the automatic class, or,
    when a person set one, that class raised only by later results (see the module
    docstring). A change of class or score is audited (action ``worklist.priority``)
    with ``actor`` and ``reason``. Runs inside the caller's transaction (it flushes,
    it does not commit).

    Parameters
    ----------
    session : Session
        Open session; the caller commits.
    study : Study, int or str
        The study row, its primary key, or its Study Instance UID.
    settings : Settings, optional
        Weights and STAT calling AEs; default ``get_settings()``.
    actor : str
        Who triggered the change (``worker``, ``token:<name>``, ``node``).
    reason : str
        Why (``result``, ``failure``, ``study received``, ...).
    job_id : int, optional
        Job whose result triggered the change, for the audit row.

    Returns
    -------
    WorklistEntry
        The entry, updated.
    """
    settings = settings or get_settings()
    row = _resolve_study(session, study)
    entry, created = get_or_create_entry(session, row)
    inputs = inputs_for_study(session, row)
    auto_class, score = automatic_priority(inputs, settings)
    new_class = auto_class
    if entry.manual_priority_class:
        # A person's class stands; only results that arrived after the person chose
        # may raise the study above it (never below).
        set_at = manual_set_at(session, row.study_uid)
        newer = [r for r in current_results(session, row.id) if set_at is None or as_utc(r.created_at) > set_at]
        new_class = parse_class(entry.manual_priority_class)
        if newer:
            later = PriorityInputs(
                positive=any(r.positive for r in newer),
                probabilities={},
                requested_priority=None,
                calling_ae=None,
            )
            new_class = more_urgent(new_class, automatic_priority(later, settings)[0])
    old_class, old_score = entry.priority_class, entry.score
    if created or new_class.value != old_class or score != old_score:
        entry.priority_class = new_class.value
        entry.score = score
        audit.record(
            session,
            "worklist.priority",
            actor=actor,
            study_uid=row.study_uid,
            job_id=job_id,
            reason=reason,
            old_class=None if created else old_class,
            new_class=new_class.value,
            old_score=None if created else old_score,
            new_score=score,
            automatic_class=auto_class.value,
            manual_class=entry.manual_priority_class,
        )
        log.info(
            "worklist.priority",
            study_uid=row.study_uid,
            old_class=old_class,
            new_class=new_class.value,
            score=score,
            reason=reason,
            actor=actor,
        )
    session.flush()
    return entry


def set_manual_priority(
    session: Session,
    entry: WorklistEntry,
    priority_class: str | PriorityClass | None,
    *,
    actor: str,
    reason: str,
    settings: Settings | None = None,
) -> WorklistEntry:
    """Record a class a person chose (None clears it) and recompute the entry.

    A person may set any class, lower ones included; from then on the node never puts
    the study below that class, and only results that arrive later may raise it.
    Audited as ``worklist.manual_priority`` (and ``worklist.priority`` for the change).
    """
    new_manual = None if priority_class is None else parse_class(priority_class).value
    study = session.get(Study, entry.study_id)
    assert study is not None
    old_manual = entry.manual_priority_class
    entry.manual_priority_class = new_manual
    entry.manual_set_by = actor if new_manual is not None else None
    audit.record(
        session,
        "worklist.manual_priority",
        actor=actor,
        study_uid=study.study_uid,
        reason=reason,
        old_manual_class=old_manual,
        new_manual_class=new_manual,
    )
    session.flush()
    return compute_priority(session, study, settings, actor=actor, reason=f"manual: {reason}")


def set_status(
    session: Session,
    entry: WorklistEntry,
    status: str | WorklistStatus,
    *,
    actor: str,
    reason: str | None = None,
) -> WorklistEntry:
    """Move an entry to ``new``/``reading``/``done``; audited as ``worklist.status``."""
    try:
        new_status = WorklistStatus(status)
    except ValueError:
        raise PriorityError(
            f"unknown status {status!r}: expected one of "
            + ", ".join(s.value for s in WorklistStatus)
        ) from None
    study = session.get(Study, entry.study_id)
    assert study is not None
    if entry.status != new_status.value:
        audit.record(
            session,
            "worklist.status",
            actor=actor,
            study_uid=study.study_uid,
            reason=reason or "",
            old_status=entry.status,
            new_status=new_status.value,
        )
        entry.status = new_status.value
        session.flush()
    return entry


def recompute_all(session: Session, study_ids: Iterable[int], settings: Settings | None = None,
                  *, actor: str = "node", reason: str = "recompute") -> list[WorklistEntry]:
    """`compute_priority` for several studies (e.g. after a change of weights)."""
    return [compute_priority(session, sid, settings, actor=actor, reason=reason) for sid in study_ids]


__all__ = [
    "compute_priority",
    "set_manual_priority",
    "set_status",
]
