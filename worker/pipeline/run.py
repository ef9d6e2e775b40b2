"""One triage job, end to end: spool -> volume -> inference -> heat maps -> SR + overlays -> outbox.

:func:`run_job` is the plain function behind the ``worker.triage_job`` Celery task; tests
call it directly. Its steps:

1. **claim** (one transaction): the job must exist at the requested version and not be
   superseded; a job already ``done`` is not run again. The job becomes ``running``
   (``started_at``, ``attempts``, ``task_id``), with a ``job.started`` audit row.
2. **load** the newest version of every instance of the series from the spool and
   build the HU volume (:func:`worker.pipeline.preprocess.load_series`).
3. **infer** with the process's backend at the configured operating point
   (:func:`worker.pipeline.inference_core.run_study`).
4. **explain**: the top ``key_slices_per_class`` slices of each positive class and their
   class-activation maps (:func:`worker.pipeline.explain.cam`).
5. **report**: an overlay series (secondary capture) and a DICOM SR (TID 1500) written
   under ``<data_dir>/results/<job_id>/``. Their UIDs derive from (study, series, job,
   version), so a re-run after a crash rewrites the same objects instead of adding new
   ones.
6. **record** (one transaction): the Result row (one per job), stage timestamps, one
   outbox row per object and destination, the study's worklist priority (STAT-AI when
   positive) and audit rows.

Idempotency: a re-run of the same (job, version) after a crash (late acknowledgement,
``task_reject_on_worker_lost``) leaves one Result, one SR and one outbox row per object
and destination.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from triage_node import CLASSES
from triage_node.config import Destination, Settings, SRClass
from triage_node.db import audit
from triage_node.db.models import (
    Instance,
    Job,
    JobState,
    OutboxItem,
    OutboxState,
    Result,
    Series,
    Study,
)
from triage_node.db.session import make_engine, make_sessionmaker, transaction
from triage_node.jobs import claim_job, fail_job, finish_job
from triage_node.logs import get_logger
from triage_node.timeutil import as_utc, utcnow
from worker.files import write_atomic
from worker.inference.base import InferenceBackend

log = get_logger(__name__)

ACTOR = "worker"


class JobError(RuntimeError):
    """A job cannot run (missing rows, no images); retrying will not help."""


# -- per-process context -----------------------------------------------------------------
@dataclass
class WorkerContext:
    """Clients of one worker process, built once (``worker_process_init``).

    Attributes
    ----------
    settings : Settings
    engine : Engine
    session_factory : sessionmaker
    card : ModelCard
        The served models' card (classes, input, thresholds, CAM head).
    backend : InferenceBackend
        Checked against ``card`` when built.
    head_weight : ndarray [6, C]
        Linear head of the slice CNN, for the CAM heat maps.
    """

    settings: Settings
    engine: Engine
    session_factory: sessionmaker[Session]
    card: Any
    backend: InferenceBackend
    head_weight: np.ndarray

    @property
    def results_dir(self) -> Path:
        return self.settings.data_dir.resolve() / "results"

    def close(self) -> None:
        self.backend.close()
        self.engine.dispose()


def build_context(settings: Settings, backend: InferenceBackend | None = None) -> WorkerContext:
    """Build the clients of one process: DB engine, model card, inference backend.

    Raises
    ------
    worker.inference.ModelMismatch
        The backend serves models that do not match the model card.
    worker.inference.BackendUnavailable
        Triton cannot be reached.
    triage_node.db.schema.SchemaOutOfDate
        The database misses migrations.
    """
    from triage_node.db.schema import require_current
    from worker.inference import make_backend
    from worker.inference.card import load_model_card

    card = load_model_card(settings.model_card)
    weight, _bias = card.head_weights()
    engine = make_engine(settings.effective_database_url)
    require_current(engine)
    if backend is None:
        backend = make_backend(settings, card)
    else:
        backend.check(card)
    return WorkerContext(settings, engine, make_sessionmaker(engine), card, backend, weight)


_CTX: WorkerContext | None = None
_CTX_PID: int | None = None


def init_context(settings: Settings) -> WorkerContext:
    """Build this process's context (replacing one inherited through fork)."""
    global _CTX, _CTX_PID
    _CTX = build_context(settings)
    _CTX_PID = os.getpid()
    log.info("worker.process_ready", backend=_CTX.backend.name, model_version=_CTX.card.version)
    return _CTX


def get_context() -> WorkerContext:
    """This process's context, built on first use (the solo pool has no process-init signal)."""
    if _CTX is None or _CTX_PID != os.getpid():
        from triage_node.config import get_settings

        return init_context(get_settings())
    return _CTX


def close_context() -> None:
    global _CTX
    if _CTX is not None and _CTX_PID == os.getpid():
        _CTX.close()
    _CTX = None


# -- outcome -----------------------------------------------------------------------------
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
class _Claim:
    job_id: int
    version: int
    study_id: int
    study_uid: str
    series_uid: str
    paths: tuple[Path, ...]
    started_at: datetime



#: Namespace of the name-based UUIDs behind the node's derived UIDs.
UID_NAMESPACE = uuid.UUID("6f1c2a9e-3b7d-5c4e-9a81-0d2f4b6e8c13")


def object_uid(*parts: object) -> str:
    """A UID derived from ``parts``: the same inputs, the same UID.

    A name-based (SHA-1, version 5) UUID in the ``2.25`` form of PS3.5 B.2, so re-running
    a job writes objects with the same SOP/Series Instance UIDs and the PACS replaces
    rather than duplicates them.
    """
    name = "\x1f".join(str(p) for p in parts)
    return f"2.25.{uuid.uuid5(UID_NAMESPACE, name).int}"


# -- step 1: claim -----------------------------------------------------------------------
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


def claim(ctx: WorkerContext, job_id: int, version: int, task_id: str | None) -> _Claim | JobOutcome:
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
        return _Claim(job_id, version, study.id, study.study_uid, series.series_uid, tuple(paths), started)


# -- steps 4-5: key slices, heat maps, objects -------------------------------------------
def _write_dataset(ds: Any, path: Path) -> Path:
    """Write a DICOM file atomically (temp file, fsync, replace), mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    return write_atomic(path, lambda fh: ds.save_as(fh, enforce_file_format=True), 0o600)


@dataclass(frozen=True)
class WrittenObjects:
    """The SR and overlay files of one job, with their UIDs and the key slices shown.

    ``sr_*`` is the primary report (Comprehensive 3D SR referencing the overlays), the one
    the result row names; ``sr_variants`` holds it and every other report a destination
    asked for, by (SR class, references the overlays), as (SOP Instance UID, path).
    """

    sr_path: Path
    sr_sop_uid: str
    sr_series_uid: str
    overlay_paths: tuple[Path, ...]
    overlay_sop_uids: tuple[str, ...]
    overlay_series_uid: str | None
    key_slices: dict[str, list[int]]
    sr_variants: dict[tuple[SRClass, bool], tuple[str, Path]] = field(default_factory=dict)

    @property
    def overlays(self) -> list[tuple[str, Path]]:
        return list(zip(self.overlay_sop_uids, self.overlay_paths, strict=True))

    def for_destination(self, destination: Destination) -> list[tuple[str, Path]]:
        """What one destination gets: the overlays if it takes them, then its report."""
        variant = report_variant(destination, bool(self.overlay_sop_uids))
        sr = self.sr_variants.get(variant, (self.sr_sop_uid, self.sr_path))
        return [*(self.overlays if destination.send_overlays else []), sr]


PRIMARY_REPORT = (SRClass.comprehensive_3d, True)


def report_variant(destination: Destination, have_overlays: bool = True) -> tuple[SRClass, bool]:
    """(SR class, references the overlays) of the report ``destination`` gets.

    A destination that does not take the overlay series gets a report that does not
    reference it, so that no reference dangles in that archive.
    """
    return SRClass(destination.sr_class), bool(destination.send_overlays and have_overlays)


def write_objects(ctx: WorkerContext, claim_: _Claim, volume: Any, prediction: Any, frame: Any) -> WrittenObjects:
    """Key slices, heat maps, the overlay series and the SR, written under ``results/<job_id>/``.

    Key slices are the top ``settings.key_slices_per_class`` slices of each positive
    class (:func:`worker.pipeline.overlay.select_key_slices`); each gets a CAM heat map
    (:func:`worker.pipeline.overlay.compute_heatmaps`, on the slice grid through the
    input ``frame``) and one Secondary Capture image.
    All UIDs derive from (study, series, job id, version).
    """
    from worker.pipeline.overlay import build_overlays, compute_heatmaps, overlay_keys, select_key_slices
    from worker.pipeline.sr import build_sr

    card = ctx.card
    base = (claim_.study_uid, claim_.series_uid, claim_.job_id, claim_.version)
    # results/ holds patient data: 0700 like the spool (mkdir(parents=True) would give
    # the intermediate folder the umask's 0755).
    ctx.results_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    ctx.results_dir.chmod(0o700)
    out_dir = ctx.results_dir / str(claim_.job_id)
    key_slices = select_key_slices(prediction.slice_probs, prediction.decision, ctx.settings.key_slices_per_class)
    keys = overlay_keys(key_slices)
    heatmaps = compute_heatmaps(prediction.features, ctx.head_weight, key_slices, frame, volume.hu)
    overlay_series_uid = object_uid(*base, "overlay-series")
    overlays = build_overlays(
        volume.datasets, volume.hu, prediction, card, key_slices, heatmaps,
        series_instance_uid=overlay_series_uid,
        sop_instance_uids=[object_uid(*base, "overlay", name, i) for name, i in keys],
    )
    sr_series_uid = object_uid(*base, "sr-series")
    variants = {PRIMARY_REPORT} | {report_variant(d, bool(overlays)) for d in ctx.settings.destinations}
    reports: dict[tuple[SRClass, bool], tuple[str, Path]] = {}
    for sr_class, with_overlays in sorted(variants, key=lambda v: (v != PRIMARY_REPORT, v)):
        primary = (sr_class, with_overlays) == PRIMARY_REPORT
        sr = build_sr(
            volume.datasets, prediction, card, overlays if with_overlays else [], key_slices,
            series_instance_uid=sr_series_uid,
            # each class is its own SOP instance; the primary keeps the UID it always had
            sop_instance_uid=object_uid(*base, "sr") if primary
            else object_uid(*base, "sr", str(sr_class), "overlays" if with_overlays else "no-overlays"),
            sr_class=sr_class,
        )
        name = "sr.dcm" if primary else f"sr_{sr_class}{'' if with_overlays else '_no-overlays'}.dcm"
        reports[(sr_class, with_overlays)] = (str(sr.SOPInstanceUID), _write_dataset(sr, out_dir / name))
    overlay_paths = tuple(
        _write_dataset(ds, out_dir / f"overlay_{i:02d}.dcm") for i, ds in enumerate(overlays)
    )
    for stale in out_dir.glob("overlay_*.dcm"):  # left by an earlier run with more overlays
        if stale not in overlay_paths:
            stale.unlink(missing_ok=True)
    sr_sop_uid, sr_path = reports[PRIMARY_REPORT]
    return WrittenObjects(
        sr_path=sr_path,
        sr_sop_uid=sr_sop_uid,
        sr_series_uid=sr_series_uid,
        overlay_paths=overlay_paths,
        overlay_sop_uids=tuple(str(ds.SOPInstanceUID) for ds in overlays),
        overlay_series_uid=overlay_series_uid if overlays else None,
        key_slices={k: [int(i) for i in v] for k, v in key_slices.items()},
        sr_variants=reports,
    )


# -- step 6: record -------------------------------------------------------------------------
def record(
    ctx: WorkerContext,
    claim_: _Claim,
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
    session: Session, ctx: WorkerContext, claim_: _Claim, values: dict[str, Any],
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
    from worker.pipeline.delivery import enqueue_outbox

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
