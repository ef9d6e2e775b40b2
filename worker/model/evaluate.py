"""Evaluation report of a served model repository on a labelled dataset.

The evaluation runs the serving path end to end: DICOM files (or CT-ICH JPEGs) ->
:func:`record_inputs` (the card's channel plan, windows, size and framing) -> ONNX Runtime ->
:func:`run_study`. It reports
per-class slice- and study-level AUC-ROC / AUC-PR with 95% bootstrap intervals, sensitivity
and specificity with Clopper-Pearson intervals at the two operating points the worker would
use (the card's, chosen on validation data at training time, or a site calibration's when
``site_thresholds.json`` sits beside the card; never chosen here, and the report names which),
RSNA-weighted log loss, the CNN-only vs CNN+sequence ablation, and ROC / PR curves as PNG.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from triage_node import CLASSES
from triage_node.logs import get_logger
from worker.inference.card import ModelCard, json_safe, load_model_card, write_model_card
from worker.model import metrics as M
from worker.model.data import index_dataset, record_inputs
from worker.pipeline.inference_core import onnx_callables, run_study
from worker.pipeline.preprocess import SeriesError

log = get_logger(__name__)


def predict_dataset(model_dir: str | Path, data: str | Path, fmt: str = "synth", labels_csv=None, progress: Callable[[int, int], None] | None = None, threads: int = 2) -> dict:
    """Run the served models over every labelled series; returns arrays for :func:`compute_report`."""
    card = load_model_card(Path(model_dir) / "model_card.json")
    slice_fn, sequence_fn = onnx_callables(str(model_dir), threads=threads)
    index = index_dataset(data, fmt, labels_csv)
    slice_y, slice_seq, slice_cnn, study_y, study_seq, study_cnn = [], [], [], [], [], []
    failed = 0
    for k, rec in enumerate(index.series):
        try:
            x, sop_uids, _, _ = record_inputs(rec, card.channel_plan, card.windows, card.input_size, card.crop)
        except (SeriesError, ValueError, OSError, AttributeError, RuntimeError):
            failed += 1
            continue
        pred = run_study(x, slice_fn, sequence_fn, card)
        y = np.stack([index.labels[s] for s in sop_uids]).astype(np.uint8)
        slice_y.append(y)
        slice_seq.append(pred.slice_probs)
        slice_cnn.append(pred.cnn_slice_probs)
        study_y.append(y.max(0))
        study_seq.append(pred.study_probs)
        study_cnn.append(pred.cnn_study_probs)
        if progress:
            progress(k + 1, len(index.series))
    if not study_y:
        raise ValueError("no labelled series could be evaluated")
    return {
        "card": card,
        "slice_y": np.concatenate(slice_y),
        "slice_seq": np.concatenate(slice_seq),
        "slice_cnn": np.concatenate(slice_cnn),
        "study_y": np.stack(study_y),
        "study_seq": np.stack(study_seq),
        "study_cnn": np.stack(study_cnn),
        "unreadable_files": index.unreadable,
        "failed_series": failed,
    }


def auc_block(y: np.ndarray, p: np.ndarray, n_boot: int, seed: int) -> dict:
    out = {}
    for k, c in enumerate(CLASSES):
        yk, pk = y[:, k], p[:, k]
        out[c] = {
            "n_pos": int(yk.sum()),
            "n": int(yk.size),
            "auc_roc": M.roc_auc(yk, pk),
            "auc_roc_ci95": M.bootstrap_ci(M.roc_auc, yk, pk, n_boot, seed=seed),
            "auc_pr": M.average_precision(yk, pk),
            "auc_pr_ci95": M.bootstrap_ci(M.average_precision, yk, pk, n_boot, seed=seed),
        }
    return out


def compute_report(pred: dict, n_boot: int = 1000, seed: int = 0) -> dict:
    """Metrics dict (JSON-ready) from :func:`predict_dataset` output."""
    card: ModelCard = pred["card"]
    sy, sp, sc = pred["study_y"], pred["study_seq"], pred["study_cnn"]
    operating = {}
    for op in ("high_sensitivity", "balanced"):
        thr = card.thresholds(op)
        operating[op] = {c: M.sens_spec(sy[:, k], sp[:, k], thr[k]) for k, c in enumerate(CLASSES)}
    return {
        "model": {"name": card.name, "version": card.version, "device_uid": card.device_uid, "backbone": card.backbone, "input_variant": card.input_variant, "input_size": card.input_size, "intended_use": card.intended_use, "thresholds": card.threshold_source},
        "n_studies": int(sy.shape[0]),
        "n_slices": int(pred["slice_y"].shape[0]),
        "unreadable_files": pred["unreadable_files"],
        "failed_series": pred["failed_series"],
        "study_level": auc_block(sy, sp, n_boot, seed),
        "study_level_cnn_only": auc_block(sy, sc, n_boot, seed),
        "slice_level": auc_block(pred["slice_y"], pred["slice_seq"], n_boot, seed),
        "slice_level_cnn_only": auc_block(pred["slice_y"], pred["slice_cnn"], n_boot, seed),
        "operating_points": operating,
        "rsna_log_loss": {
            "study_sequence": M.rsna_log_loss(sy, sp),
            "study_cnn_only": M.rsna_log_loss(sy, sc),
            "slice_sequence": M.rsna_log_loss(pred["slice_y"], pred["slice_seq"]),
            "slice_cnn_only": M.rsna_log_loss(pred["slice_y"], pred["slice_cnn"]),
        },
        "study_aggregation": card.study_aggregation,
        "bootstrap": {"n": n_boot, "seed": seed, "interval": "percentile 95%"},
    }


def plot_curves(pred: dict, out_dir: Path) -> list[str]:
    """Study-level ROC and PR curves per class (sequence model, CNN-only dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for kind in ("roc", "pr"):
        fig, axes = plt.subplots(2, 3, figsize=(12, 8))
        for k, (c, ax) in enumerate(zip(CLASSES, axes.ravel(), strict=True)):
            y = pred["study_y"][:, k]
            for key, style, label in (("study_seq", "-", "CNN+sequence"), ("study_cnn", "--", "CNN only")):
                p = pred[key][:, k]
                if kind == "roc":
                    fpr, tpr, _ = M.roc_points(y, p)
                    ax.plot(fpr, tpr, style, label=f"{label} AUC {M.roc_auc(y, p):.3f}")
                else:
                    r, pr = M.pr_points(y, p)
                    ax.step(np.r_[0, r], np.r_[1, pr], style, where="post", label=f"{label} AP {M.average_precision(y, p):.3f}")
            if kind == "roc":
                ax.plot([0, 1], [0, 1], ":", color="grey")
                ax.set_xlabel("1 - specificity")
                ax.set_ylabel("sensitivity")
            else:
                ax.set_xlabel("recall")
                ax.set_ylabel("precision")
            ax.set_title(f"{c} (n+={int(y.sum())}/{y.size})")
            ax.legend(fontsize=7, loc="lower right" if kind == "roc" else "lower left")
        fig.suptitle(f"Study-level {'ROC' if kind == 'roc' else 'precision-recall'} curves")
        fig.tight_layout()
        name = f"study_{kind}.png"
        fig.savefig(out_dir / name, dpi=90)
        plt.close(fig)
        files.append(name)
    return files


def fmt_ci(v: float, ci) -> str:
    return f"{v:.3f} ({ci[0]:.3f}-{ci[1]:.3f})"


def render_markdown(rep: dict, figures: list[str], data_note: str) -> str:
    m = rep["model"]
    lines = [
        "# Evaluation report: ICH slice CNN + sequence model",
        "",
        f"> {rep['model'].get('intended_use', 'Not for clinical use.')}",
        "",
        f"Model `{m['name']}` version {m['version']}, Device UID `{m['device_uid']}`; backbone {m['backbone']}, "
        f"input variant `{m['input_variant']}` at {m['input_size']} px; study probability = {rep['study_aggregation']} over slices.",
        "",
        f"Data: {data_note} ({rep['n_studies']} studies, {rep['n_slices']} slices; unreadable files {rep['unreadable_files']}, "
        f"failed series {rep['failed_series']}). Intervals: {rep['bootstrap']['n']} bootstrap resamples (AUC), Clopper-Pearson (sensitivity/specificity).",
        "",
        "## Study level",
        "",
        "| class | n+ | AUC-ROC CNN+seq | AUC-PR CNN+seq | AUC-ROC CNN only | AUC-PR CNN only |",
        "|---|---|---|---|---|---|",
    ]
    for c in CLASSES:
        s, k = rep["study_level"][c], rep["study_level_cnn_only"][c]
        lines.append(f"| {c} | {s['n_pos']}/{s['n']} | {fmt_ci(s['auc_roc'], s['auc_roc_ci95'])} | {fmt_ci(s['auc_pr'], s['auc_pr_ci95'])} | {fmt_ci(k['auc_roc'], k['auc_roc_ci95'])} | {fmt_ci(k['auc_pr'], k['auc_pr_ci95'])} |")
    lines += ["", "## Slice level", "", "| class | n+ | AUC-ROC CNN+seq | AUC-PR CNN+seq | AUC-ROC CNN only | AUC-PR CNN only |", "|---|---|---|---|---|---|"]
    for c in CLASSES:
        s, k = rep["slice_level"][c], rep["slice_level_cnn_only"][c]
        lines.append(f"| {c} | {s['n_pos']}/{s['n']} | {fmt_ci(s['auc_roc'], s['auc_roc_ci95'])} | {fmt_ci(s['auc_pr'], s['auc_pr_ci95'])} | {fmt_ci(k['auc_roc'], k['auc_roc_ci95'])} | {fmt_ci(k['auc_pr'], k['auc_pr_ci95'])} |")
    for op, title in (("high_sensitivity", "High-sensitivity operating point"), ("balanced", "Balanced operating point")):
        lines += ["", f"## {title} (study level, thresholds: {m.get('thresholds', 'model card')})", "", "| class | threshold | sensitivity (95% CI) | specificity (95% CI) | TP/FN/TN/FP |", "|---|---|---|---|---|"]
        for c in CLASSES:
            r = rep["operating_points"][op][c]
            lines.append(f"| {c} | {r['threshold']:.4f} | {fmt_ci(r['sensitivity'], r['sensitivity_ci'])} | {fmt_ci(r['specificity'], r['specificity_ci'])} | {r['tp']}/{r['fn']}/{r['tn']}/{r['fp']} |")
    ll = rep["rsna_log_loss"]
    lines += [
        "",
        "## RSNA-weighted log loss and ablation",
        "",
        "| level | CNN only | CNN + sequence |",
        "|---|---|---|",
        f"| study | {ll['study_cnn_only']:.4f} | {ll['study_sequence']:.4f} |",
        f"| slice | {ll['slice_cnn_only']:.4f} | {ll['slice_sequence']:.4f} |",
        "",
        f"Sequence model {'beats' if ll['study_sequence'] < ll['study_cnn_only'] else 'does NOT beat'} the CNN alone on study-level log loss.",
        "",
        "## Curves",
        "",
    ]
    lines += [f"![{f}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def evaluate(model_dir: str | Path, data: str | Path, out_dir: str | Path, fmt: str = "synth", labels_csv=None, n_boot: int = 1000, data_note: str = "", update_card: bool = False, progress=None, threads: int = 2) -> dict:
    """Write ``report.md``, ``report.json`` and curve PNGs into ``out_dir``; returns the report dict."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pred = predict_dataset(model_dir, data, fmt, labels_csv, progress, threads)
    rep = compute_report(pred, n_boot=n_boot)
    figures = plot_curves(pred, out)
    note = data_note or f"{fmt} data"
    (out / "report.json").write_text(json.dumps(json_safe(rep), indent=2, allow_nan=False) + "\n")
    (out / "report.md").write_text(render_markdown(rep, figures, note))
    if update_card:
        card = pred["card"]
        test = {
            "data": note,
            "n_studies": rep["n_studies"],
            "study_auc_roc": {c: rep["study_level"][c]["auc_roc"] for c in CLASSES},
            "study_auc_roc_cnn_only": {c: rep["study_level_cnn_only"][c]["auc_roc"] for c in CLASSES},
            "study_rsna_log_loss": {"sequence": rep["rsna_log_loss"]["study_sequence"], "cnn_only": rep["rsna_log_loss"]["study_cnn_only"]},
            "operating_points": {op: {c: {"sensitivity": v["sensitivity"], "specificity": v["specificity"]} for c, v in rep["operating_points"][op].items()} for op in rep["operating_points"]},
        }
        new = card.model_copy(update={"metrics": {**card.metrics, "test": test}})
        write_model_card(new, Path(model_dir) / "model_card.json")
    log.info("evaluation_written", studies=rep["n_studies"], out=str(out))
    return rep
