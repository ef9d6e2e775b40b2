"""The Celery side: configuration, sending by task name, and consuming with a real
worker process on the embedded filesystem broker and on a real Redis."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from kombu.exceptions import OperationalError
from pydicom.uid import generate_uid
from sqlalchemy import select

from tests.node_process import WorkerProcess
from tests.pipeline_helpers import ProbeWorker, add_series, database_url, session_factory  # noqa: F401
from triage_node.config import load_settings
from triage_node.db.models import AuditEvent, Job, JobState, Series, Study
from triage_node.peers import free_port, wait_until
from triage_node.queue import (
    QUEUE_ROUTINE,
    QUEUE_STAT,
    JobEnqueuer,
    celery_config,
    choose_queue,
    enqueue_job,
    make_client,
    reconcile_queued_jobs,
)


def test_filesystem_config_creates_the_broker_folders(tmp_path):
    settings = load_settings(data_dir=tmp_path)
    config = celery_config(settings)
    options = config["broker_transport_options"]
    assert config["broker_url"] == "filesystem://"
    assert options["data_folder_in"] == options["data_folder_out"] == str(
        tmp_path.resolve() / "broker" / "queue"
    )
    for key in ("data_folder_in", "processed_folder", "control_folder"):
        assert (tmp_path / "broker").resolve() in Path(options[key]).parents
        assert Path(options[key]).is_dir()
    assert options["polling_interval"] <= 0.1
    assert config["task_acks_late"] and config["task_reject_on_worker_lost"]
    assert config["worker_prefetch_multiplier"] == 1
    assert {q.name for q in config["task_queues"]} == {"stat", "routine"}


def test_redis_config_has_priority_steps(tmp_path):
    config = celery_config(load_settings(data_dir=tmp_path, broker_url="redis://127.0.0.1:1/0"))
    assert config["broker_transport_options"]["priority_steps"] == list(range(10))


def test_enqueue_job_refuses_an_unknown_queue(tmp_path):
    with pytest.raises(ValueError, match="queue must be one of"):
        enqueue_job(make_client(load_settings(data_dir=tmp_path)), 1, 1, "urgent")


def test_filesystem_broker_round_trip_to_a_real_worker(tmp_path):
    settings = load_settings(data_dir=tmp_path)
    client = make_client(settings)
    with ProbeWorker(tmp_path) as worker:
        started = time.monotonic()
        first = enqueue_job(client, 41, 1, QUEUE_STAT)
        second = enqueue_job(client, 42, 3, QUEUE_ROUTINE)
        tasks = worker.wait_for(2)
        elapsed = time.monotonic() - started
    assert first != second
    assert sorted(tasks) == [(41, 1, "stat"), (42, 3, "routine")]
    assert elapsed < 5, f"round trip took {elapsed:.2f} s"


def test_redis_broker_round_trip_to_a_real_worker(tmp_path, redis_url):
    settings = load_settings(data_dir=tmp_path, broker_url=redis_url)
    client = make_client(settings)
    with ProbeWorker(tmp_path, broker_url=redis_url) as worker:
        enqueue_job(client, 7, 2, QUEUE_STAT)
        enqueue_job(client, 8, 1, QUEUE_ROUTINE)
        tasks = worker.wait_for(2)
    assert sorted(tasks) == [(7, 2, "stat"), (8, 1, "routine")]


def _queued_job(factory, **study_kwargs) -> int:
    study_uid = generate_uid()
    series_uid = add_series(factory, study_uid, **study_kwargs)
    with factory() as session, session.begin():
        series = session.scalar(select(Series).where(Series.series_uid == series_uid))
        job = Job(study_id=series.study_id, series_id=series.id, version=1,
                  state=JobState.queued, queue=QUEUE_ROUTINE,
                  last_instance_at=datetime.now(UTC),
                  created_at=datetime.now(UTC) - timedelta(minutes=5))
        session.add(job)
        session.flush()
        return job.id


def test_broker_down_leaves_the_job_queued_and_the_reconciler_sends_it_later(
    tmp_path, session_factory, redis_server
):
    job_id = _queued_job(session_factory)
    settings = load_settings(data_dir=tmp_path, broker_url=redis_server.url)
    redis_server.stop()
    enqueuer = JobEnqueuer(session_factory, make_client(settings))
    outcome = enqueuer.enqueue(job_id)
    assert not outcome.sent and outcome.error
    with session_factory() as session:
        job = session.get(Job, job_id)
        assert job.state == JobState.queued and job.enqueued_at is None and job.task_id is None
        failed = session.scalars(
            select(AuditEvent).where(AuditEvent.action == "job.enqueue_failed")
        ).all()
        assert [e.job_id for e in failed] == [job_id]
        assert failed[0].outcome == "error"

    redis_server.start()
    with ProbeWorker(tmp_path, broker_url=redis_server.url) as worker:
        outcomes = reconcile_queued_jobs(session_factory, make_client(settings),
                                         older_than=timedelta(seconds=1))
        assert [(o.job_id, o.sent) for o in outcomes] == [(job_id, True)]
        assert worker.wait_for(1) == [(job_id, 1, "routine")]
    with session_factory() as session:
        job = session.get(Job, job_id)
        assert job.enqueued_at is not None and job.task_id == outcomes[0].task_id
        enqueued = session.scalars(
            select(AuditEvent).where(AuditEvent.action == "job.enqueued")
        ).one()
        assert enqueued.detail["reconciled"] is True
    # Nothing left to send: a second run does nothing.
    assert reconcile_queued_jobs(session_factory, make_client(settings), older_than=1) == []


def test_the_beat_is_the_one_schedule_that_sends_a_job_the_broker_never_took(
    tmp_path, database_url, session_factory, redis_server
):
    # No node runs here, only a worker with its embedded beat: the sweep needs nothing else.
    job_id = _queued_job(session_factory)  # committed 5 minutes ago, never reached the broker
    (tmp_path / "data").mkdir()
    worker = WorkerProcess({"TRIAGE_DATA_DIR": str(tmp_path / "data"), "TRIAGE_DATABASE_URL": database_url,
                            "TRIAGE_BROKER_URL": redis_server.url, "TRIAGE_RECONCILE_INTERVAL_S": "1"},
                           tmp_path / "worker.log")

    def reconciled() -> list[AuditEvent]:
        with session_factory() as session:
            return [e for e in session.scalars(select(AuditEvent).where(
                AuditEvent.action == "job.enqueued", AuditEvent.job_id == job_id)) if e.detail.get("reconciled")]

    try:
        worker.start()
        wait_until(lambda: bool(reconciled()), "the beat's sweep sends the job", timeout=60, interval=0.5,
                   process=worker.process, log=tmp_path / "worker.log")
    finally:
        worker.stop()
    assert len(reconciled()) == 1  # sent once, however many sweeps ran


def test_reconciler_leaves_young_and_non_queued_jobs_alone(tmp_path, session_factory):
    job_id = _queued_job(session_factory)
    with session_factory() as session, session.begin():
        session.get(Job, job_id).state = JobState.running
    client = make_client(load_settings(data_dir=tmp_path))
    assert reconcile_queued_jobs(session_factory, client, older_than=1) == []
    young = _queued_job(session_factory)
    with session_factory() as session, session.begin():
        session.get(Job, young).created_at = datetime.now(UTC)
    assert reconcile_queued_jobs(session_factory, client, older_than=60) == []
    sent = reconcile_queued_jobs(session_factory, client, older_than=0)
    assert [o.job_id for o in sent] == [young] and sent[0].sent


def test_unreachable_redis_fails_fast(tmp_path):
    settings = load_settings(data_dir=tmp_path, broker_url=f"redis://127.0.0.1:{free_port()}/0")
    started = time.monotonic()
    with pytest.raises(OperationalError):
        enqueue_job(make_client(settings), 1, 1, QUEUE_ROUTINE)
    assert time.monotonic() - started < 15


@pytest.mark.parametrize(
    ("priority", "stat_aes", "expected"),
    [
        ("STAT", [], QUEUE_STAT),
        ("ROUTINE", [], QUEUE_ROUTINE),
        (None, ["CT_ED_1"], QUEUE_STAT),
        (None, ["OTHER_AE"], QUEUE_ROUTINE),
    ],
)
def test_queue_from_priority_or_calling_ae(tmp_path, session_factory, priority, stat_aes, expected):
    study_uid = generate_uid()
    series_uid = add_series(session_factory, study_uid, calling_ae="CT_ED_1",
                            requested_priority=priority)
    settings = load_settings(data_dir=tmp_path, stat_calling_aes=stat_aes)
    with session_factory() as session:
        series = session.scalar(select(Series).where(Series.series_uid == series_uid))
        assert session.get(Study, series.study_id).study_uid == study_uid
        queue, _reason = choose_queue(settings, session, series)
    assert queue == expected


def test_reconciler_resends_jobs_a_broker_lost(tmp_path, session_factory):
    """Redis without persistence loses messages on restart: a job sent long ago and still
    ``queued`` is sent again when asked to (the worker is idempotent per job version)."""
    job_id = _queued_job(session_factory)
    with session_factory() as session, session.begin():
        job = session.get(Job, job_id)
        job.enqueued_at = datetime.now(UTC) - timedelta(minutes=10)
        job.task_id = "lost-task"
    client = make_client(load_settings(data_dir=tmp_path))
    assert reconcile_queued_jobs(session_factory, client, older_than=1) == []
    [outcome] = reconcile_queued_jobs(session_factory, client, older_than=1,
                                      resend_sent_after=timedelta(minutes=5))
    assert outcome.sent and outcome.task_id != "lost-task"
    with session_factory() as session:
        assert session.get(Job, job_id).task_id == outcome.task_id
