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
    rounds: int = typer.Option(3, "--rounds", min=1, help="Rounds per receiver (median reported)."),
    write: bool = typer.Option(
        True, "--write/--no-write",
        help="Write docs/bench/ingest.json and the Ingest section of docs/BENCHMARKS.md.",
    ),
) -> None:
    """Send the same 512x512 slices with storescu to this SCP, DCMTK storescp and Orthanc."""
    from triage_node.bench.ingest import (
        JSON_PATH,
        markdown_table,
        run_ingest_benchmark,
        update_benchmarks_md,
    )
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
        f"  TCP_NODELAY x{ratios['nodelay_speedup']:.2f}"
    )
