"""Hostile-peer benchmark: a normal study sent while hostile connections hold the DICOM port.

A real ``triage-node serve --no-api`` on a temporary data directory, with its default
caps, deadlines and object size limit, bound to loopback, and a real ``triage-node worker``
beside it (embedded defaults: SQLite, the server-less broker, ONNX Runtime). Five kinds of
hostile peer, ``per_kind`` of each (40 by default), all opened at once from ``sources``
loopback addresses (127.0.0.2, ...):

- ``idle``: declares a 1 MiB A-ASSOCIATE-RQ, sends two bytes of it and goes quiet;
- ``trickle``: sends its A-ASSOCIATE-RQ one byte a second;
- ``empty_pdvs``: associates, sends a C-STORE-RQ command, then empty PDVs without end;
- ``command_set``: associates, then command-set fragments without a last one;
- ``deflate_bomb``: associates in Deflated Explicit VR Little Endian and sends a CT whose
  data set (about 1.5 MiB on the wire) inflates to 1.5 GiB, over ``max_object_mb``.

One study (``slices`` CT slices) is sent before the hostile peers start and one while they
hold the port, from 127.0.0.1, by a pynetdicom SCU that, as a modality would, tries again
after a transient rejection. Measured: the node's peak resident set size (sampled every
0.2 s), whether every slice of the second study was acknowledged with success, whether it
was triaged (its job done by the worker), whether every instance acknowledged in either
study is in the database and the spool at the end, and how each hostile connection ended
(rejected at accept, aborted by the node, or closed).
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from triage_node.bench.hostile_peers import (
    AET,
    HOST,
    MAX_WATCH_S,
    association_requests,
    deflate_bomb,
    hostile_connection,
)
from triage_node.config import REPO_ROOT, load_settings
from triage_node.db import schema
from triage_node.peers import free_port, port_open
from triage_node.synth.ct_series import write_ct_slices

__all__ = ["JSON_PATH", "KINDS", "run_hostile_benchmark"]

JSON_PATH = REPO_ROOT / "docs" / "bench" / "hostile.json"

KINDS = ("idle", "trickle", "empty_pdvs", "command_set", "deflate_bomb")
#: Longest the worker may take to triage the study sent under attack.
TRIAGE_WAIT_S = 180.0


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
        self.settings = settings
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([str(executable), "serve", "--no-api"], env=environ,
                                            stdout=log, stderr=subprocess.STDOUT)
            self.worker = subprocess.Popen([str(executable), "worker", "--concurrency", "1"], env=environ,
                                           stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not port_open(self.port, HOST):
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
        for process in (self.worker, self.process):
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def study_state(self, study_uid: str, expected: int) -> dict[str, Any]:
        """Instances of the study in the database with their spool files, and its job state."""
        from sqlalchemy import select

        from triage_node.db.models import Instance, Job, Series, Study
        from triage_node.db.session import make_engine, make_sessionmaker

        engine = make_engine(self.settings.effective_database_url)
        try:
            with make_sessionmaker(engine)() as session:
                paths = session.scalars(
                    select(Instance.path).join(Series).join(Study).where(Study.study_uid == study_uid)
                ).all()
                jobs = session.scalars(
                    select(Job.state).join(Study, Job.study_id == Study.id).where(Study.study_uid == study_uid)
                ).all()
        finally:
            engine.dispose()
        on_disk = sum(1 for p in paths if Path(p).is_file())
        return {"acknowledged": expected, "in_database": len(paths), "in_spool": on_disk,
                "lost": expected - min(len(paths), on_disk), "jobs": [str(j) for j in jobs]}


def _send_study(paths: list[Path], port: int, budget_s: float) -> dict[str, Any]:
    """The normal study, retried after a transient rejection as a modality would."""
    from pydicom import dcmread
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]  # pynetdicom defines these through globals()

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


def _study_uid(paths: list[Path]) -> str:
    from pydicom import dcmread

    return str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)


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
    rq, command = association_requests()
    root = Path(tempfile.mkdtemp(prefix="triage-hostile-"))
    try:
        before = write_ct_slices(root / "before", slices, size=size, seed=1)
        study = write_ct_slices(root / "study", slices, size=size)
        bomb = deflate_bomb(study[0])
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
            earlier = _send_study(before, node.port, budget_s=MAX_WATCH_S)
            endings: dict[str, Counter[str]] = {kind: Counter() for kind in KINDS}
            lock = threading.Lock()

            def hostile(kind: str, source: str) -> None:
                ending = hostile_connection(kind, node.port, source, rq, command, stop, bomb)
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
            uids = [_study_uid(before), _study_uid(study)]
            say(f"waiting up to {TRIAGE_WAIT_S:.0f} s for the worker to triage the study sent under attack")
            deadline = time.monotonic() + TRIAGE_WAIT_S
            while time.monotonic() < deadline and "done" not in node.study_state(uids[1], slices)["jobs"]:
                time.sleep(1.0)
            states = {"before": node.study_state(uids[0], earlier["statuses"].get("0x0000", 0)),
                      "under_attack": node.study_state(uids[1], normal["statuses"].get("0x0000", 0))}
            rss_end = node.rss_mb()
        finally:
            stop.set()
            node.stop()
        triaged = "done" in states["under_attack"]["jobs"]
        lost = sum(s["lost"] for s in states.values())
        return {
            "setup": {"per_kind": per_kind, "kinds": list(KINDS), "sources": sources,
                      "study": f"{slices} slices of {size}x{size}",
                      "max_associations": max_associations or "default",
                      "node": "triage-node serve --no-api and triage-node worker, default settings, loopback"},
            "ok": alive and normal["acknowledged"] and triaged and lost == 0,
            "node_alive": alive,
            "rss_mb": {"start": round(rss[0], 1), "peak": round(max(rss), 1), "end": round(rss_end, 1)},
            "study_before": earlier,
            "normal_study": normal,
            "triaged": triaged,
            "acknowledged_lost": lost,
            "studies": states,
            "hostile_endings": {kind: dict(counter) for kind, counter in endings.items()},
            "hostile_phase_s": hostile_s,
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
