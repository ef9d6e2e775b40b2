"""The parts the demo and the end-to-end benchmark run a node with, on one machine.

A local PACS (a pynetdicom Storage SCP, PS3.4 Annex B, that keeps what it receives),
a sender that C-STOREs a study over one association as a modality does, and the node's
own processes (``triage-node serve`` and ``triage-node worker``) started, watched and
stopped as process groups. Kept apart from ``worker.demo``, which runs the demo with
them and prints its worklist: ``worker.bench_e2e`` uses the same parts for its
timings.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom

from triage_node.dicom_status import StoreStatus
from triage_node.peers.process import free_port
from triage_node.timeutil import utcnow

__all__ = [
    "NODE_AE",
    "PACS_AE",
    "SCANNER_AE",
    "DemoError",
    "LocalPACS",
    "Processes",
    "free_port",
    "seconds_between",
    "send_files",
    "wait_for_port",
]

PACS_AE = "DEMO_PACS"
SCANNER_AE = "DEMO_CT"
NODE_AE = "TRIAGE_NODE"


class DemoError(RuntimeError):
    """The demo could not run to the end (a part did not start, the deadline passed)."""


class LocalPACS:
    """A pynetdicom Storage SCP that keeps every object it receives as a Part 10 file.

    Parameters
    ----------
    folder : Path
        Received objects go to ``folder/<SOPInstanceUID>.dcm``.
    ae_title : str
        Its AE title.
    """

    def __init__(self, folder: Path, ae_title: str = PACS_AE) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.ae_title = ae_title
        self.port = free_port()
        self.received: dict[str, Path] = {}
        self.accepted_at: dict[str, datetime] = {}
        self._lock = threading.Lock()
        self._server: Any = None

    def _on_store(self, event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        path = self.folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        with self._lock:
            self.received[str(ds.SOPInstanceUID)] = path
            self.accepted_at[str(ds.SOPInstanceUID)] = utcnow()
        return 0x0000  # Success (PS3.4 Annex B.2.3)

    def start(self) -> LocalPACS:
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # pynetdicom defines these through globals()

        ae = AE(ae_title=self.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)
        self._server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def destination(self) -> dict[str, Any]:
        return {"name": "demo-pacs", "kind": "dimse", "ae_title": self.ae_title,
                "host": "127.0.0.1", "port": self.port, "timeout_s": 10.0}


def send_files(paths: Iterable[Path], host: str, port: int, called_ae: str,
               calling_ae: str = SCANNER_AE) -> int:
    """Send files over one association with C-STORE (as a modality does); returns the count stored.

    Raises
    ------
    DemoError
        The association is refused or an object is not stored.
    """
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE

    files = [Path(p) for p in paths]
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    pairs = sorted({(h.file_meta.MediaStorageSOPClassUID, h.file_meta.TransferSyntaxUID) for h in headers})
    ae = AE(ae_title=calling_ae)
    for sop_class, syntax in pairs:
        ae.add_requested_context(sop_class, sorted({syntax, ExplicitVRLittleEndian, ImplicitVRLittleEndian}))
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        raise DemoError(f"association to {called_ae}@{host}:{port} not established")
    stored = 0
    try:
        for path in files:
            status = assoc.send_c_store(pydicom.dcmread(path))
            if status is None or getattr(status, "Status", None) != StoreStatus.SUCCESS:
                raise DemoError(f"{path.name}: C-STORE status {getattr(status, 'Status', None)}")
            stored += 1
    finally:
        assoc.release()
    return stored


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from triage_node.cli import main; main()", *args]


@dataclass
class Processes:
    env: dict[str, str]
    log_dir: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(_cli(*args), env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def check(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                tail = (self.log_dir / f"{name}.log").read_text(errors="replace").splitlines()[-15:]
                raise DemoError(f"{name} exited with {proc.returncode}:\n" + "\n".join(tail))

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def wait_for_port(port: int, procs: Processes, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        procs.check()
        with socket.socket() as sock:
            sock.settimeout(0.2)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise DemoError(f"nothing listens on port {port} after {timeout:.0f} s")


def seconds_between(a: datetime | None, b: datetime | None) -> float | None:
    """Seconds from ``a`` to ``b`` (naive values are UTC), rounded; None when either is missing."""
    if a is None or b is None:
        return None
    a = a if a.tzinfo else a.replace(tzinfo=UTC)
    b = b if b.tzinfo else b.replace(tzinfo=UTC)
    return round((b - a).total_seconds(), 2)
