"""``triage-node bench load`` in a short form: concurrent associations to a real
``triage-node serve``, no failure status, latency and RSS figures present."""

from __future__ import annotations

import subprocess

from tests.node_process import TRIAGE_NODE
from triage_node.bench.load import markdown_section, run_load_benchmark


def test_concurrent_associations_get_no_failure_and_report_latency_and_rss() -> None:
    result = run_load_benchmark(associations=3, minutes=0.15, slices=8, size=128, baseline_studies=2)
    assert result["ok"] and result["node_alive"] and result["failures"] == []
    assert set(result["statuses"]) == {"0x0000"}
    assert result["images"] == 8 * result["studies"] and result["studies"] >= 3
    for phase in ("single_study", "under_load"):
        assert result[phase]["image"]["p95_ms"] >= result[phase]["image"]["p50_ms"] > 0
    rss = result["rss_mb"]
    assert len(rss["samples"]) >= 5 and rss["start"] > 20
    assert "3 associations" in markdown_section(result)


def test_bench_load_command_is_bounded() -> None:
    too_many = subprocess.run([TRIAGE_NODE, "bench", "load", "--associations", "64", "--no-write"],
                              capture_output=True, text=True, timeout=60)
    assert too_many.returncode == 2 and "associations" in too_many.stderr.lower()
    help_text = subprocess.run([TRIAGE_NODE, "bench", "load", "--help"], capture_output=True, text=True,
                               timeout=60).stdout
    assert "--minutes" in help_text and "--json" in help_text
