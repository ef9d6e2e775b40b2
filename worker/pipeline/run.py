"""One triage job, end to end: spool -> volume -> inference -> heat maps -> SR + overlays -> outbox.

:func:`run_job` is the plain function behind the ``worker.triage_job`` Celery task; tests
call it directly. Its steps:

1. **claim** (one transaction, `worker.pipeline.claim`): the job must exist at the requested version and not be
   superseded; a job already ``done`` is not run again. The job becomes ``running``
   (``started_at``, ``attempts``, ``task_id``), with a ``job.started`` audit row.
2. **load** the newest version of every instance of the series from the spool and
   build the HU volume (:func:`worker.pipeline.preprocess.load_series`).
3. **infer** with the process's backend at the configured operating point
   (:func:`worker.pipeline.inference_core.run_study`).
4. **explain**: the top ``key_slices_per_class`` slices of each positive class and their
   class-activation maps (:func:`worker.pipeline.explain.cam`).
5. **report** (`worker.pipeline.report_objects`): an overlay series (secondary capture) and a DICOM SR (TID 1500) written
   under ``<data_dir>/results/<job_id>/``. Their UIDs derive from (study, series, job,
   version), so a re-run after a crash rewrites the same objects instead of adding new
   ones.
6. **record** (one transaction, `worker.pipeline.record`): the Result row (one per job), stage timestamps, one
   outbox row per object and destination, the study's worklist priority (STAT-AI when
   positive) and audit rows.

Idempotency: a re-run of the same (job, version) after a crash (late acknowledgement,
``task_reject_on_worker_lost``) leaves one Result, one SR and one outbox row per object
and destination.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from triage_node import CLASSES
from triage_node.config import Settings
from triage_node.db import audit
from triage_node.db.models import Job, OutboxItem, OutboxState, Study
from triage_node.db.session import transaction
from triage_node.jobs import fail_job
from triage_node.logs import get_logger
from triage_node.timeutil import as_utc, utcnow
from worker.pipeline.claim import JobOutcome, claim
from worker.pipeline.context import ACTOR, WorkerContext
from worker.pipeline.record import record
from worker.pipeline.report_objects import write_objects

log = get_logger(__name__)


# -- the job -------------------------------------------------------------------------------
def run_job(ctx: WorkerContext, job_id: int, version: int, *, task_id: str | None = None) -> JobOutcome:
    """Triage one job (one series at one version); see the module docstring.

    Raises
    ------
    JobError
        The job or its images are missing (not retried).
    worker.inference.BackendUnavailable, sqlalchemy.exc.OperationalError
        Transient; the task retries with backoff.
    """
    from worker.pipeline.inference_core import card_inputs, run_study
    from worker.pipeline.preprocess import load_series

    claimed = claim(ctx, job_id, version, task_id)
    if isinstance(claimed, JobOutcome):
        return claimed
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    volume = load_series(claimed.paths)
    card = ctx.card
    inputs, frame = card_inputs(volume, card)
    t1 = time.perf_counter()
    prediction = run_study(
        inputs, ctx.backend.slice_fn, ctx.backend.sequence_fn, card,
        operating_point=str(ctx.settings.operating_point.value),
    )
    inferred = utcnow()
    t2 = time.perf_counter()
    written = write_objects(ctx, claimed, volume, prediction, frame)
    reported = utcnow()
    t3 = time.perf_counter()
    state = record(ctx, claimed, volume, prediction, written,
                   {"inferred": inferred, "reported": reported})
    timings = {
        "load_s": round(t1 - t0, 3),
        "inference_s": round(t2 - t1, 3),
        "report_s": round(t3 - t2, 3),
        "record_s": round(time.perf_counter() - t3, 3),
        "slices": float(volume.hu.shape[0]),
    }
    log.info("job.done", job_id=job_id, version=version, positive=prediction.positive,
             slices=volume.hu.shape[0], **{k: v for k, v in timings.items() if k != "slices"})
    return JobOutcome(
        job_id, version, state, ran=True, positive=bool(prediction.positive),
        study_probabilities={c: float(p) for c, p in zip(CLASSES, prediction.study_probs, strict=True)},
        sr_sop_uid=written.sr_sop_uid, overlay_sop_uids=written.overlay_sop_uids,
        output_dir=str(written.sr_path.parent), timings=timings,
    )


def mark_failed(ctx: WorkerContext, job_id: int, version: int | None, exc: BaseException) -> None:
    """Record a job that failed for good: state ``failed``, the error, an audit row."""
    from triage_node.worklist.priority import compute_priority

    message = f"{type(exc).__name__}: {exc}"[:2000]
    with transaction(ctx.session_factory) as session:
        if not fail_job(session, job_id, version, error=message, actor=ACTOR):
            return  # missing, done, superseded, or at another version
        job = session.get(Job, job_id)
        assert job is not None  # fail_job just moved it, in this transaction
        if session.get(Study, job.study_id) is not None:
            compute_priority(session, job.study_id, ctx.settings, actor=ACTOR, reason="failure", job_id=job_id)
    log.error("job.failed", job_id=job_id, error_type=type(exc).__name__)


# -- delivery ------------------------------------------------------------------------------
def deliver_pending(ctx: WorkerContext) -> dict[str, Any]:
    """Deliver every due outbox item (:func:`worker.pipeline.delivery.deliver_due`), then
    stamp ``delivered_at`` on the jobs whose objects have all been delivered."""
    from worker.pipeline.delivery import deliver_due

    if not ctx.settings.destinations:
        return {"sent": 0, "destinations": 0}
    report = deliver_due(ctx.session_factory, ctx.settings, utcnow()).as_dict()
    if report.get("sent"):
        report["jobs_delivered"] = stamp_delivered(ctx)
    return report


def stamp_delivered(ctx: WorkerContext, job_ids: list[int] | None = None) -> list[int]:
    """Set ``Job.delivered_at`` (the last object's delivery time) where every outbox row is delivered.

    Returns the ids of the jobs stamped now (each with a ``job.delivered`` audit row).
    """
    stamped: list[int] = []
    with transaction(ctx.session_factory) as session:
        query = (
            select(Job).join(OutboxItem, OutboxItem.job_id == Job.id)
            .where(Job.delivered_at.is_(None), OutboxItem.state == OutboxState.delivered)
            .distinct()
        )
        if job_ids is not None:
            query = query.where(Job.id.in_(job_ids))
        for job in session.scalars(query).all():
            items = session.scalars(select(OutboxItem).where(OutboxItem.job_id == job.id)).all()
            if not all(i.state == OutboxState.delivered for i in items):
                continue
            job.delivered_at = max(i.delivered_at or utcnow() for i in items)
            study = session.get(Study, job.study_id)
            audit.record(session, "job.delivered", actor=ACTOR, job_id=job.id,
                         study_uid=study.study_uid if study else None, objects=len(items),
                         seconds_reported_to_delivered=round(
                             (as_utc(job.delivered_at) - as_utc(job.reported_at)).total_seconds(), 3)
                         if job.reported_at else None)
            stamped.append(job.id)
    return stamped



def deliver_for_job(ctx: WorkerContext, job_id: int) -> dict[str, Any]:
    """Deliver what is due right after a job; says whether all of this job's objects are delivered."""
    report = deliver_pending(ctx)
    stamp_delivered(ctx, [job_id])
    with ctx.session_factory() as session:
        job = session.get(Job, job_id)
        report["job_delivered"] = bool(job is not None and job.delivered_at is not None)
    return report


# -- recovery --------------------------------------------------------------------------------
def requeue_stale_jobs(
    session_factory: sessionmaker[Session], settings: Settings, enqueue: Any, now: datetime | None = None
) -> list[int]:
    """Send again the jobs left ``running`` by a worker that vanished
    (`triage_node.jobs.sweep.requeue_stale`, the worker beat's step of the sweep)."""
    from triage_node.jobs.sweep import requeue_stale

    return requeue_stale(session_factory, settings, enqueue, now)
