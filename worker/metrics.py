"""The worker's own ``/metrics``: histograms and counters observed at the event.

- ``triage_stage_seconds{stage}``: each stage of a job, observed once its result is
  committed (``completeness``, ``queue_wait``, ``inference``, ``reporting``,
  ``end_to_end`` = last image received to SR written).
- ``triage_result_at_pacs_seconds{destination}``: last image received to the job's last
  result object stored at that destination, observed when the peer confirmed it.
- ``triage_results_delivered_total{destination}``: jobs whose results all reached it.
- ``triage_delivery_tries_total{destination,outcome}``: every try to send an object.

Celery's prefork pool runs tasks in child processes, so the values go through
prometheus_client's multiprocess mode (`enable_multiprocess`): each process writes its
own file in a folder private to this worker, and the server started in the parent
(`start_server`, port ``worker_metrics_port``) sums them at each scrape. A scrape costs
the same on the first day and after a year. Values start from zero when the worker
restarts; Prometheus's ``rate`` and ``increase`` take that in their stride.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server, values
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from triage_node.logs import get_logger
from triage_node.metrics import AT_PACS_BUCKETS, STAGE_BUCKETS, BuildInfo, BuildInfoCollector
from triage_node.timeutil import as_utc

log = get_logger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: Every metric here has labels, so its values are created at the first observation,
#: after `enable_multiprocess` has chosen where they are kept.
REGISTRY = CollectorRegistry(auto_describe=True)
STAGE_SECONDS = Histogram(
    "triage_stage_seconds", "Pipeline stage latency, observed when the job's result is written",
    ["stage"], buckets=STAGE_BUCKETS, registry=REGISTRY,
)
RESULT_AT_PACS_SECONDS = Histogram(
    "triage_result_at_pacs_seconds",
    "Last image received to the job's last result object stored at the destination",
    ["destination"], buckets=AT_PACS_BUCKETS, registry=REGISTRY,
)
RESULTS_DELIVERED = Counter(
    "triage_results_delivered", "Jobs whose result objects all reached the destination",
    ["destination"], registry=REGISTRY,
)
DELIVERY_TRIES = Counter(
    "triage_delivery_tries", "Tries to send an outbox object, by outcome",
    ["destination", "outcome"], registry=REGISTRY,
)

#: (stage, start column, end column) of `triage_node.db.models.Job`.
STAGES = (
    ("completeness", "last_instance_at", "series_complete_at"),
    ("queue_wait", "enqueued_at", "started_at"),
    ("inference", "started_at", "inferred_at"),
    ("reporting", "inferred_at", "reported_at"),
    ("end_to_end", "last_instance_at", "reported_at"),
)



def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    start, end = as_utc(start), as_utc(end)
    if start is None or end is None:
        return None
    return max(0.0, (end - start).total_seconds())


def observe_stages(job: Any) -> None:
    """Observe each stage of a job whose result was just committed."""
    for stage, start, end in STAGES:
        seconds = _seconds(getattr(job, start), getattr(job, end))
        if seconds is not None:
            STAGE_SECONDS.labels(stage).observe(seconds)


def observe_delivered(destination: str, last_instance_at: datetime | None, delivered_at: datetime) -> None:
    """A job's results all reached ``destination`` (called once per job and destination)."""
    RESULTS_DELIVERED.labels(destination).inc()
    seconds = _seconds(last_instance_at, delivered_at)
    if seconds is not None:
        RESULT_AT_PACS_SECONDS.labels(destination).observe(seconds)


def count_try(destination: str, outcome: str) -> None:
    DELIVERY_TRIES.labels(destination, outcome).inc()


# -- exposition ----------------------------------------------------------------------------
def enable_multiprocess() -> str:
    """Keep the values in files that every pool process of this worker shares; returns
    the folder. Call in the parent before the pool forks.

    The folder is private to this worker (a fresh temporary one, removed at exit): the
    spool volume is shared with other workers, whose values would otherwise be summed in.
    """
    folder = tempfile.mkdtemp(prefix="triage-worker-metrics-")
    os.environ[MULTIPROC_ENV] = folder
    # prometheus_client picks its value class when imported; pick again now that the
    # folder is set (labelled children created from here on use it).
    values.ValueClass = values.get_value_class()
    atexit.register(shutil.rmtree, folder, True)
    return folder


class _Sources(Collector):
    def __init__(self, *sources: Any) -> None:
        self.sources = sources

    def collect(self) -> Iterator[Any]:
        for source in self.sources:
            yield from source.collect()


def exposition_registry(build: BuildInfo) -> CollectorRegistry:
    """What the worker's ``/metrics`` serves: the event metrics (summed over the pool
    processes in multiprocess mode) and ``triage_build_info``."""
    registry = CollectorRegistry(auto_describe=False)
    folder = os.environ.get(MULTIPROC_ENV)
    events: Any = MultiProcessCollector(None, path=folder) if folder else REGISTRY
    registry.register(_Sources(events, BuildInfoCollector(build)))
    return registry


def start_server(host: str, port: int, build: BuildInfo) -> None:
    """Serve ``/metrics`` on ``host:port`` from a daemon thread of this process."""
    start_http_server(port, addr=host, registry=exposition_registry(build))
    log.info("worker.metrics_served", host=host, port=port)
