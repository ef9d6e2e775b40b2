"""A real `triage-node worker` process on the embedded filesystem broker and on Redis.

- Stat first: routine jobs are queued before a stat job while no worker runs; the
  worker (one process, prefetch 1) starts the stat job first.
- A pool process SIGKILLed in the middle of a job: the message is rejected back to the
  queue (``task_reject_on_worker_lost`` + late acknowledgement), the job runs again and
  leaves one Result and one SR.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from tests.worker_support import build_small_repository, ingest_files, write_ct_series
from triage_node.config import load_settings
from triage_node.db import schema
from triage_node.db.models import AuditEvent, Job, JobState, Result
from triage_node.db.session import make_engine, make_sessionmaker
from triage_node.peers import wait_until
from triage_node.queue import JobEnqueuer, make_client

TRIAGE_NODE = str(Path(sys.executable).parent / "triage-node")


@pytest.fixture(scope="module")
def model_card(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_small_repository(tmp_path_factory.mktemp("model"), threshold=0.3)


def _env(settings_env: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
    env.update(settings_env)
    env.update(OMP_NUM_THREADS="1", TRIAGE_INFERENCE_THREADS="1", TRIAGE_LOG_FORMAT="console",
               TRIAGE_KEY_SLICES_PER_CLASS="1", TRIAGE_SECRET_KEY=os.environ["TRIAGE_SECRET_KEY"])
    return env


class Node:
    """Database, broker and spool of one test node, with a worker subprocess."""

    def __init__(self, tmp_path: Path, card: Path, broker_url: str | None = None) -> None:
        self.data_dir = tmp_path / "data"
        self.env_settings = {
            "TRIAGE_DATA_DIR": str(self.data_dir),
            "TRIAGE_MODEL_REPOSITORY": str(card.parent / "models"),
            "TRIAGE_MODEL_CARD": str(card),
            "TRIAGE_STAT_CALLING_AES": '["ER_CT"]',
        }
        if broker_url:
            self.env_settings["TRIAGE_BROKER_URL"] = broker_url
        self.settings = load_settings(
            data_dir=self.data_dir, model_repository=card.parent / "models", model_card=card,
            stat_calling_aes=["ER_CT"], broker_url=broker_url,
        )
        schema.upgrade(self.settings.effective_database_url)
        self.engine = make_engine(self.settings.effective_database_url)
        self.session_factory = make_sessionmaker(self.engine)
        self.client = make_client(self.settings)
        self.enqueuer = JobEnqueuer(self.session_factory, self.client)
        self.worker: subprocess.Popen | None = None
        self.log = tmp_path / "worker.log"

    def send_study(self, folder: Path, calling_ae: str, **kwargs) -> int:  # type: ignore[no-untyped-def]
        (job_id,) = ingest_files(self.settings, self.session_factory, write_ct_series(folder, **kwargs),
                                 calling_ae=calling_ae, enqueuer=self.enqueuer)
        return job_id

    def start_worker(self, *args: str) -> subprocess.Popen:
        with open(self.log, "ab") as log:
            self.worker = subprocess.Popen(
                [TRIAGE_NODE, "worker", "--concurrency", "1", *args],
                env=_env(self.env_settings), stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self.worker

    def jobs(self) -> list[Job]:
        with self.session_factory() as session:
            return list(session.scalars(select(Job).order_by(Job.id)))

    def wait_done(self, n: int, timeout: float = 60.0) -> list[Job]:
        wait_until(lambda: sum(j.state == JobState.done for j in self.jobs()) == n,
                   f"{n} jobs done", timeout=timeout, interval=0.2, process=self.worker, log=self.log)
        return self.jobs()

    def stop(self) -> None:
        if self.worker is not None and self.worker.poll() is None:
            os.killpg(self.worker.pid, signal.SIGTERM)
            try:
                self.worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.worker.pid, signal.SIGKILL)
                self.worker.wait()
        self.client.close()
        self.engine.dispose()


@pytest.fixture(params=["filesystem", "redis"])
def node(request: pytest.FixtureRequest, tmp_path: Path, model_card: Path) -> Iterator[Node]:
    broker = request.getfixturevalue("redis_url") if request.param == "redis" else None
    n = Node(tmp_path, model_card, broker)
    try:
        yield n
    finally:
        n.stop()


def test_worker_serves_stat_before_routine(node: Node, tmp_path: Path) -> None:
    # Round robin (kombu's default) would start stat, routine, stat, routine, routine.
    routine = [node.send_study(tmp_path / f"r{i}", "MODALITY", seed=i) for i in range(3)]
    stat = [node.send_study(tmp_path / f"s{i}", "ER_CT", bleed=True, seed=9 + i) for i in range(2)]
    queues = {j.id: j.queue for j in node.jobs()}
    assert [queues[j] for j in routine + stat] == ["routine"] * 3 + ["stat"] * 2
    node.start_worker()
    jobs = {j.id: j for j in node.wait_done(5)}
    order = sorted(jobs, key=lambda i: jobs[i].started_at)
    # both stat jobs first, then the routine ones in their arrival order
    assert order == stat + routine, f"start order {order}; stat jobs {stat}"


def _pool_children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True, check=False)
    return [int(p) for p in out.stdout.split()]


def test_pool_process_killed_mid_job_runs_the_job_again_with_one_result(
    tmp_path: Path, model_card: Path, redis_url: str
) -> None:
    node = Node(tmp_path, model_card, redis_url)
    try:
        node.start_worker("--no-beat")  # the only child process is then the pool process
        wait_until(lambda: _pool_children(node.worker.pid), "pool process", timeout=30,
                   process=node.worker, log=node.log)
        # Slow the job down enough to kill it mid-run: many slices.
        job_id = node.send_study(tmp_path / "big", "MODALITY", slices=60, size=256, bleed=True)
        wait_until(lambda: node.jobs()[0].state == JobState.running, "job running", timeout=30,
                   interval=0.02, process=node.worker, log=node.log)
        (child,) = _pool_children(node.worker.pid)
        os.kill(child, signal.SIGKILL)
        (job,) = node.wait_done(1, timeout=60)
        assert job.id == job_id and job.attempts == 2
        with node.session_factory() as session:
            assert session.scalar(select(func.count()).select_from(Result)) == 1
            started = session.scalars(
                select(AuditEvent).where(AuditEvent.action == "job.started").order_by(AuditEvent.id)
            ).all()
            assert [e.detail["rerun_after_interruption"] for e in started] == [False, True]
        out_dir = node.data_dir / "results" / str(job_id)
        assert [p.name for p in out_dir.glob("sr*.dcm")] == ["sr.dcm"]
    finally:
        node.stop()


def test_worker_refuses_to_start_on_a_model_mismatch(tmp_path: Path, model_card: Path) -> None:
    other = build_small_repository(tmp_path / "other", size=96)
    env = _env({
        "TRIAGE_DATA_DIR": str(tmp_path / "data"),
        "TRIAGE_MODEL_REPOSITORY": str(model_card.parent / "models"),
        "TRIAGE_MODEL_CARD": str(other),
    })
    schema.upgrade(load_settings(data_dir=tmp_path / "data").effective_database_url)
    proc = subprocess.run([TRIAGE_NODE, "worker"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "worker not started" in proc.stderr and "refusing to run" in proc.stderr
    assert "image FP32 [-1, 3, 96, 96]" in proc.stderr


def test_filesystem_consumer_skips_message_files_still_being_written(tmp_path: Path) -> None:
    import fcntl

    from triage_node.fs_broker import message_file_complete

    path = tmp_path / "1_x.routine.msg"
    path.write_bytes(b"")
    assert not message_file_complete(str(path))  # created, not yet written
    with open(path, "wb", buffering=0) as writer:
        fcntl.flock(writer.fileno(), fcntl.LOCK_EX)
        writer.write(b'{"body": "..."}')
        assert not message_file_complete(str(path))  # written, producer still holds the lock
        fcntl.flock(writer.fileno(), fcntl.LOCK_UN)
    assert message_file_complete(str(path))
    assert not message_file_complete(str(tmp_path / "gone.routine.msg"))


def test_task_prerun_binds_task_and_job_ids_for_every_log_line() -> None:
    import structlog

    from worker.celery_app import _bind_task, _unbind_task

    _bind_task(task_id="abc-123", args=[42, 3])
    try:
        with structlog.testing.capture_logs() as logs:
            structlog.get_logger("t").info("step")
        bound = structlog.contextvars.get_contextvars()
        assert bound == {"task_id": "abc-123", "job_id": 42, "job_version": 3}
    finally:
        _unbind_task()
    assert structlog.contextvars.get_contextvars() == {}
    assert logs[0]["event"] == "step"


def test_triton_down_during_a_job_is_retried_with_backoff_until_it_is_back(
    tmp_path: Path, model_card: Path, triton_server  # type: ignore[no-untyped-def]
) -> None:
    from worker.inference.triton_server import TritonServer

    server = triton_server(model_card.parent / "models")
    port = int(server.grpc_url.rsplit(":", 1)[1])
    node = Node(tmp_path, model_card)
    node.env_settings.update(TRIAGE_INFERENCE_BACKEND="triton", TRIAGE_TRITON_URL=server.grpc_url,
                             TRIAGE_INFERENCE_TIMEOUT_S="3")
    again = None
    try:
        node.start_worker("--no-beat")  # starts: Triton is live, ready and matches the card
        # "ready." is logged once the pool process has built its clients
        wait_until(lambda: " ready." in node.log.read_text(errors="replace"), "worker ready",
                   timeout=30, process=node.worker, log=node.log)
        server.stop()
        job_id = node.send_study(tmp_path / "s", "MODALITY", bleed=True)

        def retries() -> int:
            return node.log.read_text(errors="replace").count("retry: Retry in")

        wait_until(lambda: retries() >= 2, "job retried", timeout=40, interval=0.1,
                   process=node.worker, log=node.log)
        # retried, not failed: the job waits for Triton (running, or queued if the
        # backend was not even reachable to start it)
        assert node.jobs()[0].state in (JobState.running, JobState.queued)
        assert not node.jobs()[0].error
        again = TritonServer(model_card.parent / "models", grpc_port=port).start()
        (job,) = node.wait_done(1, timeout=60)
        assert job.id == job_id and job.attempts >= 1
        with node.session_factory() as session:
            assert session.scalar(select(func.count()).select_from(Result)) == 1
            failed = session.scalars(select(AuditEvent).where(AuditEvent.action == "job.failed")).all()
            assert failed == []
    finally:
        node.stop()
        if again is not None:
            again.stop()


def test_filesystem_exchange_table_created_by_another_process_does_not_crash_binding(tmp_path: Path) -> None:
    from kombu import Connection

    from triage_node.fs_broker import PriorityFilesystemTransport

    folders = {name: tmp_path / name for name in ("queue", "processed", "control")}
    for folder in folders.values():
        folder.mkdir()
    options = {"data_folder_in": str(folders["queue"]), "data_folder_out": str(folders["queue"]),
               "processed_folder": str(folders["processed"]), "control_folder": str(folders["control"])}
    # another process has just created the table and not yet written it
    (folders["control"] / "triage.exchange").write_bytes(b"")
    with Connection("filesystem://", transport=PriorityFilesystemTransport, transport_options=options) as conn:
        channel = conn.channel()
        channel._queue_bind("triage", "stat", None, "stat")
        channel._queue_bind("triage", "routine", None, "routine")
        channel._queue_bind("triage", "stat", None, "stat")  # idempotent
        assert sorted(q.queue for q in channel.get_table("triage")) == ["routine", "stat"]
