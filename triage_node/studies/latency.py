"""The product's main figure: time from the last instance received to the job enqueued.

Read back from the timestamps `triage_node.studies.completeness` keeps on each job
(``last_instance_at``, ``series_complete_at``, ``enqueued_at``). Kept apart from the
tracker that writes them: this is a read-only report over job rows, for the benchmarks
and the tests, and nothing on the ingest path calls it.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from triage_node.db.models import Job, Series
from triage_node.timeutil import as_utc


@dataclass(frozen=True)
class JobLatency:
    """Stage times of one job, in seconds from the last instance received."""

    job_id: int
    version: int
    queue: str
    completion_reason: str | None
    last_instance_at: datetime
    series_complete_at: datetime | None
    enqueued_at: datetime
    complete_s: float | None
    enqueue_s: float


def enqueue_latencies(
    session_factory: sessionmaker[Session], since: datetime | None = None
) -> list[JobLatency]:
    """Time from the last C-STORE (instance row committed, just before the success
    response) to the series being complete and to the job being enqueued, per job.

    The benchmark calls this after sending studies; only jobs that were enqueued count.
    """
    with session_factory() as session:
        query = (
            select(Job, Series.completion_reason)
            .join(Series, Series.id == Job.series_id)
            .where(Job.enqueued_at.is_not(None), Job.last_instance_at.is_not(None))
            .order_by(Job.id)
        )
        if since is not None:
            query = query.where(Job.created_at >= since)
        rows = session.execute(query).all()
    out = []
    for job, reason in rows:
        last = as_utc(job.last_instance_at)
        complete = as_utc(job.series_complete_at)
        enqueued = as_utc(job.enqueued_at)
        assert last is not None and enqueued is not None  # the query keeps only rows with both
        out.append(JobLatency(
            job_id=job.id, version=job.version, queue=job.queue, completion_reason=reason,
            last_instance_at=last, series_complete_at=complete, enqueued_at=enqueued,
            complete_s=(complete - last).total_seconds() if complete else None,
            enqueue_s=(enqueued - last).total_seconds(),
        ))
    return out


def enqueue_latency_summary(
    session_factory: sessionmaker[Session], since: datetime | None = None
) -> dict[str, float | int | None]:
    """``count``, ``median_s``, ``p95_s``, ``max_s`` of last-instance-to-enqueue times."""
    values = sorted(item.enqueue_s for item in enqueue_latencies(session_factory, since))
    if not values:
        return {"count": 0, "median_s": None, "p95_s": None, "max_s": None}
    p95 = values[min(len(values) - 1, int(round(0.95 * (len(values) - 1))))]
    return {
        "count": len(values),
        "median_s": round(statistics.median(values), 4),
        "p95_s": round(p95, 4),
        "max_s": round(values[-1], 4),
    }
