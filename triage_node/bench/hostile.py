"""Hostile-peer benchmark: a normal study sent while hostile connections hold the DICOM port.

A real ``triage-node serve --no-api`` on a temporary data directory, with its default
caps and deadlines, bound to loopback. Four kinds of hostile peer, ``per_kind`` of each
(40 by default), all opened at once from ``sources`` loopback addresses (127.0.0.2, ...):

- ``idle``: declares a 1 MiB A-ASSOCIATE-RQ, sends two bytes of it and goes quiet;
- ``trickle``: sends its A-ASSOCIATE-RQ one byte a second;
- ``empty_pdvs``: associates, sends a C-STORE-RQ command, then empty PDVs without end;
- ``command_set``: associates, then command-set fragments without a last one.

Meanwhile one normal study (``slices`` CT slices) is sent from 127.0.0.1 by a pynetdicom
SCU that, as a modality would, tries again after a transient rejection. Measured: the
node's peak resident set size (sampled every 0.2 s), whether every slice of the study
was acknowledged with success, and how each hostile connection ended (rejected at
accept, aborted by the node, or closed). Triage itself needs a worker and is not part
of this run.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from triage_node.bench.peers import free_port, write_ct_slices
from triage_node.config import load_settings
from triage_node.db import schema

__all__ = ["KINDS", "run_hostile_benchmark"]

AET = "TRIAGE_NODE"
HOST = "127.0.0.1"
KINDS = ("idle", "trickle", "empty_pdvs", "command_set")
#: Longest the hostile phase is watched (the default request deadline is 30 s).
MAX_WATCH_S = 60.0


class _Node:
    """``triage-node serve --no-api`` as a subprocess, defaults but for the data dir and port."""

    def __init__(self, data_dir: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.log = data_dir.parent / "serve.log"
        settings = load_settings(data_dir=data_dir)
        schema.upgrade(settings.effective_database_url)
        environ = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
        environ.update(TRIAGE_DATA_DIR=str(data_dir), TRIAGE_DICOM_PORT=str(self.port),
                       TRIAGE_DICOM_HOST=HOST, TRIAGE_LOG_FORMAT="json", TRIAGE_LOG_LEVEL="WARNING",
                       TRIAGE_SECRET_KEY=secrets.token_hex(32), OMP_NUM_THREADS="1", **env)
        executable = Path(sys.executable).parent / "triage-node"
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([str(executable), "serve", "--no-api"], env=environ,
                                            stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not _port_open(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = self.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"triage-node serve did not start:\n{tail}")
            time.sleep(0.2)

    def rss_mb(self) -> float:
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1):
            return True
    except OSError:
        return False


def _pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BxI", pdu_type, len(body)) + body


def _pdv(control: int, fragment: bytes) -> bytes:
    return struct.pack(">IBB", len(fragment) + 2, 1, control) + fragment


def _requests() -> tuple[bytes, bytes]:
    """An A-ASSOCIATE-RQ for CT Image Storage (context 1), and a C-STORE-RQ command set."""
    from pydicom.dataset import Dataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    from pynetdicom import build_context
    from pynetdicom.dsutils import encode
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
    from pynetdicom.sop_class import CTImageStorage

    context = build_context(CTImageStorage, [ExplicitVRLittleEndian])
    context.context_id = 1
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title, primitive.called_ae_title = "HOSTILE", AET
    primitive.presentation_context_definition_list = [context]
    length = MaximumLengthNotification()
    length.maximum_length_received = 16382
    primitive.user_information = [length]
    rq = A_ASSOCIATE_RQ()
    rq.from_primitive(primitive)
    command = Dataset()
    command.AffectedSOPClassUID = CTImageStorage
    command.CommandField, command.MessageID, command.Priority = 0x0001, 1, 0
    command.CommandDataSetType = 0x0000
    command.AffectedSOPInstanceUID = generate_uid()
    return rq.encode(), encode(command, True, True)


def _hostile(kind: str, port: int, source: str, rq: bytes, command: bytes, stop: threading.Event) -> str:
    """One hostile connection of ``kind``; how it ended."""
    try:
        sock = socket.create_connection((HOST, port), timeout=MAX_WATCH_S, source_address=(source, 0))
    except OSError:
        return "connect failed"
    with sock:
        try:
            if kind == "idle":
                sock.sendall(struct.pack(">BxI", 0x01, 1024 * 1024 - 1) + b"\x00\x01")
            elif kind == "trickle":
                for byte in rq:
                    if stop.is_set():
                        break
                    sock.sendall(bytes([byte]))
                    if _replied(sock, 1.0):
                        break
            else:
                sock.sendall(rq)
                first = sock.recv(1)
                if first != b"\x02":
                    return _ENDINGS.get(first, "closed")
                sock.recv(65536)  # the rest of the A-ASSOCIATE-AC
                if kind == "empty_pdvs":
                    sock.sendall(_pdu(0x04, _pdv(0x03, command)))
                    flood = _pdu(0x04, _pdv(0x00, b"") * 4096)
                else:
                    flood = _pdu(0x04, _pdv(0x01, b"\x00" * 16 * 1024))
                while not stop.is_set() and not _replied(sock, 0.0):
                    sock.sendall(flood)
        except OSError:
            pass
        return _ending(sock)


def _replied(sock: socket.socket, wait: float) -> bool:
    import select

    return bool(select.select([sock], [], [], wait)[0])


#: What the first byte the node sent back says (PDU types, PS3.8 Table 9-1).
_ENDINGS = {b"\x03": "rejected", b"\x07": "aborted"}


def _ending(sock: socket.socket) -> str:
    """rejected (A-ASSOCIATE-RJ), aborted (A-ABORT) or closed, from what the node sent."""
    sock.settimeout(MAX_WATCH_S)
    try:
        return _ENDINGS.get(sock.recv(1), "closed")
    except OSError:
        return "closed"


def _send_study(paths: list[Path], port: int, budget_s: float) -> dict[str, Any]:
    """The normal study, retried after a transient rejection as a modality would."""
    from pydicom import dcmread
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # a rejection is expected here
    datasets = [dcmread(p) for p in paths]
    started = time.monotonic()
    attempts, statuses = 0, Counter[str]()
    while time.monotonic() - started < budget_s:
        attempts += 1
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        assoc = ae.associate(HOST, port, ae_title=AET)
        if not assoc.is_established:
            time.sleep(1.0)
            continue
        try:
            for ds in datasets:
                response = assoc.send_c_store(ds)
                statuses[f"0x{int(response.Status) if 'Status' in response else 0xFFFF:04X}"] += 1
        finally:
            if assoc.is_established:
                assoc.release()
        break
    return {
        "slices": len(datasets),
        "attempts": attempts,
        "statuses": dict(statuses),
        "acknowledged": statuses.get("0x0000", 0) == len(datasets),
        "seconds": round(time.monotonic() - started, 2),
    }


def run_hostile_benchmark(
    per_kind: int = 40,
    sources: int = 1,
    slices: int = 24,
    size: int = 256,
    max_associations: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the benchmark and return its result.

    Parameters
    ----------
    per_kind : int
        Hostile connections of each of `KINDS` (1 to 100).
    sources : int
        Loopback addresses the hostile connections come from (1 to 50).
    slices, size : int
        The normal study: slices of size x size, 16-bit.
    max_associations : int, optional
        Both connection caps (in all and per source) instead of the defaults: with
        more than the hostile connections, every one of them gets in, and the figure
        is the memory bound of the Upper Layer itself, not of the caps.
    """
    if not 1 <= per_kind <= 100 or not 1 <= sources <= 50:
        raise ValueError("per_kind must be 1..100 and sources 1..50")
    say = progress or (lambda _msg: None)
    rq, command = _requests()
    root = Path(tempfile.mkdtemp(prefix="triage-hostile-"))
    try:
        study = write_ct_slices(root / "study", slices, size=size)
        caps = {} if max_associations is None else {
            "TRIAGE_MAX_ASSOCIATIONS": str(max_associations),
            "TRIAGE_MAX_ASSOCIATIONS_PER_SOURCE": str(max_associations),
        }
        node = _Node(root / "data", caps)
        stop = threading.Event()
        try:
            rss = [node.rss_mb()]
            done = threading.Event()

            def sample() -> None:
                while not done.wait(0.2):
                    rss.append(node.rss_mb())

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            endings: dict[str, Counter[str]] = {kind: Counter() for kind in KINDS}
            lock = threading.Lock()

            def hostile(kind: str, source: str) -> None:
                ending = _hostile(kind, node.port, source, rq, command, stop)
                with lock:
                    endings[kind][ending] += 1

            say(f"node pid {node.process.pid}: {per_kind} hostile connections of each of "
                f"{', '.join(KINDS)} from {sources} address(es), and one study of {slices} slices")
            threads = [
                threading.Thread(target=hostile, args=(kind, f"127.0.0.{2 + i % sources}"), daemon=True)
                for i in range(per_kind) for kind in KINDS
            ]
            started = time.monotonic()
            for t in threads:
                t.start()
            time.sleep(0.5)  # the hostile ones first
            normal = _send_study(study, node.port, budget_s=MAX_WATCH_S)
            for t in threads:
                t.join(timeout=max(0.0, MAX_WATCH_S - (time.monotonic() - started)))
            stop.set()
            hostile_s = round(time.monotonic() - started, 1)
            done.set()
            sampler.join()
            alive = node.process.poll() is None
        finally:
            stop.set()
            node.stop()
        return {
            "setup": {"per_kind": per_kind, "kinds": list(KINDS), "sources": sources,
                      "study": f"{slices} slices of {size}x{size}",
                      "max_associations": max_associations or "default",
                      "node": "triage-node serve --no-api, default settings, loopback"},
            "ok": alive and normal["acknowledged"],
            "node_alive": alive,
            "rss_mb": {"start": round(rss[0], 1), "peak": round(max(rss), 1), "end": round(rss[-1], 1)},
            "normal_study": normal,
            "hostile_endings": {kind: dict(counter) for kind, counter in endings.items()},
            "hostile_phase_s": hostile_s,
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
