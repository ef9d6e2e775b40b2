"""The only functions that change a job's state, each with the audit row it owes.

Every function applies one event of `triage_node.jobs.states.TRANSITIONS` as a guarded
UPDATE: it reads the job's state, refuses when the table does not allow the event from
it, and writes ``UPDATE jobs SET state=:to, ... WHERE id=:id AND state=:seen`` (plus the
event's own conditions, such as the version). When another actor moved the job between
the read and the write, the UPDATE matches no row; the function reads the state again
and tries once more only if the event is still allowed from the new state (a claim of a
job that another delivery has just claimed becomes a re-run, as before). It returns
whether it won, and writes the audit row only when it did, so a transition is applied
and audited once even when a worker, the node and a sweep race for the same job.

All functions work inside the caller's transaction (``session``); the caller commits.
Objects of the session are kept in step (``synchronize_session="fetch"``).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any, cast

from sqlalchemy import ColumnElement, CursorResult, exists, func, or_, select, update
from sqlalchemy.orm import Session

from triage_node.db import audit
from triage_node.db.models import Job, Result, Series, Study
from triage_node.jobs.states import INITIAL, TRANSITIONS, Event, JobState
from triage_node.timeutil import utcnow

#: Reads and guarded writes one transition may take when other actors keep moving the job.
_ATTEMPTS = 3


def _move(
    session: Session,
    job_id: int,
    event: Event,
    where: Iterable[ColumnElement[bool]] = (),
    **values: Any,
) -> JobState | None:
    """Apply ``event`` to job ``job_id``; the state it left, or None when refused or lost."""
    conditions = list(where)
    for _ in range(_ATTEMPTS):
        seen = session.scalar(select(Job.state).where(Job.id == job_id))
        if seen is None:
            return None
        to = TRANSITIONS.get((JobState(seen), event))
        if to is None:
            return None
        stmt = (
            update(Job)
            .where(Job.id == job_id, Job.state == seen, *conditions)
            .values(state=to, **values)
            .execution_options(synchronize_session="fetch")
        )
        # An UPDATE's result is a CursorResult; Session.execute is typed as returning Result.
        if cast(CursorResult[Any], session.execute(stmt)).rowcount == 1:
            return JobState(seen)
        if session.scalar(select(Job.state).where(Job.id == job_id)) == seen:
            return None  # the state is as seen: the event's own conditions refused it
    return None


def _uids(session: Session, job_id: int) -> tuple[Job, str | None, str | None]:
    job = session.get(Job, job_id)
    assert job is not None
    study = session.get(Study, job.study_id)
    series = session.get(Series, job.series_id)
    return job, (study.study_uid if study else None), (series.series_uid if series else None)


# -- node --------------------------------------------------------------------------------
def create_version(
    session: Session,
    *,
    study: Study,
    series: Series,
    version: int,
    queue: str,
    queue_reason: str,
    reason: str,
    actor: str,
    supersede: Iterable[Job] = (),
    last_instance_at: datetime | None = None,
    series_complete_at: datetime | None = None,
    created_at: datetime | None = None,
) -> tuple[Job, list[int]]:
    """A new ``queued`` job for ``series`` at ``version``, superseding the jobs in ``supersede``.

    Writes ``job.superseded`` for each job it superseded, then ``job.created``. The caller
    commits, and enqueues the job only after that (STYLE.md 5).

    Returns
    -------
    (Job, list of int)
        The new job and the ids of the jobs it superseded.
    """
    job = Job(
        study_id=study.id,
        series_id=series.id,
        version=version,
        state=INITIAL,
        queue=queue,
        last_instance_at=last_instance_at,
        series_complete_at=series_complete_at,
        created_at=created_at or utcnow(),
    )
    session.add(job)
    session.flush()
    superseded = [
        old.id for old in supersede
        if supersede_job(
            session, old.id, by=job.id, reason=reason, actor=actor, study_uid=study.study_uid,
            series_uid=series.series_uid if old.series_id == series.id else None,
        )
    ]
    audit.record(
        session, "job.created", actor=actor, study_uid=study.study_uid,
        series_uid=series.series_uid, job_id=job.id, version=version, queue=queue,
        queue_reason=queue_reason, supersedes=superseded, reason=reason,
    )
    return job, superseded


def supersede_job(
    session: Session, job_id: int, *, by: int, reason: str, actor: str,
    study_uid: str | None, series_uid: str | None,
) -> bool:
    """queued | running | done -> superseded (``job.superseded``, with the state it left)."""
    previous = _move(session, job_id, Event.supersede)
    if previous is None:
        return False
    version = session.scalar(select(Job.version).where(Job.id == job_id))
    audit.record(
        session, "job.superseded", actor=actor, study_uid=study_uid, series_uid=series_uid,
        job_id=job_id, version=version, previous_state=previous, superseded_by=by,
        reason=reason,
    )
    return True


def retry_job(session: Session, job_id: int, *, actor: str) -> bool:
    """failed -> queued at the same version, error cleared (``job.retried``)."""
    previous_error = session.scalar(select(Job.error).where(Job.id == job_id))
    if _move(session, job_id, Event.retry, error=None) is None:
        return False
    job, study_uid, series_uid = _uids(session, job_id)
    audit.record(
        session, "job.retried", actor=actor, job_id=job_id, study_uid=study_uid,
        series_uid=series_uid, version=job.version, previous_error=(previous_error or "")[:500],
    )
    return True


# -- worker ------------------------------------------------------------------------------
def claim_job(
    session: Session, job_id: int, version: int, *, at: datetime, task_id: str | None,
    actor: str, instances: int, backend: str,
) -> bool:
    """queued | running | failed | done without a result -> running (``job.started``).

    Stamps ``started_at``, counts the attempt, keeps ``task_id`` (or the one the job
    had) and clears the error. A job claimed while ``running`` is a re-run after an
    interruption (``rerun_after_interruption``).
    """
    no_result = ~exists().where(Result.job_id == Job.id)
    previous = _move(
        session, job_id, Event.claim,
        [Job.version == version, or_(Job.state != JobState.done, no_result)],
        started_at=at, attempts=func.coalesce(Job.attempts, 0) + 1,
        task_id=task_id or Job.task_id, error=None,
    )
    if previous is None:
        return False
    job, study_uid, series_uid = _uids(session, job_id)
    audit.record(
        session, "job.started", actor=actor, study_uid=study_uid, series_uid=series_uid,
        job_id=job_id, version=version, attempt=job.attempts, task_id=task_id,
        instances=instances, backend=backend,
        rerun_after_interruption=previous == JobState.running,
    )
    return True


def finish_job(
    session: Session, job_id: int, version: int, *, actor: str, positive: bool,
    outbox_items: int, seconds_started_to_reported: float,
) -> bool:
    """Any state but superseded -> done, at ``version`` only (``job.done``)."""
    if _move(session, job_id, Event.finish, [Job.version == version], error=None) is None:
        return False
    _job, study_uid, series_uid = _uids(session, job_id)
    audit.record(
        session, "job.done", actor=actor, study_uid=study_uid, series_uid=series_uid,
        job_id=job_id, version=version, positive=positive, outbox_items=outbox_items,
        seconds_started_to_reported=seconds_started_to_reported,
    )
    return True


def fail_job(
    session: Session, job_id: int, version: int | None, *, error: str, actor: str
) -> bool:
    """queued | running | failed -> failed, with the error (``job.failed``).

    ``version`` None fails whatever version the job is at.
    """
    where = [] if version is None else [Job.version == version]
    if _move(session, job_id, Event.fail, where, error=error, finished_at=utcnow()) is None:
        return False
    job, study_uid, series_uid = _uids(session, job_id)
    audit.record(
        session, "job.failed", actor=actor, outcome="error", study_uid=study_uid,
        series_uid=series_uid, job_id=job_id, version=job.version, attempts=job.attempts,
        error=error,
    )
    return True


# -- sweeps ------------------------------------------------------------------------------
def requeue_job(
    session: Session, job_id: int, *, started_before: datetime, actor: str,
    reason: str = "worker lost",
) -> bool:
    """running -> queued when the run started before ``started_before`` (``job.requeued``).

    The condition is part of the UPDATE, so a job that a worker claimed again since the
    sweep looked (a fresh ``started_at``) stays ``running``.
    """
    if _move(session, job_id, Event.requeue, [Job.started_at < started_before]) is None:
        return False
    job, study_uid, _series_uid = _uids(session, job_id)
    started = job.started_at
    audit.record(
        session, "job.requeued", actor=actor, outcome="warning", job_id=job_id,
        study_uid=study_uid, version=job.version,
        started_at=started.isoformat() if started else None, reason=reason,
    )
    return True
