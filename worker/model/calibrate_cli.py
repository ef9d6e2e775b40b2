"""``triage-node calibrate``: the site's own thresholds from a labelled sample of its studies."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from triage_node import CLASSES
from triage_node.cli.common import database_or_exit
from triage_node.db import audit
from triage_node.db.session import transaction
from triage_node.logs import get_logger

if TYPE_CHECKING:
    from worker.inference.site import SiteThresholds

log = get_logger(__name__)
ACTOR = "cli"


def _card_identity(model: Path) -> dict:
    """Device UID and version straight from the card file, for the audit row of a refusal
    that came before (or from) loading the card."""
    try:
        data = json.loads((model / "model_card.json").read_text())
        return {"device_uid": data.get("device_uid"), "model_version": data.get("version")}
    except (OSError, ValueError, AttributeError):
        return {"device_uid": None, "model_version": None}


def _previous_digest(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("digest")
    except (OSError, ValueError, AttributeError):
        return None


def _ci(value: float | None, ci: tuple) -> str:
    if value is None:
        return "-"
    return f"{value:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def _print_table(site: SiteThresholds) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("operating point", "class", "threshold", "from", "sensitivity [95% CI]", "specificity [95% CI]", "n+ / n-",
                  title=f"site thresholds {site.digest}: model {site.model_version}, {site.sample.n_studies} studies")
    for op, per_class in site.results.items():
        for c in CLASSES:
            r = per_class[c]
            table.add_row(op, c, f"{r.threshold:.4f}", r.source, _ci(r.sensitivity, r.sensitivity_ci95),
                          _ci(r.specificity, r.specificity_ci95), f"{r.n_pos} / {r.n_neg}")
    Console(width=160).print(table)


def calibrate(
    model: Path = typer.Option(..., "--model", help="Model repository with model_card.json (e.g. deploy/triton)."),
    data: Path = typer.Option(..., "--data", help="Labelled sample of this site's studies."),
    fmt: str = typer.Option("synth", "--format", help="Dataset format, as `evaluate` reads it: synth | rsna | ..."),
    labels_csv: Path = typer.Option(None, "--labels-csv", help="Label CSV if not the format's default."),
    target_sensitivity: float = typer.Option(0.90, "--target-sensitivity", help="Sensitivity the high_sensitivity point must reach on the sample."),
    min_positives: int = typer.Option(None, "--min-positives", min=1, help="Positive studies needed per class (default 1/(1 - target): 10 for 0.90)."),
    min_negatives: int = typer.Option(10, "--min-negatives", min=1, help="Negative studies needed per class."),
    out: Path = typer.Option(None, "--out", help="Write the site file here instead of beside model_card.json (serving reads it only there)."),
    threads: int = typer.Option(2, "--threads", help="ONNX Runtime threads."),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="Data directory whose database gets the audit row (overrides TRIAGE_DATA_DIR)."),
) -> None:
    """Choose this site's thresholds on its own labelled studies; weights and model card stay as shipped."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from worker.inference.site import SITE_FILE
    from worker.model.calibrate import CalibrationRefused, site_file_path, write_site_file
    from worker.model.calibrate import calibrate as run

    # the schema is checked before minutes of inference: a refusal or a result must be audited
    settings, engine, factory = database_or_exit(data_dir)
    path = site_file_path(model, out)
    common = {"model": str(model.resolve()), "data": str(data.resolve()), "format": fmt,
              "target_sensitivity": target_sensitivity}
    try:
        try:
            with Progress(TextColumn("series"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as bar:
                task = bar.add_task("series", total=None)
                site = run(model, data, fmt, labels_csv, target_sensitivity, min_positives, min_negatives,
                           progress=lambda d, t: bar.update(task, completed=d, total=t), threads=threads)
        except (ValueError, FileNotFoundError) as exc:  # CalibrationRefused, SiteCalibrationError, bad data
            n_studies = exc.n_studies if isinstance(exc, CalibrationRefused) else None
            with transaction(factory) as session:
                audit.record(session, "model.calibration_refused", actor=ACTOR, outcome="refused",
                             reason=str(exc)[:1000], n_studies=n_studies, **_card_identity(model), **common)
            typer.echo(f"calibration refused, no site file written: {exc}", err=True)
            raise typer.Exit(1) from None
        previous = _previous_digest(path)
        write_site_file(site, path)
        with transaction(factory) as session:
            audit.record(session, "model.calibrated", actor=ACTOR, site_file=str(path.resolve()), digest=site.digest,
                         replaces=previous, device_uid=site.device_uid, model_version=site.model_version,
                         n_studies=site.sample.n_studies, kept_card_threshold=sorted(site.kept_card_threshold),
                         **common)
    finally:
        engine.dispose()
    _print_table(site)
    for c, why in site.kept_card_threshold.items():
        typer.echo(f"{c}: kept the model card's thresholds ({why})")
    typer.echo(f"wrote {path} (digest {site.digest}); the weights and model_card.json are unchanged")
    if path.resolve() != (model / SITE_FILE).resolve():
        typer.echo(f"note: serving reads {model / SITE_FILE} only; move the file there to use it")
    else:
        typer.echo("restart the workers to serve these thresholds")


def register(app: typer.Typer) -> None:
    app.command("calibrate")(calibrate)
