"""``triage-node train``, ``triage-node evaluate`` and ``triage-node export``."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import typer

from triage_node.logs import get_logger

log = get_logger(__name__)
#: What training and re-export import beyond the serving install.
TRAINING_PACKAGES = ("torch", "monai")


def require_training_packages() -> None:
    """Exit with a clear message when the [train] extra is not installed."""
    import importlib

    missing = []
    for name in TRAINING_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        typer.echo(f"this command needs {', '.join(missing)}: install the [train] extra (pip install -e '.[train]')", err=True)
        raise typer.Exit(2)


@contextmanager
def _progress():
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskID,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(), transient=False) as bar:
        tasks: dict[str, TaskID] = {}

        def update(desc: str, done: int, total: int) -> None:
            key = desc.split(" loss")[0]
            if key not in tasks:
                tasks[key] = bar.add_task(desc, total=total)
            bar.update(tasks[key], completed=done, total=total, description=desc)

        yield update


def train(
    data: Path = typer.Option(..., "--data", help="Dataset folder (synth output, or RSNA layout with stage_2_train.csv)."),
    out: Path = typer.Option(..., "--out", help="Run folder: cache, checkpoints, summary, exported Triton repository."),
    fmt: str = typer.Option("synth", "--format", help="synth | rsna | physionet-ich"),
    backbone: str = typer.Option("efficientnet-b0", help="MONAI backbone: efficientnet-lite0 (starts from ImageNet weights, needs the [train] extra), efficientnet-b0..b3, resnet-lite, resnet-ich, resnet18/34, seresnext50/101."),
    variant: str = typer.Option("windows", help="Input variant: windows | adjacent | mixed."),
    window: list[str] = typer.Option(None, "--window", help="Window names in channel order (repeat; adjacent uses the first). Default brain, subdural, bone; CT-ICH JPEGs allow only brain_wide."),
    crop: str = typer.Option("centred", help="Framing of each slice: centred (padded square) | head (the head fills the frame)."),
    synth_data: Path = typer.Option(None, help="Synthetic studies (triage-node synth output) added to every training split, never validated on."),
    synth_share: float = typer.Option(0.2, help="Share of each epoch's samples drawn from --synth-data."),
    positive_oversample: float = typer.Option(3.0, help="Sampling weight of a slice with a bleed relative to one without."),
    cv: int = typer.Option(0, "--cv", help="Patient-level k-fold cross-validation first (k >= 2); the final model then trains on every patient with the operating points the folds chose."),
    report_dir: Path = typer.Option(None, help="With --cv: write report.md, cv_report.json and the curves here (e.g. docs/model)."),
    size: int = typer.Option(256, help="Input size in pixels."),
    epochs: int = typer.Option(4, help="CNN epochs."),
    batch_size: int = typer.Option(32, help="CNN batch size."),
    lr: float = typer.Option(2e-3, help="Peak learning rate (one-cycle)."),
    seq_epochs: int = typer.Option(40, help="Sequence-model epochs."),
    seq_cell: str = typer.Option("gru", help="gru | lstm"),
    seq_out_of_fold: bool = typer.Option(False, "--seq-out-of-fold", help="With --cv: the sequence model learns from the folds' out-of-fold CNN outputs (reads only the CNN probabilities)."),
    val_fraction: float = typer.Option(0.2, help="Fraction of patients held out for validation (operating points)."),
    seed: int = typer.Option(0, help="Random seed."),
    threads: int = typer.Option(2, help="torch CPU threads."),
    device: str = typer.Option("cpu", help="cpu | cuda"),
    max_minutes: float = typer.Option(0.0, help="CNN time budget in minutes: the learning-rate schedule spans it and training stops there (0: schedule over --epochs)."),
    resume: bool = typer.Option(False, "--resume", help="Continue CNN training from OUT/cnn_last.pt."),
    labels_csv: Path = typer.Option(None, help="Label CSV if not DATA/labels.csv or DATA/stage_2_train.csv."),
    export_dir: Path = typer.Option(None, help="Write the Triton repository here instead of OUT/triton."),
    data_description: str = typer.Option("", help="Training data description for the model card."),
) -> None:
    """Train the slice CNN (stage 1) and the sequence model (stage 2), export ONNX and the model card."""
    require_training_packages()
    import shlex
    import sys
    from dataclasses import replace

    from worker.model.train import TrainConfig, fit
    from worker.pipeline.preprocess import DEFAULT_WINDOWS

    cfg = TrainConfig(
        data=str(data), out=str(out), fmt=fmt, backbone=backbone, variant=variant, size=size, epochs=epochs,
        batch_size=batch_size, lr=lr, seq_epochs=seq_epochs, seq_cell=seq_cell, seq_out_of_fold=seq_out_of_fold, val_fraction=val_fraction, seed=seed,
        threads=threads, device=device, max_minutes=max_minutes or None, resume=resume,
        labels_csv=str(labels_csv) if labels_csv else None, export_dir=str(export_dir) if export_dir else None,
        data_description=data_description, windows=tuple(window or DEFAULT_WINDOWS), crop=crop,
        synth_data=str(synth_data) if synth_data else None, synth_share=synth_share, positive_oversample=positive_oversample,
        cache_dir=str(out / "cache"),
    )
    with _progress() as bar:
        if cv:
            from worker.model.crossval import cross_validate, render_markdown
            from worker.model.data import dataset_counts
            from worker.model.train import training_cache

            rep = cross_validate(cfg, cv, progress=bar, report_dir=report_dir)
            if report_dir is not None:
                _, cache = training_cache(cfg, out)
                command = "triage-node " + " ".join(shlex.quote(a) for a in sys.argv[1:])
                (report_dir / "report.md").write_text(render_markdown(rep, cfg, command, dataset_counts(cache, cfg.fmt, cfg.data_description)))
            cfg = replace(cfg, val_fraction=0.0, ops_from=str(out / "cv" / "report.json"))
        summary = fit(cfg, progress=bar, cache_progress=lambda d, t: bar("preprocess series", d, t))
    typer.echo(json.dumps({"export": summary["export"], "validation": summary["validation"], "wall_s": round(summary["wall_s"], 1)}, indent=2, default=float))


def evaluate(
    model: Path = typer.Option(..., "--model", help="Triton model repository with model_card.json (e.g. deploy/triton)."),
    data: Path = typer.Option(..., "--data", help="Labelled dataset folder."),
    out: Path = typer.Option(..., "--out", help="Report folder (report.md, report.json, PNG curves)."),
    fmt: str = typer.Option("synth", "--format", help="synth | rsna | physionet-ich"),
    labels_csv: Path = typer.Option(None, help="Label CSV if not the format's default."),
    n_boot: int = typer.Option(1000, help="Bootstrap resamples for AUC intervals."),
    data_note: str = typer.Option("", help="Description of the data for the report."),
    update_card: bool = typer.Option(False, "--update-card", help="Store the study-level results in the model card."),
    threads: int = typer.Option(2, help="ONNX Runtime threads."),
) -> None:
    """Evaluate a served model on labelled studies through the serving path (ONNX Runtime)."""
    from worker.model.evaluate import evaluate as run

    with _progress() as bar:
        rep = run(model, data, out, fmt, labels_csv, n_boot, data_note, update_card, progress=lambda d, t: bar("series", d, t), threads=threads)
    typer.echo(json.dumps({"n_studies": rep["n_studies"], "study_auc": {c: round(v["auc_roc"], 4) for c, v in rep["study_level"].items()}, "rsna_log_loss": rep["rsna_log_loss"]}, indent=2))


def export(
    run: Path = typer.Option(..., "--run", help="Run folder of `triage-node train` (cnn_final.pt, sequence_final.pt, triton/model_card.json)."),
    out: Path = typer.Option(..., "--out", help="Triton repository to write (e.g. deploy/triton)."),
    reselect: bool = typer.Option(
        False, "--reselect-operating-points",
        help="Choose the operating points again on the run's validation series (after a rule change).",
    ),
) -> None:
    """Re-export a trained run to ONNX (parity-checked against PyTorch) with its model card."""
    require_training_packages()
    import torch

    from worker.inference.card import load_model_card, write_model_card
    from worker.model.export import export_repository
    from worker.model.runs import load_run, reselect_operating_points

    torch.set_num_threads(2)
    cfg, cnn, seq = load_run(run)
    src = Path(cfg.export_dir or run / "triton")
    card = load_model_card(src / "model_card.json")
    update = {}
    if reselect:
        try:
            ops, val_metrics = reselect_operating_points(run)
        except ValueError as exc:
            typer.echo(f"export failed: {exc}", err=True)
            raise typer.Exit(1) from None
        update = {"operating_points": ops, "metrics": {**card.metrics, "validation": val_metrics}}
        card = card.model_copy(update=update)
    exp = export_repository(cnn, seq, cfg.size, out)
    metrics = {**card.metrics, "onnx_max_abs_diff": exp["onnx_max_abs_diff"]}
    write_model_card(card.model_copy(update={"metrics": metrics}), Path(out) / "model_card.json")
    typer.echo(json.dumps({**exp, "operating_points": card.operating_points}, indent=2))


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("evaluate")(evaluate)
    app.command("export")(export)
