"""kombu's filesystem transport, made safe for the node and the worker to share.

The embedded default broker (no server) is kombu's ``filesystem://`` transport. Two
things about the stock transport are wrong for this product, and both sides of the
queue (the node that sends, the worker that consumes) must use this class:

- it polls queues round robin; here ``stat`` is always served before ``routine``;
- its producer creates, then locks and writes message and exchange files, so a
  consumer (or a second process starting at the same moment) can take an empty file:
  a lost message or a ``JSONDecodeError``. This class never takes a file its producer
  has not finished, and creates exchange files without truncating them.

``triage_node.queue.celery_config`` selects it for ``filesystem://`` brokers.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import time
from queue import Empty
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import bytes_to_str, str_to_bytes
from kombu.utils.json import dumps, loads
from kombu.utils.scheduling import FairCycle

from triage_node import QUEUES

#: Queues in the order they are served; anything else after them.
QUEUE_ORDER: tuple[str, ...] = QUEUES


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

    def _get(self, queue: str, timeout: float | None = None) -> Any:
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
