"""`bench e2e` end to end on a small run: real node, worker and PACS; figures are recorded."""

from __future__ import annotations

from worker.bench_e2e import markdown_section, run_e2e_benchmark


def test_small_e2e_benchmark_records_latencies_stages_and_enqueue_figure():
    result = run_e2e_benchmark(together=1, repeats=1, backends=("onnx",))
    onnx = result["backends"]["onnx"]
    assert onnx["failed_jobs"] == 0, onnx["errors"]
    assert onnx["single"]["n"] == 1 and onnx["single"]["p95_s"] > 0
    assert onnx["together"]["n"] == 1
    # warm-up + single + together: every job's last-instance -> queue figure is there
    assert onnx["last_instance_to_enqueue"]["n"] == 3
    assert all(v >= 0 for v in onnx["last_instance_to_enqueue"]["latencies_s"])
    assert set(result["targets"]) >= {"single_p95_s", "enqueue_p95_s"}
    section = markdown_section(result)
    assert "| onnx |" in section and "Last instance received -> job on the queue" in section
