"""The Celery side of the node: configuration shared with the worker, and enqueueing.

The node never imports the worker's tasks: it sends them by name
(``send_task("worker.triage_job", args=[job_id, version])``, DESIGN.md "Top level").
A job is always committed to the database *before* its task is sent
(STYLE.md 5), so a broker outage leaves a ``queued`` job with no ``enqueued_at``
that `reconcile_queued_jobs` sends later.

Queues
------
``stat``
    Studies from calling AEs listed in ``settings.stat_calling_aes`` or ordered with
    RequestedProcedurePriority (0040,1003) ``STAT`` (PS3.3 C.4.11).
``routine``
    Everything else.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from celery import Celery
from kombu import Exchange, Queue
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from triage_node import QUEUE_ROUTINE, QUEUE_STAT, QUEUES
from triage_node.config import Settings
from triage_node.db import audit
from triage_node.db.models import Instance, Job, JobState, Series, Study
from triage_node.db.session import transaction
from triage_node.jobs.transitions import retry_job
from triage_node.logs import get_logger
from triage_node.timeutil import utcnow

log = get_logger(__name__)

TASK_NAME = "worker.triage_job"
#: Redis message priority per queue (kombu: 0 is the most urgent).
QUEUE_PRIORITY = {QUEUE_STAT: 0, QUEUE_ROUTINE: 5}
#: Values of RequestedProcedurePriority (0040,1003) that mean STAT (PS3.3 C.4.11).
STAT_PRIORITIES = frozenset({"STAT"})
ACTOR = "node"


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery configuration shared by the node (sender) and the worker (consumer).

    With the embedded default (``broker_url`` unset) the broker is kombu's
    ``filesystem://`` transport under ``settings.broker_folder``; its folders are
    created here so that either side may start first.

    Parameters
    ----------
    settings : Settings
        The node's settings.

    Returns
    -------
    dict
        Keys for ``Celery.conf.update``.
    """
    broker = settings.effective_broker_url
    exchange = Exchange("triage", type="direct")
    config: dict[str, Any] = {
        "broker_url": broker,
        "result_backend": settings.effective_result_backend,
        "task_queues": tuple(Queue(name, exchange, routing_key=name) for name in QUEUES),
        "task_default_queue": QUEUE_ROUTINE,
        "task_default_exchange": "triage",
        "task_default_routing_key": QUEUE_ROUTINE,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": 4.0,
        "enable_utc": True,
        "timezone": "UTC",
    }
    if broker.startswith("filesystem"):
        queue_folder = settings.broker_folder / "queue"
        processed = settings.broker_folder / "processed"
        control = settings.broker_folder / "control"
        for folder in (queue_folder, processed, control):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        config["broker_transport_options"] = {
            "data_folder_in": str(queue_folder),
            "data_folder_out": str(queue_folder),
            "processed_folder": str(processed),
            "control_folder": str(control),
            "store_processed": False,
            "polling_interval": 0.1,
        }
        # Both sides use the safe transport: the stock one can lose a message that a
        # consumer takes while its producer is still writing it (triage_node/fs_broker.py).
        config["broker_transport"] = "triage_node.fs_broker:PriorityFilesystemTransport"
        config["worker_pool_restarts"] = False
    elif broker.startswith(("redis://", "rediss://")):
        config["broker_transport_options"] = {
            "priority_steps": list(range(10)),
            "sep": ":",
            "queue_order_strategy": "priority",
            "visibility_timeout": 3600,
            "socket_connect_timeout": 3,
            "socket_timeout": 5,
        }
    return config


def make_client(settings: Settings) -> Celery:
    """A Celery app that only sends tasks (no worker tasks are imported)."""
    client = Celery("triage-node", set_as_current=False)
    client.conf.update(celery_config(settings))
    return client


def enqueue_job(client: Celery, job_id: int, version: int, queue: str) -> str:
    """Send ``worker.triage_job(job_id, version)`` to ``queue``; return the task id.

    Raises
    ------
    ValueError
        ``queue`` is not ``stat`` or ``routine``.
    kombu.exceptions.OperationalError
        The broker cannot be reached (after a short retry).
    """
    if queue not in QUEUES:
        raise ValueError(f"queue must be one of {QUEUES}, not {queue!r}")
    result = client.send_task(
        TASK_NAME,
        args=[int(job_id), int(version)],
        queue=queue,
        routing_key=queue,
        priority=QUEUE_PRIORITY[queue],
        retry=True,
        retry_policy={"max_retries": 2, "interval_start": 0.1, "interval_step": 0.2,
                      "interval_max": 0.5},
    )
    return str(result.id)


def choose_queue(settings: Settings, session: Session, series: Series) -> tuple[str, str]:
    """Queue for a job on ``series`` and the reason, from calling AE or ordered priority."""
    study: Study = series.study
    if (study.requested_priority or "").strip().upper() in STAT_PRIORITIES:
        return QUEUE_STAT, "requested priority STAT"
    stat_aes = {ae.strip() for ae in settings.stat_calling_aes}
    if stat_aes:
        callers = set(
            session.scalars(
                select(Instance.calling_ae).where(Instance.series_id == series.id).distinct()
            )
        )
        callers.add(study.calling_ae)
        matched = sorted(a for a in callers if a and a.strip() in stat_aes)
        if matched:
            return QUEUE_STAT, f"calling AE {matched[0]}"
    return QUEUE_ROUTINE, "default"


@dataclass(frozen=True)
class EnqueueOutcome:
    """What happened to one job: sent (with its task id) or left queued (with the error)."""

    job_id: int
    sent: bool
    task_id: str | None = None
    error: str | None = None


class JobEnqueuer:
    """Send committed jobs to Celery and record the outcome (``job.enqueued`` audit).

    Callable with an iterable of job ids, which is how `CompletenessTracker` uses it.
    Thread-safe: Celery's producer pool is shared, database work uses fresh sessions.

    Parameters
    ----------
    session_factory : sessionmaker
        Database sessions.
    client : Celery
        From `make_client`.
    """

    def __init__(self, session_factory: sessionmaker[Session], client: Celery) -> None:
        self.session_factory = session_factory
        self.client = client
        self._lock = threading.Lock()

    def __call__(self, job_ids: Iterable[int]) -> list[EnqueueOutcome]:
        return [self.enqueue(job_id) for job_id in job_ids]

    def enqueue(self, job_id: int, *, reconciled: bool = False) -> EnqueueOutcome:
        """Send one job if it is still ``queued``; never inside a transaction."""
        with self.session_factory() as session:
            job = session.get(Job, job_id)
            if job is None or job.state != JobState.queued:
                return EnqueueOutcome(job_id, sent=False, error="job is not queued")
            version, queue = job.version, job.queue
        try:
            task_id = enqueue_job(self.client, job_id, version, queue)
        except Exception as exc:  # noqa: BLE001 - any broker failure leaves the job queued
            error = f"{type(exc).__name__}: {exc}"
            log.warning("job.enqueue_failed", job_id=job_id, queue=queue, error=error)
            with transaction(self.session_factory) as session:
                job = session.get(Job, job_id)
                audit.record(
                    session, "job.enqueue_failed", actor=ACTOR, outcome="error",
                    job_id=job_id, study_uid=_study_uid(session, job),
                    series_uid=_series_uid(session, job), queue=queue, version=version,
                    error=error[:500], left_queued_for="reconciler",
                )
            return EnqueueOutcome(job_id, sent=False, error=error)
        enqueued_at = utcnow()
        with transaction(self.session_factory) as session:
            job = session.get(Job, job_id)
            if job is None:  # removed (retention) after it was sent: the worker finds no job to run
                log.warning("job.enqueued_gone", job_id=job_id, queue=queue, task_id=task_id)
                return EnqueueOutcome(job_id, sent=True, task_id=task_id)
            job.task_id = task_id
            job.enqueued_at = enqueued_at
            latency = _seconds(job.last_instance_at, enqueued_at)
            audit.record(
                session, "job.enqueued", actor=ACTOR, job_id=job_id,
                study_uid=_study_uid(session, job), series_uid=_series_uid(session, job),
                queue=queue, version=version, task_id=task_id, reconciled=reconciled,
                seconds_since_last_instance=latency,
            )
        log.info("job.enqueued", job_id=job_id, version=version, queue=queue,
                 task_id=task_id, seconds_since_last_instance=latency)
        return EnqueueOutcome(job_id, sent=True, task_id=task_id)


def _seconds(start: datetime | None, end: datetime) -> float | None:
    if start is None:
        return None
    if start.tzinfo is None:  # SQLite returns naive datetimes (stored as UTC)
        start = start.replace(tzinfo=UTC)
    return round((end - start).total_seconds(), 4)


def _series_uid(session: Session, job: Job | None) -> str | None:
    if job is None:
        return None
    series = session.get(Series, job.series_id)
    return series.series_uid if series else None


def _study_uid(session: Session, job: Job | None) -> str | None:
    if job is None:
        return None
    study = session.get(Study, job.study_id)
    return study.study_uid if study else None


def reconcile_queued_jobs(
    session_factory: sessionmaker[Session],
    client: Celery | JobEnqueuer,
    older_than: timedelta | float = 30.0,
    *,
    resend_sent_after: timedelta | float | None = None,
) -> list[EnqueueOutcome]:
    """Send jobs that were committed but never reached the broker.

    Parameters
    ----------
    session_factory : sessionmaker
        Database sessions.
    client : Celery or JobEnqueuer
        Where to send.
    older_than : timedelta or float (seconds)
        Only jobs created at least this long ago (so that a job whose first send is
        in flight is not sent twice).
    resend_sent_after : timedelta or float (seconds), optional
        Also resend jobs that were sent this long ago and are still ``queued`` (a
        broker that lost its messages, e.g. Redis without persistence). The worker
        is idempotent per (job, version), so a duplicate delivery is harmless.

    Returns
    -------
    list of EnqueueOutcome
    """
    enqueuer = client if isinstance(client, JobEnqueuer) else JobEnqueuer(session_factory, client)
    now = utcnow()
    cutoff = now - _delta(older_than)
    with session_factory() as session:
        query = select(Job.id).where(Job.state == JobState.queued)
        unsent = session.scalars(
            query.where(Job.enqueued_at.is_(None), Job.created_at <= cutoff).order_by(Job.id)
        ).all()
        stale: list[int] = []
        if resend_sent_after is not None:
            stale = list(session.scalars(
                query.where(Job.enqueued_at <= now - _delta(resend_sent_after)).order_by(Job.id)
            ))
    outcomes = [enqueuer.enqueue(job_id, reconciled=True) for job_id in [*unsent, *stale]]
    if outcomes:
        log.info("jobs.reconciled", sent=sum(o.sent for o in outcomes), total=len(outcomes))
    return outcomes


def _delta(value: timedelta | float) -> timedelta:
    return value if isinstance(value, timedelta) else timedelta(seconds=float(value))


def retry_failed_jobs(
    session_factory: sessionmaker[Session],
    client: Celery,
    *,
    actor: str,
    job_ids: Iterable[int] | None = None,
) -> list[EnqueueOutcome]:
    """Put jobs that failed for good back on the queue, at the same version.

    A job fails for good after its retries ran out (an inference backend or database
    that stayed down); once the cause is fixed an operator sends it again. Only
    ``failed`` jobs are touched; each is audited (``job.retried``) and then sent like
    a new job (the worker runs a failed job of the same version again).
    """
    with transaction(session_factory) as session:
        query = select(Job.id).where(Job.state == JobState.failed)
        if job_ids is not None:
            query = query.where(Job.id.in_(list(job_ids)))
        ids = [job_id for job_id in session.scalars(query.order_by(Job.id)).all()
               if retry_job(session, job_id, actor=actor)]
    return JobEnqueuer(session_factory, client)(ids)
