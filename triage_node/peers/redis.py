"""``redis-server`` as a throwaway peer, without persistence (no RDB, no AOF)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from triage_node.peers.process import free_port, require_binary, spawn, terminate, wait_until

__all__ = ["RedisServer"]


class RedisServer:
    """``redis-server`` on a free port with no persistence (no RDB, no AOF).

    The port stays the same across `restart`, so clients configured with `url`
    reconnect to the new, empty server.
    """

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.root = Path(tempfile.mkdtemp(prefix="triage-redis-"))
        self.binary = require_binary("redis-server")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.root / "redis.log"

    def start(self) -> RedisServer:
        if self.process is not None and self.process.poll() is None:
            return self
        self.process = spawn(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--dir", str(self.root),
                "--save", "",
                "--appendonly", "no",
                "--daemonize", "no",
                "--protected-mode", "yes",
            ],
            self.log_path,
            cwd=self.root,
        )
        wait_until(self.ping, "redis-server", timeout=30, process=self.process, log=self.log_path)
        return self

    def ping(self) -> bool:
        import redis

        client = redis.Redis.from_url(self.url, socket_timeout=1, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()

    def stop(self) -> None:
        terminate(self.process)
        self.process = None

    def restart(self) -> RedisServer:
        """Stop and start again on the same port; every key is lost."""
        self.stop()
        return self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
