"""The ingest benchmark runs end to end against real receivers and edits only its own section."""

from __future__ import annotations

from pathlib import Path

from triage_node.bench.benchmarks_md import update_benchmarks_md
from triage_node.bench.ingest import (
    FLOOR,
    LISTENER,
    MINIMAL,
    NODE,
    NODE_NO_NODELAY,
    ORTHANC,
    STORESCP,
    run_ingest_benchmark,
)
from triage_node.bench.ingest_report import markdown_table


def test_small_ingest_benchmark_against_real_receivers() -> None:
    result = run_ingest_benchmark(images=10, rounds=1, size=64)
    assert set(result["results"]) == {NODE, NODE_NO_NODELAY, LISTENER, FLOOR, MINIMAL, STORESCP, ORTHANC}
    for row in result["results"].values():
        assert row["images_per_s"] > 0 and len(row["rounds_images_per_s"]) == 1
    assert result["results"][NODE]["fsync_before_response"] is True
    assert result["results"][STORESCP]["fsync_before_response"] is False
    assert result["results"][LISTENER]["fsync_before_response"] is False
    assert result["results"][FLOOR]["fsync_before_response"] is True
    assert result["ratios"]["node_vs_durable_floor"] > 0
    assert result["results"][NODE]["cpu_ms_per_image"] > 0  # this process
    assert result["results"][STORESCP]["cpu_ms_per_image"] >= 0  # storescp's, from /proc
    assert result["ratios"]["listener_vs_pynetdicom"] > 0
    [same_round] = result["ratios"]["node_vs_storescp_per_round"]
    assert same_round == result["ratios"]["node_vs_storescp_median_of_rounds"] > 0
    section = markdown_table(result)
    assert section.startswith("## Ingest\n") and "| DCMTK storescp | no |" in section


def test_update_replaces_only_the_ingest_section(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n## Ingest\n\nold numbers\n\n## End to end\n\nkeep me\n")
    update_benchmarks_md("## Ingest\n\nnew numbers\n", path)
    text = path.read_text()
    assert "new numbers" in text and "old numbers" not in text
    assert text.index("## Ingest") < text.index("## End to end") and "keep me" in text
    other = tmp_path / "other.md"
    other.write_text("# Benchmarks\n\n## Load\n\nx\n")
    update_benchmarks_md("## Ingest\n\ny\n", other)
    assert other.read_text().endswith("## Ingest\n\ny\n") and "## Load" in other.read_text()
