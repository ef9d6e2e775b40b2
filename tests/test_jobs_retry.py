"""Failed jobs are sent again on request: audited, back on the queue, run by a real worker."""

from __future__ import annotations

import json

from pydicom.uid import generate_uid
from sqlalchemy import select
from typer.testing import CliRunner

from tests.pipeline_helpers import (  # noqa: F401 - fixtures
    ProbeWorker,
    add_series,
    database_url,
    session_factory,
)
from triage_node.config import load_settings
from triage_node.db.models import AuditEvent, Job, JobState, Series
from triage_node.db.session import transaction
from triage_node.queue import make_client, retry_failed_jobs


def _job(factory, state: JobState) -> int:
    series_uid = add_series(factory, generate_uid())
    with transaction(factory) as session:
        series = session.scalars(select(Series).where(Series.series_uid == series_uid)).one()
        job = Job(study_id=series.study_id, series_id=series.id, version=1, state=state,
                  queue="stat", error="BackendUnavailable: triton down" if state == "failed" else None)
        session.add(job)
        session.flush()
        return job.id


def test_failed_jobs_go_back_on_the_queue_and_run(tmp_path, session_factory):
    settings = load_settings(data_dir=tmp_path)
    failed, done = _job(session_factory, JobState.failed), _job(session_factory, JobState.done)
    client = make_client(settings)
    with ProbeWorker(tmp_path) as worker:
        outcomes = retry_failed_jobs(session_factory, client, actor="cli")
        assert [(o.job_id, o.sent) for o in outcomes] == [(failed, True)]
        assert worker.wait_for(1) == [(failed, 1, "stat")]
    client.close()
    with session_factory() as session:
        assert session.get(Job, failed).state == JobState.queued and session.get(Job, failed).error is None
        assert session.get(Job, done).state == JobState.done  # only failed jobs are touched
        (event,) = session.scalars(select(AuditEvent).where(AuditEvent.action == "job.retried")).all()
        assert event.job_id == failed and event.actor == "cli"
        assert event.detail["previous_error"].startswith("BackendUnavailable")


def test_jobs_commands(tmp_path, monkeypatch):
    from triage_node.cli import build_app
    from triage_node.db import schema
    from triage_node.db.session import make_engine, make_sessionmaker

    monkeypatch.setenv("TRIAGE_DATA_DIR", str(tmp_path))
    settings = load_settings()
    schema.upgrade(settings.effective_database_url)
    engine = make_engine(settings.effective_database_url)
    job_id = _job(make_sessionmaker(engine), JobState.failed)
    engine.dispose()
    app, runner = build_app(), CliRunner()
    listed = runner.invoke(app, ["jobs", "list", "--state", "failed", "--json"])
    assert listed.exit_code == 0, listed.output
    assert [row["id"] for row in json.loads(listed.output)] == [job_id]
    assert runner.invoke(app, ["jobs", "retry"]).exit_code == 2
    retried = runner.invoke(app, ["jobs", "retry", "--id", str(job_id)])
    assert retried.exit_code == 0 and f"job {job_id}: sent" in retried.output
    again = runner.invoke(app, ["jobs", "retry", "--failed"])
    assert again.exit_code == 0 and "no failed job matched" in again.output
    assert list((settings.broker_folder / "queue").glob("*.stat.msg"))
