"""A real ``triage-node serve`` process for the reliability and security tests.

The node runs as a subprocess (SCP, completeness timer and HTTP API in one process,
JSON logs to a file), so the tests can SIGKILL it, restart it and check that it is still
alive after hostile input. The database is migrated from the test process first, as
``triage-node db upgrade`` would; tokens are created with the same settings.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from triage_node.config import Settings, load_settings
from triage_node.db import schema
from triage_node.db.session import make_engine, make_sessionmaker, transaction
from triage_node.peers import free_port, port_open, wait_until

TRIAGE_NODE = str(Path(sys.executable).parent / "triage-node")
AET = "TRIAGE_NODE"


class NodeProcess:
    """``triage-node serve`` on free ports with its own data directory.

    Parameters
    ----------
    data_dir : Path
        Spool, SQLite database (unless ``database_url``) and broker folder.
    env : dict, optional
        Extra ``TRIAGE_*`` variables (they win over the defaults set here).
    """

    def __init__(self, data_dir: Path, *, database_url: str | None = None,
                 broker_url: str | None = None, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.log_path = data_dir.parent / f"{data_dir.name}-serve.log"
        self.env_settings = {
            "TRIAGE_DATA_DIR": str(data_dir),
            "TRIAGE_DICOM_PORT": str(self.dicom_port),
            "TRIAGE_HTTP_PORT": str(self.http_port),
            "TRIAGE_LOG_FORMAT": "json",
            "TRIAGE_MIN_FREE_DISK_MB": "1",
            "TRIAGE_STABILITY_SECONDS": "2",
            # No default secret exists; each node gets its own (tokens are made with it).
            "TRIAGE_SECRET_KEY": "node-test-" + secrets.token_hex(12),
        }
        if database_url:
            self.env_settings["TRIAGE_DATABASE_URL"] = database_url
        if broker_url:
            self.env_settings["TRIAGE_BROKER_URL"] = broker_url
        self.env_settings.update(env or {})
        self.process: subprocess.Popen | None = None
        self.settings = self._settings()
        self.engine = make_engine(self.settings.effective_database_url)
        self.session_factory = make_sessionmaker(self.engine)

    def _settings(self) -> Settings:
        overrides: dict[str, Any] = {"data_dir": self.data_dir, "min_free_disk_mb": 1}
        for key, value in self.env_settings.items():
            name = key.removeprefix("TRIAGE_").lower()
            if name in ("database_url", "broker_url", "secret_key", "environment"):
                overrides[name] = value
        return load_settings(**overrides)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def environ(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
        env.update(OMP_NUM_THREADS="1", **self.env_settings)
        return env

    def start(self, timeout: float = 60.0) -> NodeProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        schema.upgrade(self.settings.effective_database_url)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [TRIAGE_NODE, "serve"], env=self.environ(), stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        wait_until(lambda: port_open(self.dicom_port), "node DICOM port", timeout=timeout,
                   process=self.process, log=self.log_path)
        wait_until(lambda: httpx.get(self.url + "/healthz", timeout=2).status_code == 200,
                   "node HTTP API", timeout=timeout, process=self.process, log=self.log_path)
        return self

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def token(self, role: str = "sender", name: str | None = None) -> str:
        from triage_node.api.auth import create_token

        with transaction(self.session_factory) as session:
            return create_token(session, self.settings, role, name or f"{role}-test")[1]

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the node's process group and reap it."""
        if self.alive:
            os.killpg(self.process.pid, sig)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.alive:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def close(self) -> None:
        self.stop()
        self.engine.dispose()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> NodeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class WorkerProcess:
    """``triage-node worker`` (Celery, prefork, one pool process) as a subprocess.

    ``kill()`` SIGKILLs the whole process group: the main process and its pool child,
    as when the machine or container dies (not only a pool process).
    """

    def __init__(self, env_settings: dict[str, str], log_path: Path, args: tuple[str, ...] = ()) -> None:
        self.env_settings = env_settings
        self.log_path = log_path
        self.args = args  # extra ``triage-node worker`` options, e.g. ("--no-beat",)
        self.process: subprocess.Popen | None = None

    def start(self) -> WorkerProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
        env.update({"OMP_NUM_THREADS": "1", "TRIAGE_INFERENCE_THREADS": "1", "TRIAGE_LOG_FORMAT": "json",
                    "TRIAGE_KEY_SLICES_PER_CLASS": "1",
                    # the worker refuses to start without one; the test process has a random one
                    "TRIAGE_SECRET_KEY": os.environ["TRIAGE_SECRET_KEY"]})
        env.update(self.env_settings)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [TRIAGE_NODE, "worker", "--concurrency", "1", *self.args], env=env, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        wait_until(lambda: bool(self.pool_children()), "worker pool process", timeout=60,
                   process=self.process, log=self.log_path)
        return self

    def pool_children(self) -> list[int]:
        if self.process is None:
            return []
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.process.pid)],
                             capture_output=True, text=True, check=False)
        return [int(p) for p in out.stdout.split()]

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        if self.alive:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.alive:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


def fault_counts(session_factory: Any, results_dir: Path | None = None, **extra: int) -> dict[str, int]:
    """What the database and the results folder hold: stored instances, jobs done,
    results, SR files (one per job version expected), delivered outbox items, audit
    rows of failures (``outcome`` other than ok)."""
    from sqlalchemy import func, select

    from triage_node.db.models import AuditEvent, Instance, Job, JobState, OutboxItem, OutboxState, Result

    with session_factory() as session:
        def count(query: Any) -> int:
            return int(session.scalar(query))

        counts = {
            "stored": count(select(func.count()).select_from(Instance)),
            "jobs_done": count(select(func.count()).select_from(Job).where(Job.state == JobState.done)),
            "results": count(select(func.count()).select_from(Result)),
            "delivered": count(select(func.count()).select_from(OutboxItem)
                               .where(OutboxItem.state == OutboxState.delivered)),
            "audited_failures": count(select(func.count()).select_from(AuditEvent)
                                      .where(AuditEvent.outcome != "ok")),
        }
    if results_dir is not None:
        counts["sr_files"] = len(list(results_dir.glob("*/sr*.dcm")))
    counts.update(extra)
    return counts


def record_fault(name: str, counts: dict[str, int]) -> None:
    """Append ``{fault: counts}`` to the JSON file named by ``TRIAGE_FAULT_REPORT`` (if set)."""
    import json

    target = os.environ.get("TRIAGE_FAULT_REPORT")
    print(f"fault {name}: {counts}")
    if not target:
        return
    path = Path(target)
    data = json.loads(path.read_text()) if path.exists() else {}
    data[name] = counts
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


_MODEL_CARD: Path | None = None


def shared_model_card() -> Path:
    """A small exported model (``tests.worker_support.build_small_repository``, every
    threshold 0.3), built once per test process and shared by the fault and security tests."""
    global _MODEL_CARD
    if _MODEL_CARD is None or not _MODEL_CARD.exists():
        import atexit
        import shutil
        import tempfile

        from tests.worker_support import build_small_repository

        folder = Path(tempfile.mkdtemp(prefix="triage-model-"))
        atexit.register(shutil.rmtree, folder, True)
        _MODEL_CARD = build_small_repository(folder, threshold=0.3)
    return _MODEL_CARD
