"""``triage-node bench e2e --workers``: throughput with 1, 2, ... workers on one node.

Kept apart from ``worker.bench_e2e``, which measures latency per inference backend:
this measures how studies per minute grow with the number of ``triage-node worker``
processes sharing one node's broker and database, on the same `worker.bench_site.BenchSite`.
"""

from __future__ import annotations

import os
import platform
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from triage_node.config import REPO_ROOT, load_settings
from triage_node.timeutil import utcnow
from worker.bench_site import BenchSite, make_studies

__all__ = ["SCALE_JSON_PATH", "run_scale_benchmark"]

SCALE_JSON_PATH = REPO_ROOT / "docs" / "bench" / "scale.json"


def run_scale_benchmark(
    *,
    workers: tuple[int, ...] = (1, 2),
    studies: int = 6,
    backend: str = "onnx",
    progress: Callable[[str], None] | None = None,
    triton_url: str | None = None,
) -> dict[str, Any]:
    """Throughput with 1, 2, ... ``triage-node worker`` processes on one node.

    For each worker count a fresh site runs (node, ``n`` workers sharing its broker and
    database), one warm-up study per worker is processed, then ``studies`` studies are
    sent at once; throughput = studies done / (last SR accepted - first send).
    """
    from worker.inference.triton_server import TritonServer

    settings = load_settings()
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="triage-bench-scale-") as tmp:
        needed = max(workers) + studies
        all_studies, slices = make_studies(Path(tmp), needed)
        for n in workers:
            local = backend == "triton" and not triton_url
            triton = TritonServer(settings.model_repository).start() if local else None
            site = BenchSite(backend, settings.model_repository, settings.model_card,
                         triton.grpc_url if triton else triton_url, workers=n)
            try:
                site.start()
                warm = all_studies[:n]
                for _, files in warm:
                    site.send(files)
                site.wait_sr([uid for uid, _ in warm], timeout=240)
                batch = all_studies[max(workers): max(workers) + studies]
                t0 = utcnow()
                threads = [threading.Thread(target=site.send, args=(files,)) for _, files in batch]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                accepted, failed = site.wait_sr([uid for uid, _ in batch], timeout=120 + 60 * studies)
                wall = (max(accepted.values()) - t0).total_seconds() if accepted else float("nan")
                rows[str(n)] = {
                    "workers": n, "studies": len(batch), "done": len(accepted), "failed_jobs": len(failed),
                    "wall_s": round(wall, 3), "studies_per_min": round(60.0 * len(accepted) / wall, 2),
                    "stages_median_s": site.stages(),
                }
                if progress:
                    progress(f"{n} worker(s): {len(accepted)} studies in {wall:.1f} s "
                             f"= {rows[str(n)]['studies_per_min']} studies/min")
            finally:
                site.stop()
                if triton is not None:
                    triton.stop()
    base = rows[str(workers[0])]["studies_per_min"]
    return {
        "when_utc": utcnow().isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "backend": backend,
        "study": {"rows": 512, "slices": slices, "series": "axial only"},
        "broker": "filesystem (embedded)",
        "runs": rows,
        "speedup": {k: round(v["studies_per_min"] / base, 3) for k, v in rows.items()},
    }
