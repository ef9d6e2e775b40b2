"""PostgreSQL 15 as a throwaway peer: ``initdb`` + ``pg_ctl`` on a free loopback port.

The cluster is owned by the ``postgres`` system user (``initdb`` refuses root), uses
trust authentication and listens on TCP 127.0.0.1 only; fsync is off, as nothing
outlives it.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path

from triage_node.peers.process import ServerError, free_port, require_binary

__all__ = ["PostgresServer"]


def _postgres_bindir() -> Path:
    """Directory with ``initdb``/``pg_ctl``: PostgreSQL 15 first, then ``pg_config``."""
    default = Path("/usr/lib/postgresql/15/bin")
    if (default / "initdb").exists():
        return default
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        bindir = Path(out.stdout.strip())
        if (bindir / "initdb").exists():
            return bindir
    return Path(require_binary("initdb")).parent


class PostgresServer:
    """A throwaway PostgreSQL cluster owned by the ``postgres`` system user.

    Parameters
    ----------
    database : str
        Database created at start (``triage``).
    user : str
        System user that owns the cluster; ``initdb`` refuses to run as root.
    """

    def __init__(self, database: str = "triage", user: str = "postgres") -> None:
        self.database = database
        self.user = user
        self.port = free_port()
        self.bindir = _postgres_bindir()
        self.root: Path | None = None
        self._running = False

    # The cluster directory must be owned by ``user``; pytest's tmp_path lives under a
    # root-only 0700 folder, so the cluster gets its own folder under the system temp dir.
    def _run_as_owner(self, args: Sequence[str], timeout: float = 120) -> subprocess.CompletedProcess:
        command = list(args)
        if os.geteuid() == 0 and self.user != "root":
            command = [require_binary("runuser"), "-u", self.user, "--", *command]
        proc = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, check=False, cwd=self.root
        )
        if proc.returncode != 0:
            raise ServerError(
                f"{' '.join(args[:2])} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    @property
    def data_dir(self) -> Path:
        assert self.root is not None
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        assert self.root is not None
        return self.root / "postgres.log"

    def start(self) -> PostgresServer:
        """Create the cluster (first call only), start it and create the database."""
        first_start = self.root is None
        if first_start:
            self.root = Path(tempfile.mkdtemp(prefix="triage-pg-"))
            if os.geteuid() == 0:
                owner = pwd.getpwnam(self.user)
                os.chown(self.root, owner.pw_uid, owner.pw_gid)
            os.chmod(self.root, 0o700)
            self._run_as_owner(
                [
                    str(self.bindir / "initdb"),
                    "-D", str(self.data_dir),
                    "-U", "postgres",
                    "-A", "trust",
                    "-E", "UTF8",
                    "--locale=C",
                    "--no-sync",
                ]
            )
        # fsync off: a test cluster trades durability for speed; nothing outlives it.
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            "-c max_connections=200"
        )
        self._run_as_owner(
            [
                str(self.bindir / "pg_ctl"),
                "-D", str(self.data_dir),
                "-l", str(self.log_path),
                "-o", options,
                "-w", "-t", "60",
                "start",
            ]
        )
        self._running = True
        if first_start:
            self.execute(f'CREATE DATABASE "{self.database}"')
        return self

    def stop(self) -> None:
        """Stop the server (fast shutdown); the cluster directory is kept."""
        if not self._running:
            return
        self._run_as_owner(
            [str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "stop"]
        )
        self._running = False

    def cleanup(self) -> None:
        """Stop the server and delete the cluster."""
        try:
            self.stop()
        finally:
            if self.root is not None:
                shutil.rmtree(self.root, ignore_errors=True)
                self.root = None

    def url(self, database: str | None = None) -> str:
        """SQLAlchemy URL of ``database`` (default: the one created at start)."""
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{database or self.database}"

    @property
    def dsn_base(self) -> dict[str, object]:
        return {"host": "127.0.0.1", "port": self.port, "user": "postgres"}

    def execute(self, sql: str, database: str = "postgres") -> list[tuple]:
        """Run one statement in autocommit mode and return its rows (if any)."""
        import psycopg2

        conn = psycopg2.connect(dbname=database, connect_timeout=10, **self.dsn_base)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(sql)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    def create_database(self, name: str | None = None) -> str:
        """Create a fresh empty database and return its SQLAlchemy URL."""
        name = name or f"test_{uuid.uuid4().hex[:12]}"
        self.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop ``name``, disconnecting any sessions still open on it."""
        self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
