"""Load benchmark: K concurrent associations sending studies to a real ``triage-node serve``.

The node runs as its own process (listener, completeness timer; no HTTP API) on a
temporary data directory with the embedded defaults (SQLite, filesystem broker), bound
to loopback. First one study at a time (the single-study figure), then K sender threads
(pynetdicom SCUs) each open an association per study, send its slices and release,
again and again until M minutes have passed. Measured:

- every C-STORE status (any failure status fails the run);
- per-image C-STORE round trip and per-study time (association open to release), p50
  and p95, alone and under load;
- the node process's resident set size (RSS), sampled every second: growth after the
  first fifth of the run and the slope over the second half (MB/min).

Bounded: loopback only, at most 32 associations and 30 minutes; the data directory is
deleted afterwards.
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from triage_node.config import REPO_ROOT, load_settings
from triage_node.db import schema
from triage_node.peers import echoscu, free_port
from triage_node.synth.ct_series import write_ct_slices
from triage_node.timeutil import utcnow

__all__ = ["JSON_PATH", "markdown_section", "run_load_benchmark"]

JSON_PATH = REPO_ROOT / "docs" / "bench" / "load.json"
MAX_ASSOCIATIONS = 32
MAX_MINUTES = 30.0
AET = "TRIAGE_NODE"
HOST = "127.0.0.1"


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def _summary(values: list[float]) -> dict[str, float | int | None]:
    p95 = _percentile(values, 95)
    return {
        "n": len(values),
        "p50_ms": None if not values else round(1000 * statistics.median(values), 2),
        "p95_ms": None if p95 is None else round(1000 * p95, 2),
        "max_ms": None if not values else round(1000 * max(values), 2),
    }


class _Node:
    """``triage-node serve --no-api`` as a subprocess on a temporary data directory."""

    def __init__(self, data_dir: Path, associations: int) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.log = data_dir.parent / "serve.log"
        settings = load_settings(data_dir=data_dir)
        schema.upgrade(settings.effective_database_url)
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
        env.update(TRIAGE_DATA_DIR=str(data_dir), TRIAGE_DICOM_PORT=str(self.port),
                   TRIAGE_DICOM_HOST=HOST, TRIAGE_LOG_FORMAT="json", TRIAGE_LOG_LEVEL="WARNING",
                   TRIAGE_MAX_ASSOCIATIONS=str(max(16, associations + 2)), OMP_NUM_THREADS="1",
                   TRIAGE_SECRET_KEY=os.urandom(24).hex())  # a throwaway node's own secret
        executable = Path(sys.executable).parent / "triage-node"
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([str(executable), "serve", "--no-api"], env=env,
                                            stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not echoscu(HOST, self.port, AET, calling_aet="BENCH", timeout=5):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"triage-node serve did not start; see {self.log}")
            time.sleep(0.2)

    def rss_mb(self) -> float:
        import psutil

        return psutil.Process(self.process.pid).memory_info().rss / 2**20

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@dataclass
class _Tally:
    image_s: list[float] = field(default_factory=list)
    study_s: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def status(self, value: int) -> None:
        key = f"0x{value:04X}"
        with self.lock:
            self.statuses[key] = self.statuses.get(key, 0) + 1


def _send_study(template: list[Any], port: int, tally: _Tally) -> None:
    """One new study (new UIDs) on one association."""
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]  # pynetdicom defines these through globals()

    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    ae = AE(ae_title="LOAD_SCU")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    started = time.perf_counter()
    assoc = ae.associate(HOST, port, ae_title=AET)
    if not assoc.is_established:
        with tally.lock:
            tally.failures.append("association not established")
        return
    try:
        for source in template:
            ds = source.copy()
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta = source.file_meta.copy()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            t0 = time.perf_counter()
            response = assoc.send_c_store(ds)
            elapsed = time.perf_counter() - t0
            status = int(response.Status) if "Status" in response else -1
            tally.status(status & 0xFFFF)
            with tally.lock:
                tally.image_s.append(elapsed)
                if status != 0:
                    tally.failures.append(f"status 0x{status & 0xFFFF:04X}")
    finally:
        if assoc.is_established:
            assoc.release()
    with tally.lock:
        tally.study_s.append(time.perf_counter() - started)


def run_load_benchmark(
    associations: int = 8,
    minutes: float = 1.0,
    slices: int = 24,
    size: int = 256,
    baseline_studies: int = 3,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the benchmark and return its result (the content of ``docs/bench/load.json``).

    Parameters
    ----------
    associations : int
        Concurrent associations (1 to 32).
    minutes : float
        Duration of the loaded phase (at most 30).
    slices, size : int
        Slices per study and their matrix (size x size, 16-bit).
    baseline_studies : int
        Studies sent one at a time before the load, for the single-study figure.
    """
    if not 1 <= associations <= MAX_ASSOCIATIONS:
        raise ValueError(f"associations must be 1..{MAX_ASSOCIATIONS}")
    if not 0 < minutes <= MAX_MINUTES:
        raise ValueError(f"minutes must be in (0, {MAX_MINUTES}]")
    say = progress or (lambda _msg: None)
    from pydicom import dcmread

    root = Path(tempfile.mkdtemp(prefix="triage-load-"))
    try:
        template = [dcmread(p) for p in write_ct_slices(root / "template", slices, size=size)]
        node = _Node(root / "data", associations)
        try:
            say(f"node pid {node.process.pid} on port {node.port}; single-study baseline")
            baseline = _Tally()
            for _ in range(baseline_studies):
                _send_study(template, node.port, baseline)
            rss: list[tuple[float, float]] = []
            tally = _Tally()
            stop_at = time.monotonic() + minutes * 60
            start = time.monotonic()
            done = threading.Event()

            def sample() -> None:
                while not done.wait(1.0):
                    rss.append((time.monotonic() - start, node.rss_mb()))

            def sender() -> None:
                while time.monotonic() < stop_at:
                    _send_study(template, node.port, tally)

            rss.append((0.0, node.rss_mb()))
            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            say(f"{associations} associations for {minutes:g} min")
            threads = [threading.Thread(target=sender, daemon=True) for _ in range(associations)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.monotonic() - start
            done.set()
            sampler.join()
            rss.append((elapsed, node.rss_mb()))
            node_alive = node.process.poll() is None
        finally:
            node.stop()
        return _result(associations, minutes, slices, size, baseline, tally, rss, elapsed, node_alive)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of RSS against time, in MB per minute."""
    if len(points) < 3:
        return None
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return None if den == 0 else round(60 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den, 3)


def _result(associations: int, minutes: float, slices: int, size: int, baseline: _Tally, tally: _Tally,
            rss: list[tuple[float, float]], elapsed: float, node_alive: bool) -> dict[str, Any]:
    warm = [p for p in rss if p[0] >= elapsed / 5] or rss
    second_half = [p for p in rss if p[0] >= elapsed / 2]
    growth = warm[-1][1] - warm[0][1]
    images = len(tally.image_s)
    return {
        "date": utcnow().isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_average": [round(x, 2) for x in os.getloadavg()]},
        "setup": {"associations": associations, "minutes": minutes, "slices_per_study": slices,
                  "matrix": f"{size}x{size}", "bytes_per_slice": size * size * 2,
                  "node": "triage-node serve --no-api (SQLite, filesystem broker, loopback)"},
        "ok": node_alive and not tally.failures and not baseline.failures,
        "node_alive": node_alive,
        "statuses": tally.statuses,
        "failures": tally.failures[:20],
        "studies": len(tally.study_s),
        "images": images,
        "images_per_s": round(images / elapsed, 1) if elapsed else None,
        "single_study": {"image": _summary(baseline.image_s), "study": _summary(baseline.study_s)},
        "under_load": {"image": _summary(tally.image_s), "study": _summary(tally.study_s)},
        "rss_mb": {
            "start": round(rss[0][1], 1), "end": round(rss[-1][1], 1),
            "max": round(max(v for _, v in rss), 1),
            "growth_after_warmup": round(growth, 1),
            "slope_second_half_mb_per_min": _slope(second_half),
            "samples": [(round(t, 1), round(v, 1)) for t, v in rss],
        },
    }


def markdown_section(result: dict[str, Any]) -> str:
    """The load part of the Reliability section of docs/BENCHMARKS.md."""
    s, single, load, rss = result["setup"], result["single_study"], result["under_load"], result["rss_mb"]
    return (
        f"`triage-node bench load --associations {s['associations']} --minutes {s['minutes']:g}` on "
        f"{result['date']} ({result['machine']['cpus']} CPUs, load average "
        f"{result['machine']['load_average'][0]}): {s['slices_per_study']} slices of {s['matrix']} per "
        f"study, one association per study, {s['node']}.\n\n"
        "| | studies | images | C-STORE p50 / p95 (ms) | study p50 / p95 (s) |\n"
        "| --- | ---: | ---: | ---: | ---: |\n"
        f"| one study at a time | {single['study']['n']} | {single['image']['n']} | "
        f"{single['image']['p50_ms']} / {single['image']['p95_ms']} | "
        f"{single['study']['p50_ms'] / 1000:.2f} / {single['study']['p95_ms'] / 1000:.2f} |\n"
        f"| {s['associations']} associations | {load['study']['n']} | {load['image']['n']} | "
        f"{load['image']['p50_ms']} / {load['image']['p95_ms']} | "
        f"{load['study']['p50_ms'] / 1000:.2f} / {load['study']['p95_ms'] / 1000:.2f} |\n\n"
        f"Statuses: {result['statuses']} (failures: {len(result['failures'])}); "
        f"{result['images_per_s']} images/s in all. Node RSS {rss['start']} -> {rss['end']} MB "
        f"(max {rss['max']}; growth after the first fifth {rss['growth_after_warmup']} MB; slope over the "
        f"second half {rss['slope_second_half_mb_per_min']} MB/min). Raw numbers: `docs/bench/load.json`.\n"
    )
