"""Starting, watching and stopping a peer's process: binaries, free ports, readiness.

Every peer in this package runs from its Debian (or wheel) binary on a free loopback
port and is polled for readiness with a real request under a deadline. A missing binary
is an error that names the package to install (``bash scripts/test.sh`` installs all of
them); nothing is skipped because a peer is absent.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "PACKAGES",
    "ServerError",
    "free_port",
    "port_open",
    "require_binary",
    "spawn",
    "terminate",
    "wait_until",
]

#: Debian package providing each binary, for the error message when it is missing.
PACKAGES = {
    "initdb": "postgresql",
    "pg_ctl": "postgresql",
    "redis-server": "redis-server",
    "Orthanc": "orthanc",
    "storescp": "dcmtk",
    "storescu": "dcmtk",
    "echoscu": "dcmtk",
    "dciodvfy": "dicom3tools",
    "node": "nodejs",
}


class ServerError(RuntimeError):
    """A peer could not be found, started or stopped."""


def require_binary(name: str, *search: str | Path) -> str:
    """Return the path of executable ``name`` or raise `ServerError`.

    Parameters
    ----------
    name : str
        Executable name.
    *search : str or Path
        Extra directories searched before ``PATH``.
    """
    for folder in search:
        candidate = Path(folder) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        package = PACKAGES.get(name, "?")
        raise ServerError(
            f"{name} not found: install the Debian package {package!r} "
            "(bash scripts/test.sh installs every test dependency)"
        )
    return found


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free at the time of the call."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def log_tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a peer's log, or ``(no log)``."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def wait_until(
    check: Callable[[], bool],
    what: str,
    *,
    timeout: float = 30.0,
    interval: float = 0.05,
    process: subprocess.Popen[Any] | None = None,
    log: Path | None = None,
) -> None:
    """Poll ``check`` until it returns true, or raise `ServerError`.

    Exceptions from ``check`` count as "not yet". When ``process`` exits first, the
    error says so at once instead of waiting for the deadline; ``log`` adds the tail of
    the peer's log to the message.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            if check():
                return
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"
            last_error = exc
        if process is not None and process.poll() is not None:
            tail = log_tail(log) if log else ""
            raise ServerError(f"{what}: process exited with {process.returncode}\n{tail}")
        if time.monotonic() > deadline:
            tail = log_tail(log) if log else ""
            raise ServerError(f"{what}: not ready after {timeout:.0f} s ({last_error!r})\n{tail}")
        time.sleep(interval)
        interval = min(interval * 1.5, 0.5)


def spawn(argv: Sequence[str], log_path: Path, **popen: Any) -> subprocess.Popen[bytes]:
    """Start a peer's process with stdout and stderr appended to ``log_path``."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, **popen)


def terminate(process: subprocess.Popen[Any] | None, timeout: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds; always reaps the process."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout)
