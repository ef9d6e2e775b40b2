"""Faults between the database and the queue, with real Redis and real worker processes.

- Redis restarted without persistence while jobs are queued: every message is lost;
  `triage_node.reconcile.reconcile_lost_jobs` finds the jobs the database says are
  queued with no live task and sends them again; each runs once.
- The whole worker (main process and pool) SIGKILLed mid-inference: the message waits
  in Redis's ``unacked`` hash for the visibility timeout (an hour), so a new worker
  does not run it; the reconciler sends it again and the job ends with one Result and
  one SR for its version.

Covered elsewhere, by reference: a *pool process* SIGKILLed mid-job
(``tests/test_worker_celery.py::test_pool_process_killed_mid_job_runs_the_job_again_with_one_result``),
the broker down when a job is committed
(``tests/test_queue.py::test_broker_down_leaves_the_job_queued_and_the_reconciler_sends_it_later``).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import select

from tests.node_process import WorkerProcess, fault_counts, record_fault, shared_model_card
from tests.worker_support import ingest_files, write_ct_series
from triage_node.config import load_settings
from triage_node.db import schema
from triage_node.db.models import AuditEvent, Job, JobState
from triage_node.db.session import make_engine, make_sessionmaker
from triage_node.peers import RedisServer, wait_until
from triage_node.queue import JobEnqueuer, make_client
from triage_node.reconcile import broker_task_ids, reconcile_lost_jobs, worker_task_ids


@pytest.fixture(scope="module")
def model_card() -> Path:
    return shared_model_card()


class QueueNode:
    """Database, spool and Redis broker of one node; the worker runs as a subprocess."""

    def __init__(self, tmp_path: Path, card: Path, redis_url: str) -> None:
        self.data_dir = tmp_path / "data"
        self.env = {
            "TRIAGE_DATA_DIR": str(self.data_dir),
            "TRIAGE_MODEL_REPOSITORY": str(card.parent / "models"),
            "TRIAGE_MODEL_CARD": str(card),
            "TRIAGE_BROKER_URL": redis_url,
        }
        self.settings = load_settings(data_dir=self.data_dir, broker_url=redis_url,
                                      model_repository=card.parent / "models", model_card=card)
        schema.upgrade(self.settings.effective_database_url)
        self.engine = make_engine(self.settings.effective_database_url)
        self.session_factory = make_sessionmaker(self.engine)
        self.client = make_client(self.settings)
        self.enqueuer = JobEnqueuer(self.session_factory, self.client)
        self.worker = WorkerProcess(self.env, tmp_path / "worker.log")
        self.acknowledged = 0

    def send_study(self, folder: Path, **kwargs) -> int:  # type: ignore[no-untyped-def]
        paths = write_ct_series(folder, **kwargs)
        (job_id,) = ingest_files(self.settings, self.session_factory, paths, enqueuer=self.enqueuer)
        self.acknowledged += len(paths)
        return job_id

    def jobs(self) -> list[Job]:
        with self.session_factory() as session:
            return list(session.scalars(select(Job).order_by(Job.id)))

    def audit(self, action: str) -> list[AuditEvent]:
        with self.session_factory() as session:
            return list(session.scalars(select(AuditEvent).where(AuditEvent.action == action)
                                        .order_by(AuditEvent.id)))

    def wait_done(self, n: int, timeout: float = 90.0) -> list[Job]:
        wait_until(lambda: sum(j.state == JobState.done for j in self.jobs()) == n, f"{n} jobs done",
                   timeout=timeout, interval=0.2, process=self.worker.process, log=self.worker.log_path)
        return self.jobs()

    def counts(self) -> dict[str, int]:
        return fault_counts(self.session_factory, self.data_dir / "results", acknowledged=self.acknowledged)

    def close(self) -> None:
        self.worker.stop()
        self.client.close()
        self.engine.dispose()


def test_redis_restarted_without_persistence_loses_queued_jobs_and_the_reconciler_resends_them(
    tmp_path: Path, model_card: Path, redis_server: RedisServer
) -> None:
    node = QueueNode(tmp_path, model_card, redis_server.url)
    try:
        job_ids = [node.send_study(tmp_path / f"s{i}", slices=12, size=64, seed=i) for i in range(3)]
        jobs = node.jobs()
        assert [j.state for j in jobs] == [JobState.queued] * 3 and all(j.enqueued_at for j in jobs)
        assert broker_task_ids(node.client) == {j.task_id for j in jobs}

        redis_server.restart()  # no RDB, no AOF: every message is gone
        assert broker_task_ids(node.client) == set()
        assert worker_task_ids(node.client, timeout=0.5) == (set(), 0)

        resent = reconcile_lost_jobs(node.session_factory, node.client, grace=0, inspect_timeout=0.5)
        assert sorted(r.job_id for r in resent) == job_ids and all(r.sent for r in resent)
        assert broker_task_ids(node.client) == {r.task_id for r in resent}
        # Waiting in the broker now: a second round sends nothing.
        assert reconcile_lost_jobs(node.session_factory, node.client, grace=0, inspect_timeout=0.5) == []

        node.worker.start()
        jobs = node.wait_done(3)
        assert all(j.attempts == 1 for j in jobs)
        counts = node.counts()
        assert counts["stored"] == counts["acknowledged"] == 36
        assert counts["results"] == counts["sr_files"] == counts["jobs_done"] == 3
        reenqueued = node.audit("job.reenqueued")
        assert sorted(e.job_id for e in reenqueued) == job_ids
        assert all(e.detail["state"] == "queued" and e.detail["old_task_id"] for e in reenqueued)
        record_fault("redis_restart_without_persistence", {**counts, "reenqueued": len(reenqueued)})
    finally:
        node.close()


def test_worker_sigkilled_mid_inference_runs_the_job_again_with_one_result_and_one_sr(
    tmp_path: Path, model_card: Path, redis_server: RedisServer
) -> None:
    node = QueueNode(tmp_path, model_card, redis_server.url)
    try:
        node.worker.start()
        # Many slices, so that the job is still inferring when it is killed.
        job_id = node.send_study(tmp_path / "big", slices=60, size=256, bleed=True)
        wait_until(lambda: node.jobs()[0].state == JobState.running, "job running", timeout=30,
                   interval=0.02, process=node.worker.process, log=node.worker.log_path)
        time.sleep(0.3)
        node.worker.kill()  # main process and pool child
        (job,) = node.jobs()
        assert job.state == JobState.running and node.counts()["results"] == 0

        node.worker.start()  # a new worker does not see the unacknowledged message...
        time.sleep(3)
        assert node.jobs()[0].state == JobState.running
        held, workers = worker_task_ids(node.client, timeout=2)
        assert workers == 1 and job.task_id not in held
        # ...the reconciler does.
        [resent] = reconcile_lost_jobs(node.session_factory, node.client, grace=0, inspect_timeout=2)
        assert resent.job_id == job_id and resent.state == "running" and resent.sent
        (job,) = node.wait_done(1)
        assert job.attempts == 2
        started = node.audit("job.started")
        assert [e.detail["rerun_after_interruption"] for e in started] == [False, True]
        counts = node.counts()
        assert counts["results"] == counts["jobs_done"] == 1
        assert [p.name for p in (node.data_dir / "results" / str(job_id)).glob("sr*.dcm")] == ["sr.dcm"]
        assert counts["stored"] == counts["acknowledged"] == 60
        record_fault("worker_sigkill_mid_inference", {**counts, "attempts": job.attempts})
    finally:
        node.close()


def test_filesystem_broker_message_lost_is_resent_and_a_waiting_one_is_not(
    tmp_path: Path, model_card: Path
) -> None:
    settings = load_settings(data_dir=tmp_path / "data", model_repository=model_card.parent / "models",
                             model_card=model_card)
    schema.upgrade(settings.effective_database_url)
    engine = make_engine(settings.effective_database_url)
    factory = make_sessionmaker(engine)
    client = make_client(settings)
    try:
        enqueuer = JobEnqueuer(factory, client)
        job_ids = [ingest_files(settings, factory, write_ct_series(tmp_path / f"s{i}", slices=12, size=64, seed=i),
                                enqueuer=enqueuer)[0] for i in range(2)]
        with factory() as session:
            tasks = {j.id: j.task_id for j in session.scalars(select(Job))}
        assert broker_task_ids(client) == set(tasks.values())
        # The message of the first job disappears (a wiped broker folder, a lost disk).
        queue = Path(client.conf.broker_transport_options["data_folder_in"])
        for path in queue.glob("*.msg"):
            if tasks[job_ids[0]].encode() in path.read_bytes():
                path.unlink()
        [resent] = reconcile_lost_jobs(factory, client, grace=0, inspect_timeout=0.3)
        assert resent.job_id == job_ids[0] and resent.sent
        assert broker_task_ids(client) == {resent.task_id, tasks[job_ids[1]]}
    finally:
        client.close()
        engine.dispose()
