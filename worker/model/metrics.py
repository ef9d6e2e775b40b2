"""Evaluation metrics: AUC-ROC, AUC-PR, bootstrap intervals, Clopper-Pearson, RSNA log loss,
and the two operating points.

Implemented here (rank statistics, step-wise precision-recall) so bootstrap resampling is
fast; ``tests/test_model_metrics.py`` checks each against scikit-learn on fixed inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.stats import beta, rankdata

from triage_node import CLASSES

RSNA_WEIGHTS = np.array([2.0, 1.0, 1.0, 1.0, 1.0, 1.0])


def _check(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y).astype(bool).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"labels {y.shape} and scores {p.shape} differ in length")
    return y, p


def roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with mid-ranks for ties); NaN for one class."""
    y, p = _check(y, p)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(p)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def average_precision(y: np.ndarray, p: np.ndarray) -> float:
    """AUC-PR as average precision: ``sum_n (R_n - R_{n-1}) P_n`` over distinct thresholds."""
    y, p = _check(y, p)
    n_pos = int(y.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-p, kind="mergesort")
    ys, ps = y[order], p[order]
    tps = np.cumsum(ys)
    fps = np.cumsum(~ys)
    last = np.r_[np.nonzero(np.diff(ps))[0], ys.size - 1]  # last index of each distinct score
    tp, fp = tps[last], fps[last]
    precision = tp / (tp + fp)
    recall = tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def roc_points(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) at every distinct score, starting at (0, 0) with threshold +inf."""
    y, p = _check(y, p)
    thr = np.r_[np.inf, np.unique(p)[::-1]]
    n_pos, n_neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    tpr = np.array([(p[y] >= t).sum() / n_pos for t in thr])
    fpr = np.array([(p[~y] >= t).sum() / n_neg for t in thr])
    return fpr, tpr, thr


def pr_points(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) at every distinct score, highest threshold first."""
    y, p = _check(y, p)
    out_r, out_p = [], []
    n_pos = max(int(y.sum()), 1)
    for t in np.unique(p)[::-1]:
        pred = p >= t
        tp = int((pred & y).sum())
        out_r.append(tp / n_pos)
        out_p.append(tp / max(int(pred.sum()), 1))
    return np.array(out_r), np.array(out_p)


def bootstrap_ci(
    metric: Callable[[np.ndarray, np.ndarray], float],
    y: np.ndarray,
    p: np.ndarray,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``metric`` over cases; resamples with one class are skipped."""
    y, p = _check(y, p)
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(n_boot):
        idx = rng.integers(0, y.size, y.size)
        yb = y[idx]
        if yb.all() or not yb.any():
            continue
        stats.append(metric(yb, p[idx]))
    if not stats:
        return float("nan"), float("nan")
    lo, hi = np.percentile(stats, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def clopper_pearson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Exact binomial interval for k successes in n trials (Clopper & Pearson 1934)."""
    if n <= 0:
        return float("nan"), float("nan")
    lo = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


def log_loss(y: np.ndarray, p: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy (natural log), probabilities clipped to [eps, 1-eps]."""
    y, p = _check(y, p)
    p = np.clip(p, eps, 1 - eps)
    return float(-np.mean(np.where(y, np.log(p), np.log(1 - p))))


def rsna_log_loss(y: np.ndarray, p: np.ndarray, eps: float = 1e-7) -> float:
    """RSNA 2019 weighted multi-label log loss over [N, 6] (``any`` weight 2, subtypes 1)."""
    y = np.asarray(y, dtype=np.float64)
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps)
    if y.shape != p.shape or y.ndim != 2 or y.shape[1] != RSNA_WEIGHTS.size:
        raise ValueError(f"need [N,6] labels and probabilities, got {y.shape} and {p.shape}")
    per = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    return float(np.mean((per * RSNA_WEIGHTS).sum(axis=1) / RSNA_WEIGHTS.sum()))


@dataclass(frozen=True)
class OperatingPoint:
    threshold: float
    sensitivity: float
    specificity: float
    rule: str


def sens_spec(y: np.ndarray, p: np.ndarray, threshold: float) -> dict:
    """Sensitivity and specificity at ``p >= threshold`` with Clopper-Pearson 95% intervals."""
    y, p = _check(y, p)
    pred = p >= threshold
    tp, fn = int((pred & y).sum()), int((~pred & y).sum())
    tn, fp = int((~pred & ~y).sum()), int((pred & ~y).sum())
    return {
        "threshold": float(threshold),
        "tp": tp,
        "fn": fn,
        "tn": tn,
        "fp": fp,
        "sensitivity": tp / (tp + fn) if tp + fn else float("nan"),
        "sensitivity_ci": clopper_pearson(tp, tp + fn),
        "specificity": tn / (tn + fp) if tn + fp else float("nan"),
        "specificity_ci": clopper_pearson(tn, tn + fp),
    }


def _candidates(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    thr = np.unique(p)[::-1]  # high -> low
    n_pos, n_neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    sens = np.array([(p[y] >= t).sum() / n_pos for t in thr])
    spec = np.array([(p[~y] < t).sum() / n_neg for t in thr])
    return thr, sens, spec


def high_sensitivity_point(y: np.ndarray, p: np.ndarray) -> OperatingPoint:
    """Highest sensitivity with specificity >= 0.80; if that sensitivity is < 0.93, specificity >= 0.70.

    The threshold is the lowest one that keeps the specificity floor: it has the highest
    sensitivity on the validation data and, when several thresholds tie there (separable
    validation data), it leaves the most room for positives that score lower on new data.
    """
    y, p = _check(y, p)
    thr, sens, spec = _candidates(y, p)
    for floor in (0.80, 0.70):
        ok = spec >= floor
        if not ok.any():
            continue
        i = int(np.nonzero(ok)[0][-1])  # thresholds run high -> low; sensitivity grows along them
        point = OperatingPoint(float(thr[i]), float(sens[i]), float(spec[i]), f"max sensitivity, specificity >= {floor:.2f}")
        if sens[i] >= 0.93 or floor == 0.70:
            return point
    i = 0
    return OperatingPoint(float(thr[i]), float(sens[i]), float(spec[i]), "no threshold reaches specificity 0.70")


#: Sensitivity the ``high_sensitivity`` operating point of a trained model aims at.
HIGH_SENSITIVITY_TARGET = 0.90


def target_sensitivity_point(y: np.ndarray, p: np.ndarray, target: float = HIGH_SENSITIVITY_TARGET) -> OperatingPoint:
    """Best specificity with sensitivity >= ``target``; of the thresholds that give it, the lowest.

    Thresholds are observed scores (``p >= t`` is positive). The lowest threshold with that
    specificity has the highest sensitivity on the sample and leaves the most room for
    positives that score lower on new studies. This is the ``high_sensitivity`` point of a
    trained model (target 0.90) and of a site calibration (the site's target).
    """
    fpr, tpr, thr = roc_points(y, p)
    first = int(np.argmax(tpr >= target - 1e-9))  # thresholds run high -> low, sensitivity grows
    i = int(np.nonzero(fpr <= fpr[first])[0][-1])  # false positives grow along them too
    s = sens_spec(y, p, thr[i])
    return OperatingPoint(float(thr[i]), s["sensitivity"], s["specificity"],
                          f"max specificity with sensitivity >= {target:.2f}, then max sensitivity")


def balanced_point(y: np.ndarray, p: np.ndarray) -> OperatingPoint:
    """Highest Youden index (sensitivity + specificity - 1) with sensitivity >= 0.85."""
    y, p = _check(y, p)
    thr, sens, spec = _candidates(y, p)
    ok = sens >= 0.85
    youden = np.where(ok, sens + spec - 1.0, -np.inf)
    i = int(np.argmax(youden))
    return OperatingPoint(float(thr[i]), float(sens[i]), float(spec[i]), "max Youden, sensitivity >= 0.85")


def choose_operating_points(study_y: np.ndarray, study_p: np.ndarray) -> dict[str, dict[str, float]]:
    """Per-class thresholds for both operating points, on validation study-level probabilities."""
    ops: dict[str, dict[str, float]] = {"high_sensitivity": {}, "balanced": {}}
    for k, c in enumerate(CLASSES):
        y, p = study_y[:, k], study_p[:, k]
        if y.all() or not y.any():  # cannot choose: fall back to 0.5
            ops["high_sensitivity"][c] = ops["balanced"][c] = 0.5
            continue
        ops["high_sensitivity"][c] = target_sensitivity_point(y, p).threshold
        ops["balanced"][c] = balanced_point(y, p).threshold
    return ops
