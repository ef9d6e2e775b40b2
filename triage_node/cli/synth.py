"""``triage-node synth``: write synthetic head-CT studies as DICOM with labels."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from triage_node import SUBTYPES
from triage_node.cli.app import app

_SYNTAXES = ("explicit", "implicit", "jpeg-lossless", "jpeg2000-lossless", "rle", "mixed")


@app.command()
def synth(
    out: Path = typer.Option(..., "--out", help="Output directory (created)."),
    studies: int = typer.Option(4, "--studies", min=0, help="Number of studies."),
    seed: int = typer.Option(0, "--seed", help="Master seed; the output is a pure function of the options."),
    positive_fraction: float = typer.Option(
        0.5, "--positive-fraction", min=0.0, max=1.0, help="Probability that a study has haemorrhage."
    ),
    subtypes: str = typer.Option(
        ",".join(SUBTYPES), "--subtypes", help="Comma-separated subtypes allowed in positive studies."
    ),
    thin: bool = typer.Option(False, "--thin", help="Also write a thin (0.625-1.25 mm) brain series."),
    transfer_syntax: str = typer.Option(
        "explicit", "--transfer-syntax", help=f"One of {', '.join(_SYNTAXES)} (mixed: random per study)."
    ),
    profile: str = typer.Option("scanner", "--profile", help="Header profile: scanner or rsna."),
    rows: int | None = typer.Option(None, "--rows", help="Matrix size 256, 512 or 768 (default: mostly 512)."),
    preview: bool = typer.Option(False, "--preview", help="Write PNG montages (brain/subdural/bone windows)."),
    components: str = typer.Option(
        "", "--components",
        help="Comma-separated series: localizer,axial,bone,dose (default all; rsna profile: axial).",
    ),
) -> None:
    """Write synthetic head-CT studies: DIR/<study>/<series>/<sop>.dcm, labels.csv, studies.json."""
    from triage_node.synth import COMPONENTS, write_dataset  # heavy imports only for this command

    chosen = tuple(s.strip() for s in subtypes.split(",") if s.strip())
    bad = [s for s in chosen if s not in SUBTYPES]
    if bad or not chosen:
        raise typer.BadParameter(f"subtypes must be drawn from {', '.join(SUBTYPES)}", param_hint="--subtypes")
    if transfer_syntax not in _SYNTAXES:
        raise typer.BadParameter(f"must be one of {', '.join(_SYNTAXES)}", param_hint="--transfer-syntax")
    if profile not in ("scanner", "rsna"):
        raise typer.BadParameter("must be scanner or rsna", param_hint="--profile")
    if rows is not None and rows not in (256, 512, 768):
        raise typer.BadParameter("must be 256, 512 or 768", param_hint="--rows")
    if components:
        comps = tuple(c.strip() for c in components.split(",") if c.strip())
        if any(c not in COMPONENTS for c in comps):
            raise typer.BadParameter(f"must be drawn from {', '.join(COMPONENTS)}", param_hint="--components")
    else:
        comps = ("axial",) if profile == "rsna" else COMPONENTS
    start = time.perf_counter()
    truths = write_dataset(
        out, studies, seed, positive_fraction=positive_fraction, subtypes=chosen, thin=thin,
        transfer_syntax=transfer_syntax, profile=profile, rows=rows, preview=preview, components=comps,
    )
    seconds = time.perf_counter() - start
    files = sum(s.n_instances for t in truths for s in t.series)
    positive = sum(t.positive for t in truths)
    rate = len(truths) / seconds if seconds > 0 else float("inf")
    typer.echo(
        f"wrote {len(truths)} studies ({positive} positive), {files} DICOM files to {out} "
        f"in {seconds:.1f} s ({rate:.2f} studies/s)"
    )
