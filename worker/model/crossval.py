"""Patient-level k-fold cross-validation of the whole training recipe.

Each fold trains the slice CNN and the sequence model on the other folds' patients (plus the
synthetic studies, which are never tested on) and predicts its own patients. The figures are
computed on the pooled out-of-fold predictions, so every real patient is scored by a model
that never saw them. Thresholds follow the same rule: fold k's patients are judged at the
thresholds chosen on the out-of-fold predictions of the *other* folds, never on their own.
The operating points shipped with the final model (trained on every patient) are chosen on
all out-of-fold predictions.

A fold that has finished is kept in ``OUT/cv/fold_<k>.npz``; ``--resume`` skips it, and a
fold cut short continues from its CNN checkpoint.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from triage_node import CLASSES
from triage_node.logs import get_logger
from worker.inference.card import json_safe
from worker.model import metrics as M
from worker.model.data import SYNTH_PREFIX, CachedSet
from worker.model.evaluate import auc_block, fmt_ci, plot_curves
from worker.model.metrics import choose_operating_points
from worker.model.series_eval import series_probs
from worker.model.train import TrainConfig, extract, train_cnn, train_sequence, training_cache

log = get_logger(__name__)


def patient_folds(cache: CachedSet, k: int, seed: int) -> list[list[int]]:
    """Series indices of the real patients in ``k`` folds, stratified by whether a patient bleeds."""
    by_patient: dict[str, list[int]] = {}
    for i, key in enumerate(cache.patient_keys):
        if not key.startswith(SYNTH_PREFIX):
            by_patient.setdefault(key, []).append(i)
    if len(by_patient) < k:
        raise ValueError(f"{len(by_patient)} patients cannot make {k} folds")
    y = cache.study_labels()
    rng = np.random.default_rng(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    pos = sorted(p for p, idx in by_patient.items() if y[idx, 0].max() > 0)
    neg = sorted(p for p in by_patient if p not in set(pos))
    turn = 0
    for group in (pos, neg):
        for p in rng.permutation(group):
            folds[turn % k].extend(by_patient[str(p)])
            turn += 1
    return [sorted(f) for f in folds]


def run_fold(cfg: TrainConfig, cache: CachedSet, k: int, test: list[int], cv_dir: Path, progress=None) -> dict:
    """Train on everything but ``test`` and predict ``test``; the result is saved and returned."""
    done = cv_dir / f"fold_{k}.npz"
    if cfg.resume and done.is_file():
        with np.load(done) as z:
            return {key: z[key] for key in z.files}
    fold_cfg = replace(cfg, out=str(cv_dir / f"fold_{k}"), seed=cfg.seed + k)
    Path(fold_cfg.out).mkdir(parents=True, exist_ok=True)
    held = set(test)
    train_idx = [i for i in range(len(cache)) if i not in held]
    t0 = time.monotonic()
    cnn, hist = train_cnn(fold_cfg, cache, train_idx, Path(fold_cfg.out), progress)
    emb, logits = extract(cnn, cache)
    seq, _ = train_sequence(fold_cfg, emb, logits, cache, train_idx, None, progress)
    p_seq, p_cnn = series_probs(seq, emb, logits, cache, test)
    out = {
        "test": np.asarray(test),
        "lengths": np.asarray([len(p) for p in p_seq]),
        "slice_seq": np.concatenate(p_seq),
        "slice_cnn": np.concatenate(p_cnn),
        "cnn_loss": np.asarray(hist),
        "wall_s": np.asarray(time.monotonic() - t0),
    }
    # allow_pickle as numpy's default, named so that **out is not checked against it
    np.savez(done, allow_pickle=True, **out)
    log.info("cv_fold_done", fold=k, test_series=len(test), minutes=round(float(out["wall_s"]) / 60, 1))
    return out


def pooled(cache: CachedSet, results: list[dict]) -> dict:
    """Out-of-fold predictions of every tested series, in the shape :mod:`evaluate` reports on."""
    study_y, study_seq, study_cnn, slice_y, slice_seq, slice_cnn, fold_of = [], [], [], [], [], [], []
    for k, r in enumerate(results):
        ends = np.cumsum(r["lengths"])
        for j, i in enumerate(r["test"]):
            a, b = (ends[j - 1] if j else 0), ends[j]
            y = cache.labels[cache.series_slice(int(i))]
            slice_y.append(y)
            slice_seq.append(r["slice_seq"][a:b])
            slice_cnn.append(r["slice_cnn"][a:b])
            study_y.append(y.max(0))
            study_seq.append(r["slice_seq"][a:b].max(0))
            study_cnn.append(r["slice_cnn"][a:b].max(0))
            fold_of.append(k)
    return {
        "study_y": np.stack(study_y), "study_seq": np.stack(study_seq), "study_cnn": np.stack(study_cnn),
        "slice_y": np.concatenate(slice_y), "slice_seq": np.concatenate(slice_seq), "slice_cnn": np.concatenate(slice_cnn),
        "fold": np.asarray(fold_of),
    }


def fold_thresholded(pred: dict, key: str = "study_seq") -> dict:
    """Sensitivity/specificity at both operating points, each fold at thresholds chosen on the other folds."""
    y, p, fold = pred["study_y"], pred[key], pred["fold"]
    decided = {op: np.zeros_like(y, dtype=bool) for op in ("high_sensitivity", "balanced")}
    for k in np.unique(fold):
        ops = choose_operating_points(y[fold != k], p[fold != k])
        for op, thr in ops.items():
            decided[op][fold == k] = p[fold == k] >= np.asarray([thr[c] for c in CLASSES])
    out: dict[str, dict[str, Any]] = {}
    for op, d in decided.items():
        out[op] = {}
        for j, c in enumerate(CLASSES):
            # sens_spec on the 0/1 decisions at threshold 0.5 counts them as they were made
            out[op][c] = M.sens_spec(y[:, j], d[:, j].astype(float), 0.5)
            del out[op][c]["threshold"]
    return out


def cross_validate(cfg: TrainConfig, folds: int = 5, n_boot: int = 1000, progress: Callable[[str, int, int], None] | None = None, report_dir: str | Path | None = None) -> dict:
    """Run (or resume) the k folds and write ``cv/report.json`` (and the report pages to ``report_dir``)."""
    run = Path(cfg.out)
    cv_dir = run / "cv"
    cv_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    _, cache = training_cache(replace(cfg, cache_dir=cfg.cache_dir or str(run / "cache")), run)
    fold_sets = patient_folds(cache, folds, cfg.seed)
    results = [run_fold(cfg, cache, k, test, cv_dir, progress) for k, test in enumerate(fold_sets)]
    if cfg.seq_out_of_fold:
        from worker.model.stacking import with_stacked_sequence

        results = with_stacked_sequence(run, results, cfg)
    pred = pooled(cache, results)
    y, p = pred["study_y"], pred["study_seq"]
    per_fold_auc = [M.roc_auc(y[pred["fold"] == k, 0], p[pred["fold"] == k, 0]) for k in range(folds)]
    rep: dict[str, Any] = {
        "folds": folds,
        "patients": int(len(y)),
        "positive_patients": {c: int(y[:, j].sum()) for j, c in enumerate(CLASSES)},
        "study_level": auc_block(y, p, n_boot, cfg.seed),
        "study_level_cnn_only": auc_block(y, pred["study_cnn"], n_boot, cfg.seed),
        "slice_level": auc_block(pred["slice_y"], pred["slice_seq"], n_boot, cfg.seed),
        "slice_level_cnn_only": auc_block(pred["slice_y"], pred["slice_cnn"], n_boot, cfg.seed),
        "per_fold_study_auc_any": per_fold_auc,
        "operating_points_out_of_fold": fold_thresholded(pred),
        "operating_points": choose_operating_points(y, p),
        "fold_minutes": [round(float(r["wall_s"]) / 60, 2) for r in results],
        "wall_s": round(time.monotonic() - t0, 1),
        "bootstrap": {"n": n_boot, "seed": cfg.seed, "interval": "percentile 95%, resampling patients"},
    }
    rep["summary"] = {
        "study_auc_any": rep["study_level"]["any"]["auc_roc"],
        "study_auc_any_ci95": rep["study_level"]["any"]["auc_roc_ci95"],
        "study_auc": {c: rep["study_level"][c]["auc_roc"] for c in CLASSES},
        "patients": rep["patients"],
        "folds": folds,
    }
    (cv_dir / "report.json").write_text(json.dumps(json_safe(rep), indent=2, allow_nan=False) + "\n")
    np.savez(cv_dir / "predictions.npz", **pred)
    if report_dir is not None:
        out = Path(report_dir)
        out.mkdir(parents=True, exist_ok=True)
        figures = plot_curves(pred, out)
        (out / "cv_report.json").write_text(json.dumps(json_safe(rep), indent=2, allow_nan=False) + "\n")
        rep["figures"] = figures
    log.info("cv_done", study_auc_any=round(rep["summary"]["study_auc_any"], 4), minutes=round(rep["wall_s"] / 60, 1))
    return rep


def render_markdown(rep: dict, cfg: TrainConfig, command: str, datasets: list[dict]) -> str:
    """``docs/model/report.md``: the cross-validation figures, how they were made, and the curves."""
    lines = [
        "# Model report: patient-level cross-validation on CT-ICH",
        "",
        "> Research use only. Not a medical device, not for clinical use. These figures come from one",
        "> hospital's 82 patients; they say how the recipe does on patients it did not train on,",
        "> not how it will do on another hospital's scanners. A site checks that with",
        "> `triage-node evaluate` and sets its own thresholds with `triage-node calibrate`.",
        "",
        "## How these figures were made",
        "",
        f"- Command: `{command}`",
        f"- {rep['folds']}-fold cross-validation by patient, stratified by whether the patient bleeds; "
        f"{rep['patients']} patients, each scored once by the model of the fold that held it out.",
        f"- Recipe: backbone `{cfg.backbone}`, input `{cfg.variant}` (slices s-1, s, s+1) in window "
        f"`{cfg.windows[0]}`, framing `{cfg.crop}`, {cfg.size} px; CNN time budget {cfg.max_minutes} min per fold "
        f"(one-cycle learning rate over it), batch {cfg.batch_size}, peak LR {cfg.lr}; slices with a bleed sampled "
        f"{cfg.positive_oversample}x; synthetic studies {'added to every training fold at ' + str(int(cfg.synth_share * 100)) + ' % of the samples' if cfg.synth_data else 'not used'}; "
        "augmentation: mirror, rotation ±15°, zoom ±12 %, shift ±6 %, window level/width and gamma jitter, "
        "blur, noise, thin-slice neighbours (`worker/model/augment.py`). Sequence model: bidirectional GRU, "
        f"{cfg.seq_epochs} epochs, no early stopping (no fold looks at its test patients)"
        + ("; it reads only the CNN probabilities and, for each fold, learns from the other folds' out-of-fold CNN "
           "outputs (`worker/model/stacking.py`)." if cfg.seq_out_of_fold else "."),
        "- Thresholds: each fold's patients are judged at thresholds chosen on the other folds' out-of-fold "
        "predictions; the shipped thresholds are chosen on all of them. High-sensitivity point: best specificity "
        "with sensitivity >= 0.90; balanced: highest Youden index with sensitivity >= 0.85.",
        f"- Intervals: {rep['bootstrap']['n']} bootstrap resamples of patients (AUC), Clopper-Pearson (sensitivity, specificity).",
        f"- Wall time on this machine's 2 CPU cores: {sum(rep['fold_minutes']):.1f} min for the folds "
        f"({', '.join(f'{m:.1f}' for m in rep['fold_minutes'])} min each, as each fold measured itself).",
        "",
        "## Data the folds saw",
        "",
        "| data set | licence | patients | series with a bleed | slices | slices with a bleed |",
        "|---|---|---|---|---|---|",
    ]
    for d in datasets:
        lines.append(f"| {d['name']} {d.get('version', '')} | {d['licence']} | {d['patients']} | {d['positive_series']['any']} | {d['slices']} | {d['positive_slices']} |")
    lines += [
        "",
        "## Study (patient) level, out of fold",
        "",
        "| class | patients + | AUC-ROC CNN+sequence | AUC-ROC CNN only | AUC-PR CNN+sequence |",
        "|---|---|---|---|---|",
    ]
    for c in CLASSES:
        s, k = rep["study_level"][c], rep["study_level_cnn_only"][c]
        lines.append(f"| {c} | {s['n_pos']}/{s['n']} | {fmt_ci(s['auc_roc'], s['auc_roc_ci95'])} | {fmt_ci(k['auc_roc'], k['auc_roc_ci95'])} | {fmt_ci(s['auc_pr'], s['auc_pr_ci95'])} |")
    lines += ["", "AUC(any) per fold: " + ", ".join(f"{a:.3f}" for a in rep["per_fold_study_auc_any"]) + ".", ""]
    lines += ["## Slice level, out of fold", "", "| class | slices + | AUC-ROC CNN+sequence | AUC-ROC CNN only |", "|---|---|---|---|"]
    for c in CLASSES:
        s, k = rep["slice_level"][c], rep["slice_level_cnn_only"][c]
        lines.append(f"| {c} | {s['n_pos']}/{s['n']} | {fmt_ci(s['auc_roc'], s['auc_roc_ci95'])} | {fmt_ci(k['auc_roc'], k['auc_roc_ci95'])} |")
    for op, title in (("high_sensitivity", "High-sensitivity point"), ("balanced", "Balanced point")):
        lines += ["", f"## {title}, out of fold (thresholds from the other folds)", "",
                  "| class | sensitivity (95% CI) | specificity (95% CI) | TP/FN/TN/FP | shipped threshold |", "|---|---|---|---|---|"]
        for c in CLASSES:
            r = rep["operating_points_out_of_fold"][op][c]
            lines.append(f"| {c} | {fmt_ci(r['sensitivity'], r['sensitivity_ci'])} | {fmt_ci(r['specificity'], r['specificity_ci'])} | "
                         f"{r['tp']}/{r['fn']}/{r['tn']}/{r['fp']} | {rep['operating_points'][op][c]:.4f} |")
    lines += ["", "Subtypes with fewer than ten positive patients have intervals too wide to act on.", "", "## Curves (study level, out of fold)", ""]
    lines += [f"![{f}]({f})" for f in rep.get("figures", [])]
    return "\n".join(lines) + "\n"
