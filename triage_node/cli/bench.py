"""``triage-node bench``: benchmarks against real peers.

Other parts add their commands to `bench_app` (``e2e``, ``load``) from their own
modules with ``@bench_app.command(...)``.
"""

from __future__ import annotations

import json

import typer

from triage_node.cli.app import app

bench_app = typer.Typer(help="Benchmarks against real peers.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("ingest")
def bench_ingest(
    as_json: bool = typer.Option(False, "--json", help="Print the JSON result."),
    images: int = typer.Option(200, "--images", min=10, help="Slices per round."),
    rounds: int = typer.Option(9, "--rounds", min=1, help="Rounds per receiver (median reported)."),
    write: bool = typer.Option(
        True, "--write/--no-write",
        help="Write docs/bench/ingest.json and the Ingest section of docs/BENCHMARKS.md.",
    ),
) -> None:
    """Send the same 512x512 slices with storescu to this SCP, DCMTK storescp and Orthanc."""
    from triage_node.bench.benchmarks_md import update_benchmarks_md
    from triage_node.bench.ingest import JSON_PATH, run_ingest_benchmark
    from triage_node.bench.ingest_report import markdown_table
    from triage_node.logs import configure_logging

    configure_logging("WARNING")
    progress = None if as_json else (lambda msg: typer.echo(msg, err=True))
    result = run_ingest_benchmark(images=images, rounds=rounds, progress=progress)
    if write:
        JSON_PATH.parent.mkdir(parents=True, exist_ok=True)
        JSON_PATH.write_text(json.dumps(result, indent=2) + "\n")
        update_benchmarks_md(markdown_table(result))
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    for name, row in result["results"].items():
        typer.echo(f"{name:<32} {row['images_per_s']:8.1f} images/s")
    ratios = result["ratios"]
    typer.echo(
        f"node/Orthanc {ratios['node_vs_orthanc']:.2f}  node/storescp {ratios['node_vs_storescp']:.2f}"
        f" (same-round median {ratios['node_vs_storescp_median_of_rounds']:.2f})"
        f"  TCP_NODELAY x{ratios['nodelay_speedup']:.2f}"
    )


@bench_app.command("load")
def bench_load(
    associations: int = typer.Option(8, "--associations", "-k", min=1, max=32,
                                     help="Concurrent associations (loopback only)."),
    minutes: float = typer.Option(1.0, "--minutes", "-m", min=0.05, max=30.0, help="Duration of the load."),
    slices: int = typer.Option(24, "--slices", min=1, help="Slices per study."),
    size: int = typer.Option(256, "--size", help="Slice matrix (size x size)."),
    as_json: bool = typer.Option(False, "--json", help="Print the JSON result."),
    write: bool = typer.Option(True, "--write/--no-write", help="Write docs/bench/load.json."),
) -> None:
    """K concurrent associations sending studies to a `triage-node serve` for M minutes:
    statuses, C-STORE and study latency (p50/p95) next to one study alone, node RSS."""
    from triage_node.bench.load import JSON_PATH, markdown_section, run_load_benchmark
    from triage_node.logs import configure_logging

    configure_logging("WARNING")
    progress = None if as_json else (lambda msg: typer.echo(msg, err=True))
    result = run_load_benchmark(associations=associations, minutes=minutes, slices=slices, size=size,
                                progress=progress)
    if write:
        JSON_PATH.parent.mkdir(parents=True, exist_ok=True)
        JSON_PATH.write_text(json.dumps(result, indent=2) + "\n")
    typer.echo(json.dumps(result, indent=2) if as_json else markdown_section(result))
    if not result["ok"]:
        raise typer.Exit(1)


@bench_app.command("hostile")
def bench_hostile(
    per_kind: int = typer.Option(40, "--per-kind", min=1, max=100,
                                 help="Hostile connections of each kind (idle, trickle, empty PDVs, "
                                 "command set, deflate bomb)."),
    sources: int = typer.Option(1, "--sources", min=1, max=50,
                                help="Loopback addresses the hostile connections come from."),
    slices: int = typer.Option(24, "--slices", min=1, help="Slices of the normal study."),
    size: int = typer.Option(256, "--size", help="Slice matrix (size x size)."),
    max_associations: int | None = typer.Option(
        None, "--max-associations", min=1,
        help="Both connection caps (in all, per source) instead of the defaults; above the "
        "hostile count, every hostile connection gets in."),
    write: bool = typer.Option(True, "--write/--no-write",
                               help="Write docs/bench/hostile.json (runs with default caps only)."),
) -> None:
    """Hostile connections of five kinds hold the DICOM port of a `triage-node serve` while a
    study is sent and a worker triages it: the node's peak RSS, whether the study was
    acknowledged and triaged, and whether anything acknowledged was lost (JSON)."""
    from triage_node.bench.hostile import JSON_PATH, run_hostile_benchmark
    from triage_node.logs import configure_logging

    configure_logging("WARNING")
    result = run_hostile_benchmark(per_kind=per_kind, sources=sources, slices=slices, size=size,
                                   max_associations=max_associations, progress=lambda msg: typer.echo(msg, err=True))
    if write and max_associations is None:
        JSON_PATH.parent.mkdir(parents=True, exist_ok=True)
        JSON_PATH.write_text(json.dumps(result, indent=2) + "\n")
    typer.echo(json.dumps(result, indent=2))
    if not result["ok"]:
        raise typer.Exit(1)
