"""The one entry point of the periodic rounds that move or resend stuck jobs.

A job can get stuck three ways, and `sweep` has one step for each:

``stale``
    ``running`` longer than the task's hard time limit plus a minute: its worker is
    gone (killed, machine restarted) and, with the embedded filesystem broker, so is
    its message. The job goes back to ``queued`` (`requeue_job`, ``job.requeued``) and
    is sent again.
``unsent``
    ``queued`` but never sent: the broker was down when the job was committed
    (`triage_node.queue.reconcile_queued_jobs`, ``job.enqueued`` with ``reconciled``).
``lost``
    ``queued`` or ``running`` with a task id that neither the broker nor any worker
    holds: Redis restarted without persistence, or the whole worker was SIGKILLed
    (`triage_node.reconcile.resend_lost_jobs`, ``job.reenqueued``). The state is kept.

One scheduler runs all three: the beat (`worker.celery_app.beat_schedule`) sends
``worker.reconcile`` every ``reconcile_interval_s``, and whichever worker takes it runs
`sweep` with every step. There is one beat per site however many workers and listeners
run (compose runs it as its own service; the demo's worker embeds it), so there is one
loop and one schedule. The steps are still safe to run from several processes at once (a
second beat by mistake, a manual run): a state change is a guarded UPDATE
(`triage_node.jobs.transitions`), and only the process that won it sends the job.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from triage_node.config import Settings
from triage_node.db.models import Job, JobState
from triage_node.db.session import transaction
from triage_node.jobs.transitions import requeue_job
from triage_node.logs import get_logger
from triage_node.queue import EnqueueOutcome, JobEnqueuer, reconcile_queued_jobs
from triage_node.reconcile import Resent, resend_lost_jobs
from triage_node.timeutil import utcnow

log = get_logger(__name__)

STALE, UNSENT, LOST = "stale", "unsent", "lost"
STEPS = (STALE, UNSENT, LOST)
#: Seconds past the task's hard time limit before a running job counts as stale.
STALE_MARGIN_S = 60
#: ``unsent``: a queued job this old was not sent when it was committed (broker down).
UNSENT_AFTER_S = 30
#: ``lost``: jobs sent or started this recently are left alone (a worker may be about to ack).
LOST_GRACE_S = 120


def requeue_stale(
    session_factory: sessionmaker[Session],
    settings: Settings,
    enqueue: Callable[[int], Any],
    now: datetime | None = None,
    *,
    actor: str = "worker",
) -> list[int]:
    """The ``stale`` step: running jobs past ``task_time_limit_s + 60`` s go back to the queue.

    Parameters
    ----------
    enqueue : callable
        ``enqueue(job_id)`` sends one queued job (`triage_node.queue.JobEnqueuer.enqueue`).
        Only the jobs this call moved are sent.

    Returns
    -------
    list of int
        The ids of the jobs sent again.
    """
    cutoff = (now or utcnow()) - timedelta(seconds=settings.task_time_limit_s + STALE_MARGIN_S)
    with transaction(session_factory) as session:
        candidates = session.scalars(
            select(Job.id).where(Job.state == JobState.running, Job.started_at < cutoff).order_by(Job.id)
        ).all()
        requeued = [job_id for job_id in candidates
                    if requeue_job(session, job_id, started_before=cutoff, actor=actor)]
    for job_id in requeued:
        enqueue(job_id)
        log.warning("job.requeued", job_id=job_id, reason="worker lost")
    return requeued


@dataclass(frozen=True)
class SweepReport:
    """What one `sweep` did, by step."""

    requeued: list[int] = field(default_factory=list)
    sent: list[EnqueueOutcome] = field(default_factory=list)
    resent: list[Resent] = field(default_factory=list)


def _seconds(value: timedelta | float) -> timedelta:
    return value if isinstance(value, timedelta) else timedelta(seconds=float(value))


def sweep(
    enqueuer: JobEnqueuer,
    settings: Settings | None = None,
    *,
    steps: Iterable[str] = STEPS,
    unsent_after: timedelta | float = UNSENT_AFTER_S,
    grace: timedelta | float = LOST_GRACE_S,
    inspect_timeout: float = 1.0,
    now: datetime | None = None,
    actor: str = "worker",
) -> SweepReport:
    """Run the chosen steps, in the order ``stale``, ``unsent``, ``lost`` (see module doc).

    Parameters
    ----------
    enqueuer : JobEnqueuer
        Its sessions and Celery client are used by every step.
    settings : Settings, optional
        Needed by ``stale`` (``task_time_limit_s``).
    steps : iterable of str
        A subset of `STEPS`.
    unsent_after : timedelta or float (seconds)
        ``unsent``: only jobs created at least this long ago.
    grace : timedelta or float (seconds)
        ``lost``: leave jobs sent or started less than this long ago alone.
    inspect_timeout : float
        ``lost``: seconds to wait for the workers' replies.
    actor : str
        Who the ``stale`` step's audit rows name.
    """
    chosen = set(steps)
    unknown = chosen - set(STEPS)
    if unknown:
        raise ValueError(f"unknown sweep steps {sorted(unknown)}; steps are {STEPS}")
    factory = enqueuer.session_factory
    requeued = []
    if STALE in chosen:
        if settings is None:
            raise ValueError("the stale step needs settings (task_time_limit_s)")
        requeued = requeue_stale(factory, settings, enqueuer.enqueue, now, actor=actor)
    sent = (reconcile_queued_jobs(factory, enqueuer, older_than=unsent_after)
            if UNSENT in chosen else [])
    resent = (resend_lost_jobs(factory, enqueuer.client, grace=_seconds(grace),
                               inspect_timeout=inspect_timeout)
              if LOST in chosen else [])
    return SweepReport(requeued, sent, resent)

