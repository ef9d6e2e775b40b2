"""The worker pipeline (`worker.pipeline.run.run_job`) on real files, a real database and ONNX Runtime.

Studies go in through the node's own InstanceStore and CompletenessTracker; the model
repository is exported by the model code (a small network, so each job takes seconds).
Runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
import structlog
from pydicom.uid import SecondaryCaptureImageStorage
from sqlalchemy import func, select

from tests.worker_support import build_small_repository, ingest_files, write_ct_series
from triage_node import CLASSES
from triage_node.config import load_settings
from triage_node.db import schema
from triage_node.db.models import AuditEvent, Job, JobState, OutboxItem, Result, WorklistEntry
from triage_node.db.session import transaction
from triage_node.peers import dciodvfy
from worker.inference import ModelMismatch, make_backend
from worker.inference.card import load_model_card
from worker.pipeline.context import JobError, build_context
from worker.pipeline.run import mark_failed, run_job

DESTINATIONS = [
    {"name": "pacs", "kind": "dimse", "ae_title": "PACS", "host": "127.0.0.1", "port": 11199},
    {"name": "web", "kind": "dicomweb", "url": "http://127.0.0.1:9/dicom-web"},
]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two exports of the same small network: thresholds 0.3 (positive) and 0.9 (negative)."""
    base = tmp_path_factory.mktemp("models")
    return {
        "positive": build_small_repository(base / "low", threshold=0.3),
        "negative": build_small_repository(base / "high", threshold=0.9),
    }


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'triage.db'}"
    return request.getfixturevalue("postgres_db")


def _setup(tmp_path: Path, card: Path, database_url: str, **overrides):  # type: ignore[no-untyped-def]
    settings = load_settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        model_repository=card.parent / "models",
        model_card=card,
        destinations=DESTINATIONS,
        **overrides,
    )
    schema.upgrade(settings.effective_database_url)
    ctx = build_context(settings)
    return settings, ctx


def test_positive_study_writes_result_sr_overlays_outbox_and_stat_priority(
    tmp_path: Path, model_dirs: dict[str, Path], database_url: str
) -> None:
    settings, ctx = _setup(tmp_path, model_dirs["positive"], database_url, key_slices_per_class=1)
    try:
        (job_id,) = ingest_files(settings, ctx.session_factory, write_ct_series(tmp_path / "in", bleed=True))
        outcome = run_job(ctx, job_id, 1, task_id="task-1")
        assert outcome.ran and outcome.state == JobState.done and outcome.positive
        with ctx.session_factory() as session:
            job = session.get(Job, job_id)
            result = session.scalars(select(Result).where(Result.job_id == job_id)).one()
            stamps = [job.series_complete_at, job.started_at, job.inferred_at, job.reported_at, job.finished_at]
            assert all(stamps), stamps
            assert stamps == sorted(stamps)
            assert job.task_id == "task-1" and job.attempts == 1
            assert result.positive and set(result.study_probabilities) == set(CLASSES)
            assert result.model_version == ctx.card.version and result.device_uid == ctx.card.device_uid
            assert len(result.slice_probabilities) == 12
            assert result.operating_point == "high_sensitivity"
            # every positive class gets one key slice (k=1) and one overlay
            assert set(result.key_slices) == {c for c, v in result.decisions.items() if v}
            assert len(result.overlay_sop_uids) == len(result.key_slices)
            items = session.scalars(select(OutboxItem).where(OutboxItem.job_id == job_id)).all()
            assert len(items) == 2 * (1 + len(result.overlay_sop_uids))
            assert {i.destination for i in items} == {"pacs", "web"}
            entry = session.scalars(select(WorklistEntry).where(WorklistEntry.study_id == job.study_id)).one()
            assert entry.priority_class == "STAT-AI"
            actions = set(session.scalars(select(AuditEvent.action).where(AuditEvent.job_id == job_id)))
            assert {"job.started", "result.written", "job.done", "worklist.priority"} <= actions
        out_dir = Path(outcome.output_dir)
        files = sorted(out_dir.glob("*.dcm"))
        assert len(files) == 1 + len(outcome.overlay_sop_uids)
        sr = pydicom.dcmread(out_dir / "sr.dcm")
        assert sr.SOPInstanceUID == outcome.sr_sop_uid
        assert sr.VerificationFlag == "UNVERIFIED"
        source = pydicom.dcmread(next((tmp_path / "in").glob("*.dcm")), stop_before_pixels=True)
        assert sr.StudyInstanceUID == source.StudyInstanceUID
        assert sr.SeriesInstanceUID != source.SeriesInstanceUID
        for path in files:
            check = dciodvfy(path)
            assert check.ok, f"{path.name}: {check.errors}"
    finally:
        ctx.close()


def test_rerun_after_interruption_leaves_one_result_and_the_same_objects(
    tmp_path: Path, model_dirs: dict[str, Path], database_url: str
) -> None:
    settings, ctx = _setup(tmp_path, model_dirs["positive"], database_url)
    try:
        (job_id,) = ingest_files(settings, ctx.session_factory, write_ct_series(tmp_path / "in", bleed=True))
        first = run_job(ctx, job_id, 1)
        # A redelivered message of a finished job does nothing.
        again = run_job(ctx, job_id, 1)
        assert not again.ran and again.reason == "already done"
        # The worker died after writing but before acknowledging: the job is still
        # "running" when the message comes back, and runs again.
        with transaction(ctx.session_factory) as session:
            session.get(Job, job_id).state = JobState.running
        second = run_job(ctx, job_id, 1)
        assert second.ran
        assert second.sr_sop_uid == first.sr_sop_uid
        assert second.overlay_sop_uids == first.overlay_sop_uids
        with ctx.session_factory() as session:
            assert session.scalar(select(func.count()).select_from(Result).where(Result.job_id == job_id)) == 1
            n_items = session.scalar(select(func.count()).select_from(OutboxItem).where(OutboxItem.job_id == job_id))
            assert n_items == 2 * (1 + len(first.overlay_sop_uids))
            job = session.get(Job, job_id)
            assert job.attempts == 2 and job.state == JobState.done
        assert len(list(Path(first.output_dir).glob("sr*.dcm"))) == 1
    finally:
        ctx.close()


def test_negative_study_is_routine_and_still_reported(
    tmp_path: Path, model_dirs: dict[str, Path], database_url: str
) -> None:
    settings, ctx = _setup(tmp_path, model_dirs["negative"], database_url)
    try:
        (job_id,) = ingest_files(settings, ctx.session_factory, write_ct_series(tmp_path / "in"))
        with structlog.testing.capture_logs() as logs:
            outcome = run_job(ctx, job_id, 1)
        assert outcome.ran and outcome.positive is False
        # never a patient name, ID or birth date in a log line (write_ct_series's values)
        text = repr(logs)
        assert logs and not any(v in text for v in ("Phantom", "PH-0001", "19700101", "ACC0001"))
        with ctx.session_factory() as session:
            result = session.scalars(select(Result).where(Result.job_id == job_id)).one()
            assert not any(result.decisions.values())
            entry = session.scalars(select(WorklistEntry)).one()
            assert entry.priority_class == "routine"
        assert dciodvfy(Path(outcome.output_dir) / "sr.dcm").ok
    finally:
        ctx.close()


def test_superseded_or_stale_version_is_skipped_and_failures_are_recorded(
    tmp_path: Path, model_dirs: dict[str, Path]
) -> None:
    settings, ctx = _setup(tmp_path, model_dirs["positive"], f"sqlite:///{tmp_path / 't.db'}")
    try:
        (job_id,) = ingest_files(settings, ctx.session_factory, write_ct_series(tmp_path / "in"))
        stale = run_job(ctx, job_id, 2)
        assert not stale.ran and "version" in stale.reason
        with transaction(ctx.session_factory) as session:
            session.get(Job, job_id).state = JobState.superseded
        assert run_job(ctx, job_id, 1).reason == "superseded by a newer version"
        with pytest.raises(JobError):
            run_job(ctx, 9999, 1)
        with transaction(ctx.session_factory) as session:
            session.get(Job, job_id).state = JobState.running
        mark_failed(ctx, job_id, 1, RuntimeError("pixel data unreadable"))
        with ctx.session_factory() as session:
            job = session.get(Job, job_id)
            assert job.state == JobState.failed and "pixel data unreadable" in job.error
            failed = session.scalars(select(AuditEvent).where(AuditEvent.action == "job.failed")).one()
            assert failed.outcome == "error" and failed.job_id == job_id
            assert session.scalar(select(func.count()).select_from(Result)) == 0
    finally:
        ctx.close()


def test_backend_refuses_a_model_card_that_does_not_match_the_served_models(
    tmp_path: Path, model_dirs: dict[str, Path]
) -> None:
    card = load_model_card(model_dirs["positive"])
    settings = load_settings(data_dir=tmp_path, model_repository=model_dirs["positive"].parent / "models",
                             model_card=model_dirs["positive"])
    backend = make_backend(settings, card)
    backend.close()
    wrong = card.model_copy(update={"input_size": 96, "embedding_dim": 64})
    with pytest.raises(ModelMismatch) as info:
        make_backend(settings, wrong)
    message = str(info.value)
    assert "ich_slice_cnn: input expected image FP32 [-1, 3, 96, 96], served image FP32 [-1, 3, 64, 64]" in message
    assert "ich_sequence" in message and "refusing to run" in message


def test_job_left_running_by_a_vanished_worker_is_sent_again(tmp_path: Path, model_dirs: dict[str, Path]) -> None:
    from datetime import UTC, datetime, timedelta

    from triage_node.queue import JobEnqueuer, make_client
    from worker.pipeline.run import requeue_stale_jobs

    settings, ctx = _setup(tmp_path, model_dirs["positive"], f"sqlite:///{tmp_path / 't.db'}")
    client = make_client(settings)
    try:
        job_a, = ingest_files(settings, ctx.session_factory, write_ct_series(tmp_path / "a"))
        job_b, = ingest_files(settings, ctx.session_factory, write_ct_series(tmp_path / "b"))
        now = datetime.now(UTC)
        with transaction(ctx.session_factory) as session:
            lost, live = session.get(Job, job_a), session.get(Job, job_b)
            lost.state, lost.started_at = JobState.running, now - timedelta(seconds=settings.task_time_limit_s + 61)
            live.state, live.started_at = JobState.running, now - timedelta(seconds=30)
        enqueuer = JobEnqueuer(ctx.session_factory, client)
        assert requeue_stale_jobs(ctx.session_factory, settings, enqueuer.enqueue, now) == [job_a]
        with ctx.session_factory() as session:
            assert session.get(Job, job_a).state == JobState.queued
            assert session.get(Job, job_a).enqueued_at is not None
            assert session.get(Job, job_b).state == JobState.running  # may still be running
            assert session.scalars(select(AuditEvent).where(AuditEvent.action == "job.requeued")).one().job_id == job_a
        messages = list((settings.broker_folder / "queue").glob("*.routine.msg"))
        assert len(messages) == 1
        # the message runs the job (the worker's task calls run_job with these arguments)
        assert run_job(ctx, job_a, 1).ran
    finally:
        client.close()
        ctx.close()


def test_tilted_gantry_study_is_reported(tmp_path: Path, model_dirs: dict[str, Path]) -> None:
    settings, ctx = _setup(tmp_path, model_dirs["positive"], f"sqlite:///{tmp_path / 't.db'}")
    try:
        (job_id,) = ingest_files(settings, ctx.session_factory,
                                 write_ct_series(tmp_path / "in", bleed=True, tilt_deg=18.5))
        outcome = run_job(ctx, job_id, 1)
        assert outcome.ran and outcome.positive
        oblique = []
        for path in sorted(Path(outcome.output_dir).glob("*.dcm")):
            assert dciodvfy(path).ok, path
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            if ds.SOPClassUID == SecondaryCaptureImageStorage:
                oblique.append(ds.PatientOrientation[1])
        # 18.5 degrees of tilt: the column direction is oblique (two letters, PS3.3 C.7.6.1.1.1)
        assert oblique and all(len(value) == 2 for value in oblique), oblique
    finally:
        ctx.close()
