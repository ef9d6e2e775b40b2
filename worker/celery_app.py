"""The worker's Celery application.

Configured from :func:`triage_node.queue.celery_config` (the same settings the node
uses to enqueue), plus what only the consuming side needs:

- ``stat`` before ``routine``: with Redis, kombu's ``queue_order_strategy='priority'``
  makes BRPOP list the queues in the order the worker consumes them (``-Q stat,routine``);
  with the embedded filesystem broker, ``triage_node.fs_broker`` polls the queues in a
  fixed order instead of kombu's round robin (node and worker share that transport). With a prefetch of 1 and late
  acknowledgement the worker holds no message it is not running, so a stat job waits at
  most for the job in progress.
- late acknowledgement, rejection (requeue) when a pool process dies, a soft and a hard
  time limit per task, and per-process clients built in ``worker_process_init``
  (STYLE.md 5, 6).
- ``task_id`` and ``job_id`` bound in structlog's context variables at ``task_prerun``.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, signals

from triage_node import QUEUE_ROUTINE
from triage_node.config import Settings, get_settings
from triage_node.logs import get_logger

log = get_logger(__name__)


def worker_config(settings: Settings) -> dict[str, Any]:
    """Celery settings of the consuming side, on top of ``triage_node.queue.celery_config``."""
    from triage_node.queue import celery_config

    conf = dict(celery_config(settings))
    hard = int(settings.task_time_limit_s)
    conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=hard,
        task_soft_time_limit=max(hard - 30, 5),
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_send_task_events=False,
        broker_connection_retry_on_startup=True,
        include=["worker.tasks"],
    )
    options = dict(conf.get("broker_transport_options") or {})
    broker = str(conf.get("broker_url") or settings.effective_broker_url)
    if broker.startswith(("redis://", "rediss://", "redis+socket://")):
        options["queue_order_strategy"] = "priority"
        # An unacknowledged message whose worker vanished comes back after this long;
        # keep it above the hard time limit so a slow task is not run twice.
        options.setdefault("visibility_timeout", hard + 60)
    conf["broker_transport_options"] = options
    return conf


def create_app(settings: Settings | None = None) -> Celery:
    """A Celery app configured for ``settings`` (default: the process settings)."""
    settings = settings or get_settings()
    celery = Celery("triage")
    celery.conf.update(worker_config(settings))
    return celery


app = create_app()


# -- per-process clients and logging context ------------------------------------------
@signals.worker_process_init.connect
def _init_process(**_: Any) -> None:
    """Build the DB engine, model card and inference backend once per pool process."""
    from sqlalchemy.exc import OperationalError

    from worker.inference.base import BackendUnavailable
    from worker.pipeline.context import init_context

    try:
        init_context(get_settings())
    except (BackendUnavailable, OperationalError) as exc:
        # Transient: the first task builds the context again (and retries with backoff).
        log.warning("worker.process_init_deferred", error=str(exc)[:300])


@signals.worker_process_shutdown.connect
def _close_process(**_: Any) -> None:
    from worker.pipeline.context import close_context

    close_context()


@signals.task_prerun.connect
def _bind_task(task_id: str | None = None, args: Any = None, kwargs: Any = None, **_: Any) -> None:
    import structlog

    structlog.contextvars.clear_contextvars()
    values: dict[str, Any] = {"task_id": task_id}
    if args:
        values["job_id"] = args[0]
        if len(args) > 1:
            values["job_version"] = args[1]
    elif kwargs and "job_id" in kwargs:
        values["job_id"] = kwargs["job_id"]
    structlog.contextvars.bind_contextvars(**values)


@signals.task_postrun.connect
def _unbind_task(**_: Any) -> None:
    import structlog

    structlog.contextvars.clear_contextvars()


def beat_schedule(settings: Settings) -> dict[str, Any]:
    """Periodic tasks of the beat: the sweep of stuck jobs every ``reconcile_interval_s``,
    due deliveries every few seconds (when there are destinations; HL7 messages when there
    is a RIS), and the retention cleaner every ``retention_interval_s`` (when enabled)."""
    every = max(1.0, min(float(settings.delivery_backoff_base_s), 5.0))
    schedule: dict[str, Any] = {
        "reconcile": {
            "task": "worker.reconcile",
            "schedule": settings.reconcile_interval_s,
            # a late sweep is replaced by the next one, never stacked behind it
            "options": {"queue": QUEUE_ROUTINE, "expires": settings.reconcile_interval_s},
        }
    }
    if settings.destinations:
        schedule["deliver-due"] = {
            "task": "worker.deliver_due",
            "schedule": every,
            "options": {"queue": QUEUE_ROUTINE, "expires": 4 * every},
        }
    if settings.hl7_host:
        schedule["deliver-hl7-due"] = {
            "task": "worker.deliver_hl7_due",
            "schedule": every,
            "options": {"queue": QUEUE_ROUTINE, "expires": 4 * every},
        }
    if settings.retention_enabled:
        # The cleaner: eligibility is re-checked per study, so a late or doubled run is harmless.
        schedule["retention"] = {
            "task": "worker.retention",
            "schedule": settings.retention_interval_s,
            "options": {"queue": QUEUE_ROUTINE, "expires": settings.retention_interval_s},
        }
    return schedule
