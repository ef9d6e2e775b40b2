"""``triage-node explain``: per-slice heat maps of a labelled data set and the pointing game (:mod:`worker.model.explain_run`)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from triage_node import CLASSES


def _classes(text: str) -> tuple[str, ...]:
    names = tuple(c.strip() for c in text.split(",") if c.strip())
    unknown = [c for c in names if c not in CLASSES]
    if unknown or not names:
        raise typer.BadParameter(f"unknown classes {unknown}; choose from {', '.join(CLASSES)}", param_hint="--classes")
    return tuple(c for c in CLASSES if c in names)


def explain(
    model: Path = typer.Option(..., "--model", help="Model repository with model_card.json (e.g. deploy/triton)."),
    data: Path = typer.Option(..., "--data", help="Labelled data set."),
    fmt: str = typer.Option("synth", "--format", help="Dataset format: synth | rsna | physionet-ich."),
    out: Path = typer.Option(..., "--out", help="Output folder: <SOPInstanceUID>.npz, png/, index.csv, pointing_game.json."),
    labels_csv: Path = typer.Option(None, "--labels-csv", help="Label CSV if not the format's default."),
    threads: int = typer.Option(2, "--threads", min=1, help="ONNX Runtime threads."),
    png: bool = typer.Option(True, "--png/--no-png", help="Draw overlay PNGs (the npz files are always written)."),
    classes: str = typer.Option("any", "--classes", help="Classes drawn as PNG, comma-separated; every npz holds all six maps."),
    method: str = typer.Option("cam", "--method", help="Heat map: cam | campp (Grad-CAM++)."),
    masks: Path = typer.Option(None, "--masks", help="Folder of <SOPInstanceUID>.png bleed masks (non-zero = bleed) for the pointing game."),
    tolerance: int = typer.Option(0, "--tolerance", min=0, help="Pointing game: a hit also within this many pixels of the mask."),
    anywhere: bool = typer.Option(False, "--anywhere", help="Keep the maps' heat on air, bone and scalp too (by default only soft tissue inside the skull keeps it, as in the worker's overlays)."),
) -> None:
    """Heat maps of every slice of a labelled data set, overlays a site can audit, and the pointing game where bleed masks exist."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from worker.model.data import FORMATS
    from worker.model.explain_run import POINTING_FILE, explain_dataset
    from worker.pipeline.explain import METHODS

    if fmt not in FORMATS:
        raise typer.BadParameter(f"choose from {', '.join(FORMATS)}", param_hint="--format")
    if method not in METHODS:
        raise typer.BadParameter(f"choose from {', '.join(METHODS)}", param_hint="--method")
    png_classes = _classes(classes)
    try:
        with Progress(TextColumn("series"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as bar:
            task = bar.add_task("series", total=None)
            summary = explain_dataset(model, data, fmt, out, labels_csv=labels_csv, threads=threads, png=png,
                                      png_classes=png_classes, method=method, masks_dir=masks, tolerance=tolerance, anywhere=anywhere,
                                      progress=lambda d, t: bar.update(task, completed=d, total=t))
    except (ValueError, FileNotFoundError) as exc:
        typer.echo(f"explain failed: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{summary.slices} slices of {summary.series} series written to {summary.out}"
               + (f" ({summary.failed_series} series could not be read)" if summary.failed_series else ""))
    typer.echo(summary.pointing.describe())
    typer.echo(json.dumps(summary.pointing.to_json()))
    typer.echo(f"wrote {summary.out / POINTING_FILE}")


def register(app: typer.Typer) -> None:
    app.command("explain")(explain)
