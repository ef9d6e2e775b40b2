"""The worker's Celery application.

Configured from :func:`triage_node.queue.celery_config` (the same settings the node
uses to enqueue), plus what only the consuming side needs:

- ``stat`` before ``routine``: with Redis, kombu's ``queue_order_strategy='priority'``
  makes BRPOP list the queues in the order the worker consumes them (``-Q stat,routine``);
  with the embedded filesystem broker, :class:`PriorityFilesystemTransport` polls the
  queues in a fixed order instead of kombu's round robin. With a prefetch of 1 and late
  acknowledgement the worker holds no message it is not running, so a stat job waits at
  most for the job in progress.
- late acknowledgement, rejection (requeue) when a pool process dies, a soft and a hard
  time limit per task, and per-process clients built in ``worker_process_init``
  (STYLE.md 5, 6).
- ``task_id`` and ``job_id`` bound in structlog's context variables at ``task_prerun``.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import time
from queue import Empty
from typing import Any

from celery import Celery, signals
from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import bytes_to_str, str_to_bytes
from kombu.utils.json import dumps, loads
from kombu.utils.scheduling import FairCycle

from triage_node.config import Settings, get_settings
from triage_node.logs import get_logger

log = get_logger(__name__)

#: Queues in the order they are served; anything else after them.
QUEUE_ORDER: tuple[str, ...] = ("stat", "routine")


def _rank(queue: str) -> tuple[int, str]:
    return (QUEUE_ORDER.index(queue) if queue in QUEUE_ORDER else len(QUEUE_ORDER), queue)


class PriorityCycle(FairCycle):
    """Poll queues in :data:`QUEUE_ORDER` every time, instead of kombu's round robin."""

    def get(self, callback: Any, **kwargs: Any) -> Any:
        for resource in sorted(self.resources, key=_rank):
            try:
                return self.fun(resource, callback, **kwargs)
            except self.predicate:
                continue
        raise self.predicate()


def message_file_complete(path: str) -> bool:
    """True when a producer has finished writing the message file at ``path``.

    kombu's filesystem producer creates the file, then takes an exclusive ``flock``,
    writes and unlocks: a file that is empty or still locked is being written, and
    moving it away then (as kombu's own consumer may) loses the message or crashes the
    consumer on an empty payload.
    """
    try:
        with open(path, "rb") as fh:
            if os.fstat(fh.fileno()).st_size == 0:
                return False
            try:
                fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            fcntl.flock(fh, fcntl.LOCK_UN)
            return True
    except OSError:
        return False


class PriorityFilesystemChannel(filesystem.Channel):
    """kombu's filesystem channel with stat-first polling and without its start-up races.

    - no message file is taken before its producer has finished writing it;
    - the exchange table (``control/<exchange>.exchange``) is created without truncation
      and read as empty while its creator has not written it yet, so a node and a worker
      that start at the same moment do not crash each other with ``JSONDecodeError``.
    """

    def get_table(self, exchange: str) -> list[Any]:
        file = self._exchange_file(exchange)
        for _ in range(200):
            try:
                with file.open("rb") as fh:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_SH)
                    try:
                        data = fh.read()
                    finally:
                        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
            except FileNotFoundError:
                return []
            except OSError as exc:
                raise ChannelError(f"Cannot open {file}") from exc
            if data.strip():
                return [filesystem.exchange_queue_t(*q) for q in loads(bytes_to_str(data))]
            time.sleep(0.01)  # created by another process that has not written it yet
        return []

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        file = self._exchange_file(exchange)
        self.control_folder.mkdir(exist_ok=True)
        entry = filesystem.exchange_queue_t(routing_key or "", pattern or "", queue or "")
        try:
            fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o600)  # never truncates
        except OSError as exc:
            raise ChannelError(f"Cannot open {file}") from exc
        with os.fdopen(fd, "rb+", buffering=0) as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                data = fh.read()
                queues = [filesystem.exchange_queue_t(*q) for q in loads(bytes_to_str(data))] if data.strip() else []
                if entry not in queues:
                    queues.insert(0, entry)
                    fh.seek(0)
                    fh.truncate()
                    fh.write(str_to_bytes(dumps(queues)))
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _reset_cycle(self) -> None:
        self._cycle = PriorityCycle(self._get_and_deliver, self._active_queues, Empty)

    def _get(self, queue: str) -> Any:
        suffix = f"{queue}.msg"
        for filename in sorted(os.listdir(self.data_folder_in)):
            if filename.partition(".")[2] != suffix:
                continue
            path = os.path.join(self.data_folder_in, filename)
            if not message_file_complete(path):
                continue
            target = self.processed_folder if self.store_processed else tempfile.gettempdir()
            try:
                shutil.move(path, target)
            except OSError:  # taken by another consumer in the meantime
                continue
            moved = os.path.join(target, filename)
            try:
                with open(moved, "rb") as fh:
                    payload = fh.read()
                if not self.store_processed:
                    os.remove(moved)
            except OSError as exc:
                raise ChannelError(f"cannot read {moved!r} from the queue") from exc
            return loads(bytes_to_str(payload))
        raise Empty()


class PriorityFilesystemTransport(filesystem.Transport):
    """kombu's filesystem transport (same folder format) with stat-first polling."""

    Channel = PriorityFilesystemChannel


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
    elif broker.startswith("filesystem://"):
        conf["broker_transport"] = f"{__name__}:PriorityFilesystemTransport"
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
    from worker.pipeline.run import init_context

    try:
        init_context(get_settings())
    except (BackendUnavailable, OperationalError) as exc:
        # Transient: the first task builds the context again (and retries with backoff).
        log.warning("worker.process_init_deferred", error=str(exc)[:300])


@signals.worker_process_shutdown.connect
def _close_process(**_: Any) -> None:
    from worker.pipeline.run import close_context

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
    """Periodic tasks of the embedded beat: due deliveries every few seconds (when there
    are destinations), jobs of vanished workers every minute."""
    every = max(1.0, min(float(settings.delivery_backoff_base_s), 5.0))
    schedule: dict[str, Any] = {
        "requeue-stale": {
            "task": "worker.requeue_stale",
            "schedule": 60.0,
            "options": {"queue": "routine", "expires": 120.0},
        }
    }
    if settings.destinations:
        schedule["deliver-due"] = {
            "task": "worker.deliver_due",
            "schedule": every,
            "options": {"queue": "routine", "expires": 4 * every},
        }
    return schedule
