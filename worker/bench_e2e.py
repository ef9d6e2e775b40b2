"""``triage-node bench e2e``: from the last image acknowledged to the SR accepted by the PACS.

For each inference backend (ONNX Runtime in the worker, Triton over gRPC) a fresh node
(``triage-node serve``), a real Celery worker (``triage-node worker``, embedded
filesystem broker) and a local PACS (pynetdicom Storage SCP in this process) run on
this machine. Synthetic 512x512 head CTs (one axial series each) are sent by C-STORE,
one association per study, as a scanner sends them:

- ``single``: one study at a time, ``repeats`` times (the latency a radiologist sees);
- ``together``: ``studies`` studies sent at once (latency under load, throughput).

Latency of a study = the time the PACS accepted its SR (C-STORE response sent by the
PACS) minus the time the sender got the response to the study's last image. A warm-up
study per backend is not counted (model loading, first-inference allocations).
Also measured: ms per slice of the slice CNN, PyTorch eager vs ONNX Runtime (batch 8).
The node, worker and PACS of one run are a `worker.bench_site.BenchSite`; throughput per
number of workers (``--workers``) is `worker.bench_scale`.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from triage_node.bench.benchmarks_md import update_benchmarks_md
from triage_node.config import REPO_ROOT, load_settings
from triage_node.logs import get_logger
from triage_node.timeutil import utcnow
from worker.bench_scale import SCALE_JSON_PATH, run_scale_benchmark
from worker.bench_site import BenchSite, make_studies

log = get_logger(__name__)

JSON_PATH = REPO_ROOT / "docs" / "bench" / "e2e.json"
SECTION = "## End to end"
TARGET_P95_S = 10.0
TARGET_TRITON_RATIO = 1.25
TARGET_ENQUEUE_S = 1.0

Progress = Callable[[str], None] | None


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), ``q`` in 0..100."""
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else float("nan")


def _summary(latencies: list[float]) -> dict[str, Any]:
    return {
        "n": len(latencies),
        "latencies_s": [round(v, 3) for v in latencies],
        "p50_s": round(percentile(latencies, 50), 3),
        "p95_s": round(percentile(latencies, 95), 3),
        "max_s": round(max(latencies), 3) if latencies else None,
    }


def _bench_backend(backend: str, studies: list[tuple[str, list[Path]]], repeats: int, together: int,
                   model_repository: Path, model_card: Path, progress: Progress,
                   triton_url: str | None = None) -> dict[str, Any]:
    from worker.inference.triton_server import TritonServer

    # An external server (the official image on a GPU) when ``triton_url`` is given,
    # else the local wheel's server on CPU.
    local = backend == "triton" and not triton_url
    triton = TritonServer(model_repository).start() if local else None
    site = BenchSite(backend, model_repository, model_card, triton.grpc_url if triton else triton_url)
    try:
        site.start()
        errors: dict[str, str] = {}
        warm_uid, warm_files = studies[0]
        site.send(warm_files)
        errors.update(site.wait_sr([warm_uid], timeout=180)[1])
        single = []
        for uid, files in studies[1 : 1 + repeats]:
            acked = site.send(files)
            accepted, failed = site.wait_sr([uid], timeout=120)
            errors.update(failed)
            if uid in accepted:
                single.append((accepted[uid] - acked).total_seconds())
                if progress:
                    progress(f"{backend}: single study {single[-1]:.2f} s")
            elif progress:
                progress(f"{backend}: single study FAILED: {failed[uid]}")
        batch = studies[1 + repeats : 1 + repeats + together]
        acked_at: dict[str, datetime] = {}
        lock = threading.Lock()

        def send(uid: str, files: list[Path]) -> None:
            at = site.send(files)
            with lock:
                acked_at[uid] = at

        t0 = utcnow()
        threads = [threading.Thread(target=send, args=item) for item in batch]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        accepted, failed = site.wait_sr([uid for uid, _ in batch], timeout=60 + 30 * len(batch))
        errors.update(failed)
        lat = [(accepted[uid] - acked_at[uid]).total_seconds() for uid, _ in batch if uid in accepted]
        wall = (max(accepted.values()) - t0).total_seconds() if accepted else float("nan")
        if progress:
            progress(f"{backend}: {len(batch)} studies together, p95 {percentile(lat, 95):.2f} s")
        return {
            "single": _summary(single),
            "together": {**_summary(lat), "studies": len(batch), "wall_s": round(wall, 3),
                         "studies_per_min": round(60.0 * len(lat) / wall, 2)},
            "stages_median_s": site.stages(),
            "last_instance_to_enqueue": _summary(site.enqueue_latencies()),
            "failed_jobs": len(errors),
            "errors": sorted(set(errors.values())),
        }
    finally:
        site.stop()
        if triton is not None:
            triton.stop()


def ms_per_slice(card: Any, model_repository: Path, batch: int = 8, threads: int = 2, rounds: int = 15) -> dict[str, Any]:
    """Slice CNN ms per slice, PyTorch eager vs ONNX Runtime, same architecture and input size.

    The PyTorch network is the card's backbone freshly built (timing does not depend on
    the weights); ONNX Runtime runs the served file. Median over ``rounds`` batches after
    one warm-up batch, so that a burst of other work on the machine does not decide it.
    """

    def median_ms(fn: Callable[[], object]) -> float:
        fn()
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times) / batch * 1000
    import torch

    from worker.inference.onnx_backend import OnnxBackend
    from worker.model.networks import SliceCNN

    torch.set_num_threads(threads)
    x = np.random.default_rng(0).random((batch, 3, card.input_size, card.input_size), dtype=np.float32)
    net = SliceCNN(card.backbone).eval()
    with torch.inference_mode():
        xt = torch.from_numpy(x)
        eager = median_ms(lambda: net(xt))
    backend = OnnxBackend(model_repository, threads=threads)
    ort = median_ms(lambda: backend.slice_fn(x))
    backend.close()
    return {"pytorch_eager_ms": round(eager, 2), "onnxruntime_ms": round(ort, 2), "batch": batch,
            "threads": threads, "input_size": card.input_size, "backbone": card.backbone,
            "speedup": round(eager / ort, 2)}


def run_e2e_benchmark(
    *,
    together: int = 4,
    repeats: int = 5,
    backends: tuple[str, ...] = ("onnx", "triton"),
    model_repository: Path | None = None,
    model_card: Path | None = None,
    progress: Progress = None,
    triton_url: str | None = None,
) -> dict[str, Any]:
    """Run the benchmark; returns the result as a JSON-ready dict.

    ``triton_url`` (gRPC ``host:port``): measure the ``triton`` backend against that server
    (e.g. the official image serving ``deploy/triton/models-gpu``) instead of a local one.
    """
    from worker.inference.card import load_model_card

    settings = load_settings(model_repository=model_repository, model_card=model_card)
    card = load_model_card(settings.model_card)
    with tempfile.TemporaryDirectory(prefix="triage-bench-studies-") as tmp:
        studies, slices = make_studies(Path(tmp), 1 + repeats + together)
        if progress:
            progress(f"{len(studies)} studies of {slices} slices written")
        results = {
            b: _bench_backend(b, studies, repeats, together, settings.model_repository, settings.model_card, progress,
                              triton_url)
            for b in backends
        }
    out: dict[str, Any] = {
        "when_utc": utcnow().isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "model": {"name": card.name, "version": card.version, "backbone": card.backbone,
                  "input_size": card.input_size},
        "study": {"rows": 512, "slices": slices, "series": "axial only"},
        "broker": "filesystem (embedded)",
        "sender": "DCMTK storescu" if shutil.which("storescu") else "pynetdicom",
        "backends": results,
        "ms_per_slice": ms_per_slice(card, settings.model_repository),
    }
    targets: dict[str, Any] = {}
    if "onnx" in results:
        targets["single_p95_s"] = results["onnx"]["single"]["p95_s"]
        targets["single_p95_le_10s"] = results["onnx"]["single"]["p95_s"] <= TARGET_P95_S
    enqueue = [v for r in results.values() for v in r["last_instance_to_enqueue"]["latencies_s"]]
    if enqueue:
        targets["enqueue_p95_s"] = round(percentile(enqueue, 95), 3)
        targets["enqueue_p95_le_1s"] = targets["enqueue_p95_s"] <= TARGET_ENQUEUE_S
    if "onnx" in results and "triton" in results:
        ratio = results["triton"]["single"]["p50_s"] / results["onnx"]["single"]["p50_s"]
        targets["triton_over_onnx_p50"] = round(ratio, 3)
        targets["triton_le_1_25x"] = ratio <= TARGET_TRITON_RATIO
    out["targets"] = targets
    return out


def markdown_section(result: dict[str, Any]) -> str:
    """The ``## End to end`` section of ``docs/BENCHMARKS.md``."""
    m, s, t = result["model"], result["study"], result["targets"]
    lines = [
        SECTION,
        "",
        "`triage-node bench e2e`: latency from the last image acknowledged by the node to the SR accepted by a "
        "local PACS (pynetdicom Storage SCP), real `triage-node serve` + `triage-node worker` processes on the "
        f"{result['broker']} broker. Study: one axial series of {s['slices']} slices, {s['rows']}x{s['rows']}. "
        f"Model: {m['name']} {m['version']} ({m['backbone']}, {m['input_size']} px). "
        f"Machine: {result['machine']['cpus']} CPUs, {result['machine']['platform']}; {result['when_utc']}.",
        "",
        "| backend | single p50 s | single p95 s | together (n) | together p50 s | together p95 s | studies/min |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in result["backends"].items():
        sg, tg = r["single"], r["together"]
        lines.append(f"| {name} | {sg['p50_s']:.2f} | {sg['p95_s']:.2f} | {tg['studies']} | {tg['p50_s']:.2f} | "
                     f"{tg['p95_s']:.2f} | {tg['studies_per_min']:.1f} |")
    lines += ["", "Median seconds per stage (all counted jobs):", "",
              "| backend | " + " | ".join(next(iter(result["backends"].values()))["stages_median_s"]) + " |",
              "| --- |" + " ---: |" * len(next(iter(result["backends"].values()))["stages_median_s"])]
    for name, r in result["backends"].items():
        lines.append(f"| {name} | " + " | ".join("-" if v is None else f"{v:.2f}"
                                                   for v in r["stages_median_s"].values()) + " |")
    for name, r in result["backends"].items():
        if r.get("failed_jobs"):
            lines += ["", f"{name}: {r['failed_jobs']} job(s) failed and are not in the latencies: "
                          + "; ".join(r["errors"])]
    ms = result["ms_per_slice"]
    lines += [
        "",
        f"Slice CNN, ms per slice (batch {ms['batch']}, {ms['threads']} threads, {ms['input_size']} px): "
        f"PyTorch eager {ms['pytorch_eager_ms']}, ONNX Runtime {ms['onnxruntime_ms']} (x{ms['speedup']}).",
        "",
        (f"Last instance received -> job on the queue (completeness, selection, job row, send), "
         f"p95 over all jobs: {t['enqueue_p95_s']} s (target <= {TARGET_ENQUEUE_S:.0f} s: "
         f"{'met' if t['enqueue_p95_le_1s'] else 'NOT met'})." if "enqueue_p95_s" in t else ""),
        "",
        f"Targets: single-study p95 <= {TARGET_P95_S:.0f} s: "
        f"{'met' if t.get('single_p95_le_10s') else 'NOT met'} ({t.get('single_p95_s')} s); "
        + (f"Triton <= {TARGET_TRITON_RATIO}x in-process (p50): "
           f"{'met' if t.get('triton_le_1_25x') else 'NOT met'} (x{t.get('triton_over_onnx_p50')})."
           if "triton_over_onnx_p50" in t else ""),
        "",
    ]
    return "\n".join(lines)


def register(bench_app: Any) -> None:
    """Add ``e2e`` to the ``triage-node bench`` group."""
    import typer

    @bench_app.command("e2e")
    def bench_e2e(
        as_json: bool = typer.Option(False, "--json", help="Print the JSON result."),
        together: int = typer.Option(4, "--studies", min=1, max=32, help="Studies sent together."),
        repeats: int = typer.Option(5, "--repeats", min=1, max=50, help="Single-study rounds."),
        backends: str = typer.Option("onnx,triton", "--backends", help="Comma-separated: onnx, triton."),
        write: bool = typer.Option(True, "--write/--no-write",
                                   help="Write docs/bench/e2e.json and the section of docs/BENCHMARKS.md."),
        workers: str = typer.Option("", "--workers",
                                    help="Comma-separated worker counts, e.g. 1,2: measure throughput per "
                                         "count instead (first backend, --studies sent together; "
                                         "writes docs/bench/scale.json)."),
        triton_url: str = typer.Option("", "--triton-url",
                                       help="gRPC host:port of a running Triton (e.g. on a GPU) for the "
                                            "triton backend; default: start the local wheel's server (CPU)."),
    ) -> None:
        """Last image acknowledged -> SR accepted by the PACS, ONNX Runtime and Triton side by side."""
        import signal
        import sys

        from triage_node.logs import configure_logging
        from worker.model.cli import require_training_packages

        require_training_packages()  # the PyTorch column of ms/slice needs the [train] extra
        # SIGTERM unwinds like Ctrl-C, so the node, worker and Triton are stopped.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        configure_logging("WARNING")
        names = tuple(b.strip() for b in backends.split(",") if b.strip())
        bad = [b for b in names if b not in ("onnx", "triton")]
        if bad or not names:
            typer.echo(f"--backends: unknown {bad or names}", err=True)
            raise typer.Exit(2)
        progress = None if as_json else (lambda msg: typer.echo(msg, err=True))
        if workers:
            counts = tuple(int(w) for w in workers.split(",") if w.strip())
            if not counts or min(counts) < 1:
                typer.echo(f"--workers: {workers!r} is not a list of counts >= 1", err=True)
                raise typer.Exit(2)
            scale = run_scale_benchmark(workers=counts, studies=together, backend=names[0], progress=progress,
                                        triton_url=triton_url or None)
            if write:
                SCALE_JSON_PATH.parent.mkdir(parents=True, exist_ok=True)
                SCALE_JSON_PATH.write_text(json.dumps(scale, indent=2) + "\n")
            typer.echo(json.dumps(scale, indent=2))
            return
        result = run_e2e_benchmark(together=together, repeats=repeats, backends=names, progress=progress,
                                   triton_url=triton_url or None)
        if write:
            JSON_PATH.parent.mkdir(parents=True, exist_ok=True)
            JSON_PATH.write_text(json.dumps(result, indent=2) + "\n")
            update_benchmarks_md(markdown_section(result))
        if as_json:
            typer.echo(json.dumps(result, indent=2))
        else:
            typer.echo(markdown_section(result))
