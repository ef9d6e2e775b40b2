"""Step 1 of a job: claim it, or say why it must not run.

The job must exist at the requested version and not be superseded; a job already
``done`` is not run again. Claimed, it is ``running`` (``triage_node.jobs.claim_job``:
``started_at``, ``attempts``, ``task_id`` and a ``job.started`` audit row), and the claim
carries the paths of the newest version of every instance of its series.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from triage_node.db.models import Instance, Job, JobState, Series, Study
from triage_node.db.session import transaction
from triage_node.jobs import claim_job
from triage_node.logs import get_logger
from triage_node.timeutil import utcnow
from worker.pipeline.context import ACTOR, JobError, WorkerContext

log = get_logger(__name__)


@dataclass(frozen=True)
class JobOutcome:
    """What :func:`run_job` did.

    ``ran`` is false when the job was skipped (already done, superseded, another version).
    """

    job_id: int
    version: int
    state: str
    ran: bool
    reason: str = ""
    positive: bool | None = None
    study_probabilities: dict[str, float] = field(default_factory=dict)
    sr_sop_uid: str | None = None
    overlay_sop_uids: tuple[str, ...] = ()
    output_dir: str | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["overlay_sop_uids"] = list(self.overlay_sop_uids)
        return out


@dataclass(frozen=True)
class Claim:
    """A claimed job: what the later steps need to know about it."""

    job_id: int
    version: int
    study_id: int
    study_uid: str
    series_uid: str
    paths: tuple[Path, ...]
    started_at: datetime


def _latest_instance_paths(session: Session, series: Series, spool_dir: Path) -> list[Path]:
    """Path of the newest version of each SOP instance of ``series``."""
    newest = (
        select(Instance.sop_uid, func.max(Instance.version).label("v"))
        .where(Instance.series_id == series.id)
        .group_by(Instance.sop_uid)
        .subquery()
    )
    rows = session.execute(
        select(Instance.path)
        .join(newest, (Instance.sop_uid == newest.c.sop_uid) & (Instance.version == newest.c.v))
        .where(Instance.series_id == series.id)
        .order_by(Instance.instance_number, Instance.id)
    ).scalars()
    return [p if p.is_absolute() else spool_dir / p for p in map(Path, rows)]


def claim(ctx: WorkerContext, job_id: int, version: int, task_id: str | None) -> Claim | JobOutcome:
    """Mark the job running, or say why it must not run (a `JobOutcome` with ``ran=False``)."""
    with transaction(ctx.session_factory) as session:
        query = select(Job).where(Job.id == job_id)
        if session.bind is not None and session.bind.dialect.name == "postgresql":
            query = query.with_for_update()
        job = session.scalars(query).one_or_none()
        if job is None:
            raise JobError(f"job {job_id} does not exist")
        skip = None
        if job.version != version:
            skip = f"job is at version {job.version}, task is for version {version}"
        elif job.state == JobState.superseded:
            skip = "superseded by a newer version"
        elif job.state == JobState.done and job.result is not None:
            skip = "already done"
        if skip:
            log.info("job.skipped", job_id=job_id, version=version, reason=skip)
            return JobOutcome(job_id, version, str(job.state), ran=False, reason=skip)
        series = session.get(Series, job.series_id)
        study = session.get(Study, job.study_id)
        if series is None or study is None:
            raise JobError(f"job {job_id}: series or study row missing")
        paths = _latest_instance_paths(session, series, ctx.settings.spool_dir)
        if not paths:
            raise JobError(f"job {job_id}: series has no instances")
        started = utcnow()
        if not claim_job(session, job_id, version, at=started, task_id=task_id, actor=ACTOR,
                         instances=len(paths), backend=ctx.backend.name):
            state = session.scalar(select(Job.state).where(Job.id == job_id))
            log.info("job.skipped", job_id=job_id, version=version, reason="claimed meanwhile")
            return JobOutcome(job_id, version, str(state), ran=False, reason="claimed meanwhile")
        return Claim(job_id, version, study.id, study.study_uid, series.series_uid, tuple(paths), started)


