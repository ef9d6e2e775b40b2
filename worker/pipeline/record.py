"""Step 6 of a job: the Result row, the job's move to ``done``, outbox rows, priority, audit.

One transaction (`record`): the Result (one per job, updated by a re-run), the stage
timestamps, ``triage_node.jobs.finish_job`` (refused when the job was superseded while it
ran), one outbox row per object and destination, and the study's worklist priority.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from triage_node import CLASSES
from triage_node.db import audit
from triage_node.db.models import Job, JobState, Result
from triage_node.db.session import transaction
from triage_node.jobs import finish_job
from triage_node.logs import get_logger
from triage_node.timeutil import utcnow
from worker.pipeline.claim import Claim
from worker.pipeline.context import ACTOR, WorkerContext
from worker.pipeline.report_objects import WrittenObjects

log = get_logger(__name__)


def record(
    ctx: WorkerContext,
    claim_: Claim,
    volume: Any,
    prediction: Any,
    written: WrittenObjects,
    stamps: dict[str, datetime],
) -> str:
    """Store the result, outbox rows, priority and audit in one transaction; returns the job state."""
    from triage_node.worklist.priority import compute_priority

    probs = {c: round(float(p), 6) for c, p in zip(CLASSES, prediction.study_probs, strict=True)}
    slice_probs = np.asarray(prediction.slice_probs, dtype=np.float64)
    keys = {
        name: [
            {"index": i, "sop_uid": volume.sop_uids[i],
             "probability": round(float(slice_probs[i, CLASSES.index(name)]), 6)}
            for i in idx
        ]
        for name, idx in written.key_slices.items()
    }
    values = dict(
        job_id=claim_.job_id,
        study_id=claim_.study_id,
        model_name=ctx.card.name,
        model_version=ctx.card.version,
        device_uid=ctx.card.device_uid,
        operating_point=prediction.operating_point,
        positive=bool(prediction.positive),
        study_probabilities=probs,
        decisions={c: bool(v) for c, v in prediction.decision.items()},
        slice_probabilities=np.round(np.asarray(prediction.slice_probs, dtype=np.float64), 5).tolist(),
        key_slices=keys,
        sr_sop_uid=written.sr_sop_uid,
        sr_series_uid=written.sr_series_uid,
        overlay_series_uid=written.overlay_series_uid,
        overlay_sop_uids=list(written.overlay_sop_uids),
        output_dir=str(written.sr_path.parent),
    )
    for attempt in (1, 2):
        try:
            with transaction(ctx.session_factory) as session:
                state = _record_in(session, ctx, claim_, values, written, stamps, compute_priority)
        except IntegrityError:
            # Another delivery of the same message raced us to the Result row: the
            # second pass finds it and updates it.
            if attempt == 2:
                raise
            continue
        if state == JobState.done:
            _observe_stages(ctx, claim_.job_id)
        return state
    raise AssertionError("unreachable")


def _record_in(
    session: Session, ctx: WorkerContext, claim_: Claim, values: dict[str, Any],
    written: WrittenObjects, stamps: dict[str, datetime], compute_priority: Any,
) -> str:
    job = session.get(Job, claim_.job_id)
    assert job is not None
    result = session.scalars(select(Result).where(Result.job_id == claim_.job_id)).one_or_none()
    rewritten = result is not None
    if result is None:
        result = Result(**values)
        session.add(result)
    else:
        for key, value in values.items():
            setattr(result, key, value)
    job.inferred_at = stamps["inferred"]
    job.reported_at = stamps["reported"]
    job.finished_at = utcnow()
    session.flush()
    audit.record(
        session, "result.written", actor=ACTOR, study_uid=claim_.study_uid,
        series_uid=claim_.series_uid, job_id=claim_.job_id, version=claim_.version,
        positive=values["positive"], probabilities=values["study_probabilities"],
        decisions=values["decisions"], operating_point=values["operating_point"],
        model_version=values["model_version"], sr_sop_uid=written.sr_sop_uid,
        overlay_sop_uids=list(written.overlay_sop_uids), rewritten=rewritten,
    )
    from triage_node.outbox import enqueue_outbox

    deliveries = [
        (destination, [(sop, str(path)) for sop, path in written.for_destination(destination)])
        for destination in ctx.settings.destinations
    ]
    done = finish_job(
        session, claim_.job_id, claim_.version, actor=ACTOR, positive=values["positive"],
        outbox_items=sum(len(objects) for _, objects in deliveries),
        seconds_started_to_reported=round((stamps["reported"] - claim_.started_at).total_seconds(), 3),
    )
    if not done:  # superseded, or moved to another version, while it ran
        log.info("job.superseded_during_run", job_id=claim_.job_id)
        return str(session.scalar(select(Job.state).where(Job.id == claim_.job_id)))
    for destination, objects in deliveries:
        enqueue_outbox(session, claim_.job_id, claim_.study_uid, objects, [destination])
    compute_priority(session, claim_.study_id, ctx.settings, actor=ACTOR, reason="result",
                     job_id=claim_.job_id)
    return str(JobState.done)


def _observe_stages(ctx: WorkerContext, job_id: int) -> None:
    """Stage latencies into the worker's histogram, once the result is committed."""
    from worker import metrics

    try:
        with ctx.session_factory() as session:
            job = session.get(Job, job_id)
            if job is not None:
                metrics.observe_stages(job)
    except SQLAlchemyError as exc:  # the result is safe; only a sample is lost
        log.warning("job.stages_not_observed", job_id=job_id, error=type(exc).__name__)


