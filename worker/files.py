"""Atomic file writes for what the worker and its commands produce (results, site files).

A reader sees the old file or the new one, never a half-written one: the bytes go to a
temporary file in the same folder, are fsynced, and the file is renamed over the final name
(``os.replace``, atomic on POSIX).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def write_atomic(path: Path, write: Callable[[IO[bytes]], object], mode: int, *, sync_dir: bool = False) -> Path:
    """Write ``path`` through ``write(binary file)``, fsynced, renamed into place with permissions ``mode``.

    ``sync_dir`` also fsyncs the folder, so that the rename itself survives a crash (the
    caller creates the folder with the permissions it wants).
    """
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync_dir:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path
