"""A job's state moves only along `triage_node.jobs.TRANSITIONS`, by one guarded UPDATE each.

Every (state, event) pair is tried on SQLite and PostgreSQL: the allowed ones move the row
and write their audit row, the others leave the row exactly as it was. On PostgreSQL two
sessions race for the same job and exactly one wins a transition that leaves its state.
The source tree is scanned so that no module outside ``triage_node/jobs`` writes a job's
state, and docs/ARCHITECTURE.md must draw the table as it is.
"""

from __future__ import annotations

import ast
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from tests.pipeline_helpers import add_series, database_url, session_factory  # noqa: F401 - fixtures
from triage_node.db import schema
from triage_node.db.models import AuditEvent, Job, Result, Series
from triage_node.db.session import make_engine, make_sessionmaker, transaction
from triage_node.jobs import (
    TRANSITIONS,
    Event,
    JobState,
    claim_job,
    fail_job,
    finish_job,
    mermaid_diagram,
    requeue_job,
    retry_job,
    supersede_job,
    target,
)
from triage_node.timeutil import utcnow

REPO_ROOT = Path(__file__).resolve().parents[1]
AUDIT_ACTION = {
    Event.claim: "job.started", Event.finish: "job.done", Event.fail: "job.failed",
    Event.retry: "job.retried", Event.requeue: "job.requeued", Event.supersede: "job.superseded",
}
LONG_AGO = timedelta(hours=2)


def _job(factory: sessionmaker[Session], state: JobState, *, with_result: bool = False) -> int:
    series_uid = add_series(factory, generate_uid())
    with transaction(factory) as session:
        series = session.scalars(select(Series).where(Series.series_uid == series_uid)).one()
        job = Job(study_id=series.study_id, series_id=series.id, version=1, state=state,
                  queue="routine", attempts=1, error="earlier error", task_id="task-0",
                  started_at=utcnow() - LONG_AGO)
        session.add(job)
        session.flush()
        if with_result:
            session.add(Result(
                job_id=job.id, study_id=series.study_id, model_name="m", model_version="1",
                device_uid="1.2.3", operating_point="balanced", positive=False,
                study_probabilities={}, decisions={}, slice_probabilities=[], key_slices={},
            ))
        return job.id


def _apply(session: Session, job_id: int, event: Event, *, version: int = 1) -> bool:
    """Apply ``event`` the way its caller in the node or the worker does."""
    if event is Event.claim:
        return claim_job(session, job_id, version, at=utcnow(), task_id="task-1", actor="worker",
                         instances=3, backend="test")
    if event is Event.finish:
        return finish_job(session, job_id, version, actor="worker", positive=True, outbox_items=2,
                          seconds_started_to_reported=1.5)
    if event is Event.fail:
        return fail_job(session, job_id, version, error="BackendUnavailable: down", actor="worker")
    if event is Event.retry:
        return retry_job(session, job_id, actor="cli")
    if event is Event.requeue:
        return requeue_job(session, job_id, started_before=utcnow() - timedelta(minutes=6),
                           actor="worker")
    if event is Event.supersede:
        return supersede_job(session, job_id, by=0, reason="late instances", actor="node",
                             study_uid=None, series_uid=None)
    raise AssertionError(event)


def _row(factory: sessionmaker[Session], job_id: int) -> dict[str, object]:
    with factory() as session:
        job = session.get(Job, job_id)
        return {c.key: getattr(job, c.key) for c in Job.__table__.columns}


def _actions(factory: sessionmaker[Session], job_id: int) -> list[str]:
    with factory() as session:
        return list(session.scalars(
            select(AuditEvent.action).where(AuditEvent.job_id == job_id).order_by(AuditEvent.id)
        ))


def test_table_covers_the_states_and_events_the_node_uses():
    assert set(TRANSITIONS.values()) <= set(JobState)
    assert {event for _, event in TRANSITIONS} == set(Event)
    assert not any(state is JobState.superseded for state, _ in TRANSITIONS)  # terminal
    assert target("failed", Event.retry) is JobState.queued
    assert target(JobState.done, Event.retry) is None


@pytest.mark.parametrize("event", list(Event), ids=str)
def test_each_event_moves_only_the_states_the_table_allows(session_factory, event):
    for state in JobState:
        job_id = _job(session_factory, state)
        before = _row(session_factory, job_id)
        with transaction(session_factory) as session:
            won = _apply(session, job_id, event)
        after = _row(session_factory, job_id)
        to = TRANSITIONS.get((state, event))
        if to is None:
            assert not won, f"{state} --{event}--> should be refused"
            assert after == before, f"{state} --{event}--> changed the row"
            assert _actions(session_factory, job_id) == []
        else:
            assert won, f"{state} --{event}--> {to} was refused"
            assert after["state"] == to
            assert _actions(session_factory, job_id) == [AUDIT_ACTION[event]]


def test_event_conditions_beyond_the_state_refuse_and_leave_the_row(session_factory):
    cases: list[tuple[int, Callable[[Session, int], bool]]] = [
        # a done job with a result is not run again
        (_job(session_factory, JobState.done, with_result=True), lambda s, j: _apply(s, j, Event.claim)),
        # another version's task neither claims, finishes nor fails this one
        (_job(session_factory, JobState.queued), lambda s, j: _apply(s, j, Event.claim, version=2)),
        (_job(session_factory, JobState.running), lambda s, j: _apply(s, j, Event.finish, version=2)),
        (_job(session_factory, JobState.running), lambda s, j: _apply(s, j, Event.fail, version=2)),
        # a run that started recently is not requeued
        (_job(session_factory, JobState.running),
         lambda s, j: requeue_job(s, j, started_before=utcnow() - LONG_AGO * 2, actor="worker")),
        # a job that does not exist
        (10_000, lambda s, j: _apply(s, j, Event.supersede)),
    ]
    for job_id, apply in cases:
        before = _row(session_factory, job_id) if job_id != 10_000 else None
        with transaction(session_factory) as session:
            assert not apply(session, job_id)
        if before is not None:
            assert _row(session_factory, job_id) == before
            assert _actions(session_factory, job_id) == []


def test_claim_counts_the_attempt_and_marks_a_rerun(session_factory):
    job_id = _job(session_factory, JobState.queued)
    for _ in range(2):
        with transaction(session_factory) as session:
            assert _apply(session, job_id, Event.claim)
    row = _row(session_factory, job_id)
    assert row["attempts"] == 3 and row["task_id"] == "task-1" and row["error"] is None
    with session_factory() as session:
        started = session.scalars(select(AuditEvent).where(AuditEvent.action == "job.started")
                                  .order_by(AuditEvent.id)).all()
    assert [(e.detail["attempt"], e.detail["rerun_after_interruption"]) for e in started] == [
        (2, False), (3, True)]


# -- two actors at once (PostgreSQL) -------------------------------------------------------
@pytest.fixture
def pg_factory(postgres_db: str) -> Iterator[sessionmaker[Session]]:
    schema.upgrade(postgres_db)
    engine = make_engine(postgres_db)
    try:
        yield make_sessionmaker(engine)
    finally:
        engine.dispose()


def _race(factory: sessionmaker[Session], job_id: int, first: Event, second: Event) -> tuple[bool, bool]:
    """``first`` writes and holds its transaction open while ``second`` reads the old state
    and tries; ``first`` commits while ``second`` waits on the row."""
    wrote, results = threading.Event(), {}

    def run_first() -> None:
        with transaction(factory) as session:
            results["first"] = _apply(session, job_id, first)
            wrote.set()
            threading.Event().wait(0.5)  # second is now blocked on the row lock

    def run_second() -> None:
        assert wrote.wait(10)
        with transaction(factory) as session:
            results["second"] = _apply(session, job_id, second)

    threads = [threading.Thread(target=run_first), threading.Thread(target=run_second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results["first"], results["second"]


@pytest.mark.parametrize(("state", "event"), [
    (JobState.failed, Event.retry),
    (JobState.running, Event.requeue),
    (JobState.queued, Event.supersede),
    (JobState.running, Event.supersede),
], ids=str)
def test_two_concurrent_attempts_of_a_transition_exactly_one_wins(pg_factory, state, event):
    job_id = _job(pg_factory, state)
    assert _race(pg_factory, job_id, event, event) == (True, False)
    assert _row(pg_factory, job_id)["state"] == TRANSITIONS[state, event]
    assert _actions(pg_factory, job_id) == [AUDIT_ACTION[event]]


def test_a_result_recorded_after_the_job_was_superseded_does_not_finish_it(pg_factory):
    job_id = _job(pg_factory, JobState.running)
    assert _race(pg_factory, job_id, Event.supersede, Event.finish) == (True, False)
    assert _row(pg_factory, job_id)["state"] == JobState.superseded
    assert _actions(pg_factory, job_id) == ["job.superseded"]


def test_a_concurrent_second_claim_runs_as_a_rerun_and_counts_both_attempts(pg_factory):
    job_id = _job(pg_factory, JobState.queued)
    assert _race(pg_factory, job_id, Event.claim, Event.claim) == (True, True)
    assert _row(pg_factory, job_id)["attempts"] == 3  # neither increment is lost
    with pg_factory() as session:
        reruns = [e.detail["rerun_after_interruption"] for e in session.scalars(
            select(AuditEvent).where(AuditEvent.action == "job.started").order_by(AuditEvent.id))]
    assert reruns == [False, True]


# -- nobody else writes a job's state ------------------------------------------------------
_JOB_STATE_VALUES = {s.value for s in JobState}


def _mentions_job_state(node: ast.AST) -> bool:
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name) and sub.id == "JobState":
            return True
        if isinstance(sub, ast.Attribute) and sub.attr in _JOB_STATE_VALUES and isinstance(
                sub.value, ast.Name) and sub.value.id == "JobState":
            return True
        if isinstance(sub, ast.Constant) and sub.value in _JOB_STATE_VALUES:
            return True
    return False


def _state_targets(target_: ast.AST, value: ast.AST | None) -> Iterator[tuple[ast.Attribute, ast.AST | None]]:
    if isinstance(target_, ast.Tuple):
        values = value.elts if isinstance(value, ast.Tuple) and len(value.elts) == len(target_.elts) else None
        for i, elt in enumerate(target_.elts):
            yield from _state_targets(elt, values[i] if values else value)
    elif isinstance(target_, ast.Attribute) and target_.attr == "state":
        yield target_, value


def job_state_writes(source: str) -> list[str]:
    """Lines of ``source`` that write a job's state: ``<job>.state = ...`` (a job by its
    name or by a `JobState` value), ``setattr(x, "state", JobState...)``, ``Job(state=...)``
    and ``update(Job)...values(state=...)``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                for attr, value in _state_targets(t, node.value):
                    owner = ast.unparse(attr.value).lower()
                    if "job" in owner or (value is not None and _mentions_job_state(value)):
                        found.append(f"{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            keywords = {k.arg for k in node.keywords}
            if name == "setattr" and len(node.args) == 3 and isinstance(node.args[1], ast.Constant) \
                    and node.args[1].value == "state" and (
                        "job" in ast.unparse(node.args[0]).lower() or _mentions_job_state(node.args[2])):
                found.append(f"{node.lineno}: {ast.unparse(node)}")
            elif name == "Job" and "state" in keywords:
                found.append(f"{node.lineno}: {ast.unparse(node)}")
            elif name.endswith(".values") and "state" in keywords and "update(Job)" in ast.unparse(node):
                found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_the_scan_finds_each_kind_of_state_write():
    src = """
job.state = JobState.done
lost.state, lost.started_at = JobState.running, now
old.state = "superseded"
setattr(j, "state", JobState.failed)
session.add(Job(study_id=1, state=JobState.queued))
session.execute(update(Job).where(Job.id == 1).values(state="failed"))
item.state = OutboxState.delivered
"""
    assert [line.split(":")[0] for line in job_state_writes(src)] == ["2", "3", "4", "5", "6", "7"]


def test_no_module_outside_triage_node_jobs_writes_a_job_state():
    offenders = []
    for package in ("triage_node", "worker"):
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            if path.is_relative_to(REPO_ROOT / "triage_node" / "jobs"):
                continue
            offenders += [f"{path.relative_to(REPO_ROOT)}:{hit}"
                          for hit in job_state_writes(path.read_text())]
    assert offenders == [], "write job states through triage_node.jobs.transitions:\n" + "\n".join(offenders)


# -- the drawing ---------------------------------------------------------------------------
def test_architecture_doc_draws_the_transition_table():
    text = (REPO_ROOT / "docs" / "ARCHITECTURE.md").read_text()
    block = text.split("<!-- generated:job-lifecycle -->\n", 1)[1].split("<!-- /generated:job-lifecycle -->")[0]
    assert block.strip() == mermaid_diagram(), "run `triage-node docs generate`"
    edges = {line.split(" : ")[0].strip() for line in block.splitlines() if "-->" in line}
    assert edges >= {f"{s.value} --> {to.value}" for (s, _), to in TRANSITIONS.items()}
    for (state, event), to in TRANSITIONS.items():
        assert any(line.strip().startswith(f"{state.value} --> {to.value} :") and event.value in line
                   for line in block.splitlines()), (state, event)


# -- the sweep -----------------------------------------------------------------------------
def test_sweep_sends_a_stale_job_once_and_refuses_unknown_steps(tmp_path, session_factory):
    from triage_node.config import load_settings
    from triage_node.jobs.sweep import STALE, UNSENT, sweep
    from triage_node.queue import JobEnqueuer, make_client

    settings = load_settings(data_dir=tmp_path / "data")
    stale, recent = _job(session_factory, JobState.running), _job(session_factory, JobState.running)
    with transaction(session_factory) as session:
        session.get(Job, recent).started_at = utcnow()
    client = make_client(settings)
    try:
        enqueuer = JobEnqueuer(session_factory, client)
        with pytest.raises(ValueError, match="unknown sweep steps"):
            sweep(enqueuer, settings, steps=("stale", "everything"))
        first = sweep(enqueuer, settings, steps=(STALE, UNSENT), unsent_after=0)
        assert first.requeued == [stale] and [o.job_id for o in first.sent] == []
        again = sweep(enqueuer, settings, steps=(STALE, UNSENT), unsent_after=0)
        assert again.requeued == [] and again.sent == []
    finally:
        client.close()
    assert _row(session_factory, stale)["state"] == JobState.queued
    assert _row(session_factory, recent)["state"] == JobState.running
    assert _actions(session_factory, stale) == ["job.requeued", "job.enqueued"]
    assert len(list((settings.broker_folder / "queue").glob("*.routine.msg"))) == 1
