"""Re-send jobs that the database says are waiting or running but nobody holds.

`triage_node.queue.reconcile_queued_jobs` sends jobs that never reached the broker. It
cannot see jobs that *did* reach it and were lost afterwards:

- **Redis restarted without persistence** (or flushed): every waiting message is gone,
  and so are the delivered-but-unacknowledged ones; the jobs stay ``queued`` or
  ``running`` in the database forever.
- **The whole worker SIGKILLed** mid-job (not only a pool process): with late
  acknowledgement the message sits in Redis's ``unacked`` hash until the visibility
  timeout (an hour) before anyone runs it again.

`reconcile_lost_jobs` asks the broker which task ids are waiting in its queues and the
workers (Celery's remote-control ``inspect``) which ones they hold (active, reserved,
scheduled). A job ``queued`` or ``running`` for longer than ``grace`` whose task id is in
neither is *lost*: it is sent again under a new task id, with a ``job.reenqueued`` audit
row. A job that was running keeps its state, so the worker records the new run as a
re-run after interruption; `worker.pipeline.run.run_job` is idempotent per (job,
version), so a message that reappears later (the visibility timeout) is skipped as
already done.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from celery import Celery
from sqlalchemy import or_, select
from sqlalchemy.orm import Session, sessionmaker

from triage_node import QUEUES
from triage_node.db import audit
from triage_node.db.models import Job, JobState, Series, Study
from triage_node.db.session import transaction
from triage_node.logs import get_logger
from triage_node.queue import enqueue_job, reconcile_queued_jobs
from triage_node.timeutil import utcnow

log = get_logger(__name__)

ACTOR = "node"
#: Redis list suffixes kombu uses for message priorities (``queue``, ``queue:1``, ...).
_REDIS_PRIORITIES = range(10)


class BrokerUnreadable(RuntimeError):
    """The broker's queues could not be listed; nothing is re-sent on a guess."""


def _task_id(message: Any) -> str | None:
    """Celery task id of a kombu message body (protocol 2 keeps it in ``headers.id``)."""
    if isinstance(message, (bytes, str)):
        try:
            message = json.loads(message)
        except ValueError:
            return None
    if not isinstance(message, dict):
        return None
    headers = message.get("headers") or {}
    properties = message.get("properties") or {}
    return headers.get("id") or properties.get("correlation_id")


def broker_task_ids(client: Celery, queues: Iterable[str] = QUEUES) -> set[str]:
    """Task ids of the messages waiting in the broker's ``queues``.

    Supports the two transports the node uses: Redis (the lists ``<queue>`` and
    ``<queue><sep><priority>``) and kombu's filesystem transport (one JSON file per
    message in ``data_folder_in``). Messages delivered to a consumer and not yet
    acknowledged are not "waiting": the workers report those.

    Raises
    ------
    BrokerUnreadable
        The broker cannot be reached, or its transport is not one of the two.
    """
    url = str(client.conf.broker_url or "")
    options = dict(client.conf.broker_transport_options or {})
    ids: set[str] = set()
    if url.startswith(("redis://", "rediss://")):
        import redis

        sep = options.get("sep", "\x06\x16")
        conn = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=3)
        try:
            for queue in queues:
                for priority in _REDIS_PRIORITIES:
                    key = queue if priority == 0 else f"{queue}{sep}{priority}"
                    ids.update(filter(None, map(_task_id, conn.lrange(key, 0, -1))))
        except redis.RedisError as exc:
            raise BrokerUnreadable(f"redis: {type(exc).__name__}: {exc}") from None
        finally:
            conn.close()
        return ids
    if url.startswith("filesystem"):
        folder = Path(options.get("data_folder_in", ""))
        if not folder.is_dir():
            raise BrokerUnreadable(f"filesystem broker folder {folder} is missing")
        wanted = {f"{q}.msg" for q in queues}  # files are <time>_<uuid>.<queue>.msg
        for path in folder.iterdir():
            if path.name.partition(".")[2] not in wanted:
                continue
            try:
                ids.update(filter(None, [_task_id(path.read_bytes())]))
            except OSError:  # consumed between listing and reading: a worker holds it now
                continue
        return ids
    raise BrokerUnreadable(f"cannot list messages of broker {url.split(':', 1)[0]}")


def worker_task_ids(client: Celery, timeout: float = 1.0) -> tuple[set[str], int]:
    """(task ids the workers hold: active, reserved, scheduled; number of workers that answered)."""
    inspect = client.control.inspect(timeout=timeout)
    ids: set[str] = set()
    workers: set[str] = set()
    for method in (inspect.active, inspect.reserved, inspect.scheduled):
        try:
            replies = method() or {}
        except Exception as exc:  # noqa: BLE001 - broker down: nobody answers
            log.warning("reconcile.inspect_failed", method=method.__name__, error=type(exc).__name__)
            replies = {}
        for worker, tasks in replies.items():
            workers.add(worker)
            for task in tasks or []:
                request = task.get("request", task) if isinstance(task, dict) else {}
                if request.get("id"):
                    ids.add(str(request["id"]))
    return ids, len(workers)


@dataclass(frozen=True)
class Resent:
    """One lost job sent again."""

    job_id: int
    version: int
    state: str
    old_task_id: str | None
    task_id: str | None
    error: str | None = None

    @property
    def sent(self) -> bool:
        return self.task_id is not None



def lost_job_candidates(session: Session, grace: timedelta) -> list[Job]:
    """Jobs sent (``queued``) or started (``running``) longer than ``grace`` ago."""
    cutoff = utcnow() - grace
    return list(session.scalars(
        select(Job).where(or_(
            (Job.state == JobState.queued) & Job.enqueued_at.is_not(None) & (Job.enqueued_at <= cutoff),
            (Job.state == JobState.running) & (Job.started_at <= cutoff),
        )).order_by(Job.id)
    ))


def reconcile_lost_jobs(
    session_factory: sessionmaker[Session],
    client: Celery,
    *,
    grace: timedelta | float = 60.0,
    inspect_timeout: float = 1.0,
) -> list[Resent]:
    """Send again every job that is queued or running with no live task (see module doc).

    Also runs `reconcile_queued_jobs` for jobs that were never sent.

    Parameters
    ----------
    session_factory : sessionmaker
    client : Celery
        From `triage_node.queue.make_client`.
    grace : timedelta or float (seconds)
        Leave jobs sent or started less than this long ago alone (a message on its way
        from the broker to a worker is in neither list for a moment).
    inspect_timeout : float
        Seconds to wait for the workers' replies.

    Returns
    -------
    list of Resent
        Empty when the broker could not be listed (nothing is sent on a guess).
    """
    grace = grace if isinstance(grace, timedelta) else timedelta(seconds=float(grace))
    reconcile_queued_jobs(session_factory, client, older_than=grace)
    return resend_lost_jobs(session_factory, client, grace=grace, inspect_timeout=inspect_timeout)


def resend_lost_jobs(
    session_factory: sessionmaker[Session],
    client: Celery,
    *,
    grace: timedelta,
    inspect_timeout: float = 1.0,
) -> list[Resent]:
    """The ``lost`` step of `triage_node.jobs.sweep.sweep`: `reconcile_lost_jobs` without
    the jobs that were never sent."""
    with session_factory() as session:
        candidates = [(j.id, j.version, str(j.state), j.task_id, j.queue)
                      for j in lost_job_candidates(session, grace)]
    if not candidates:
        return []
    try:
        waiting = broker_task_ids(client)
    except BrokerUnreadable as exc:
        log.warning("reconcile.broker_unreadable", error=str(exc))
        return []
    held, workers = worker_task_ids(client, inspect_timeout)
    live = waiting | held
    resent: list[Resent] = []
    for job_id, version, state, old_task, queue in candidates:
        if old_task and old_task in live:
            continue
        resent.append(_resend(session_factory, client, job_id, version, state, old_task, queue,
                              workers=workers))
    if resent:
        log.info("reconcile.lost_jobs", resent=sum(r.sent for r in resent), lost=len(resent),
                 workers=workers)
    return resent


def _resend(session_factory: sessionmaker[Session], client: Celery, job_id: int, version: int,
            state: str, old_task: str | None, queue: str, *, workers: int) -> Resent:
    with session_factory() as session:
        job = session.get(Job, job_id)
        if job is None or job.version != version or str(job.state) != state:
            return Resent(job_id, version, state, old_task, None, error="job changed meanwhile")
    try:
        task_id = enqueue_job(client, job_id, version, queue)
    except Exception as exc:  # noqa: BLE001 - broker failure: the next round tries again
        error = f"{type(exc).__name__}: {exc}"[:500]
        log.warning("reconcile.resend_failed", job_id=job_id, error=error)
        return Resent(job_id, version, state, old_task, None, error=error)
    with transaction(session_factory) as session:
        job = session.get(Job, job_id)
        if job is None:  # removed (retention) after it was sent: the worker finds no job to run
            log.warning("reconcile.resent_gone", job_id=job_id, task_id=task_id)
            return Resent(job_id, version, state, old_task, task_id)
        job.task_id = task_id
        job.enqueued_at = utcnow()
        series = session.get(Series, job.series_id)
        study = session.get(Study, job.study_id)
        audit.record(
            session, "job.reenqueued", actor=ACTOR, job_id=job_id,
            study_uid=study.study_uid if study else None,
            series_uid=series.series_uid if series else None,
            version=version, state=state, queue=queue, old_task_id=old_task, task_id=task_id,
            reason="no live task in the broker or on a worker", workers_answering=workers,
        )
    log.info("job.reenqueued", job_id=job_id, version=version, state=state, task_id=task_id)
    return Resent(job_id, version, state, old_task, task_id)
