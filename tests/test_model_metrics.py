"""Metric code against scikit-learn and scipy on fixed inputs; operating-point rules."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, log_loss, roc_auc_score

from worker.model import metrics as M


@pytest.fixture(scope="module")
def fixed():
    rng = np.random.default_rng(42)
    y = rng.random(400) < 0.3
    p = np.clip(0.35 * y + rng.normal(0.3, 0.2, 400), 0, 1)
    p = np.round(p, 2)  # many ties
    return y, p


def test_roc_auc_matches_sklearn_with_ties(fixed):
    y, p = fixed
    assert M.roc_auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert np.isnan(M.roc_auc(np.zeros(5, bool), np.arange(5)))


def test_average_precision_matches_sklearn_with_ties(fixed):
    y, p = fixed
    assert M.average_precision(y, p) == pytest.approx(average_precision_score(y, p), abs=1e-12)
    q = np.linspace(0, 1, 400)
    assert M.average_precision(y, q) == pytest.approx(average_precision_score(y, q), abs=1e-12)


def test_rsna_log_loss_matches_weighted_sklearn(fixed):
    rng = np.random.default_rng(1)
    y = (rng.random((50, 6)) < 0.3).astype(int)
    p = rng.uniform(0.01, 0.99, (50, 6))
    w = np.array([2, 1, 1, 1, 1, 1.0])
    expect = sum(w[k] * log_loss(y[:, k], p[:, k], labels=[0, 1]) for k in range(6)) / w.sum()
    assert M.rsna_log_loss(y, p) == pytest.approx(expect, rel=1e-9)
    assert M.log_loss(y[:, 0], p[:, 0]) == pytest.approx(log_loss(y[:, 0], p[:, 0], labels=[0, 1]), rel=1e-9)


def test_clopper_pearson_known_values():
    lo, hi = M.clopper_pearson(8, 10)
    assert lo == pytest.approx(0.4439045, abs=1e-6)  # exact binomial, R binom.test(8, 10)
    assert hi == pytest.approx(0.9747893, abs=1e-6)
    assert M.clopper_pearson(0, 10)[0] == 0.0 and M.clopper_pearson(10, 10)[1] == 1.0


def test_bootstrap_interval_brackets_point_estimate(fixed):
    y, p = fixed
    lo, hi = M.bootstrap_ci(M.roc_auc, y, p, n_boot=300, seed=0)
    auc = M.roc_auc(y, p)
    assert lo < auc < hi and hi - lo < 0.2


def test_operating_points_follow_the_rules():
    # 10 negatives, 10 positives, perfectly interleaved scores
    y = np.array([0, 1] * 10, bool)
    p = np.arange(20) / 20.0
    hs = M.high_sensitivity_point(y, p)
    r = M.sens_spec(y, p, hs.threshold)
    assert r["specificity"] >= 0.70
    # specificity >= 0.80 allows sensitivity 0.3 only (< 0.93), so the rule falls back to >= 0.70
    assert "0.70" in hs.rule
    best_sens = max(M.sens_spec(y, p, t)["sensitivity"] for t in np.unique(p) if M.sens_spec(y, p, t)["specificity"] >= 0.70)
    assert r["sensitivity"] == pytest.approx(best_sens) == pytest.approx(0.4)
    bal = M.balanced_point(y, p)
    rb = M.sens_spec(y, p, bal.threshold)
    assert rb["sensitivity"] >= 0.85
    # brute force: no threshold with sensitivity >= 0.85 has a higher Youden index
    best = max(
        (M.sens_spec(y, p, t)["sensitivity"] + M.sens_spec(y, p, t)["specificity"] - 1)
        for t in np.unique(p)
        if M.sens_spec(y, p, t)["sensitivity"] >= 0.85
    )
    assert rb["sensitivity"] + rb["specificity"] - 1 == pytest.approx(best)


def test_high_sensitivity_keeps_spec_080_when_sensitive_enough():
    y = np.array([0] * 10 + [1] * 10, bool)
    p = np.r_[np.linspace(0, 0.5, 10), np.linspace(0.6, 1, 10)]
    hs = M.high_sensitivity_point(y, p)
    # separable data: every threshold in the gap has sensitivity 1; the lowest that keeps
    # specificity >= 0.80 is chosen, not the one at the edge of the positives
    assert "0.80" in hs.rule and hs.sensitivity == 1.0 and hs.specificity == pytest.approx(0.8)
    assert hs.threshold < 0.6
    bal = M.balanced_point(y, p)
    assert bal.sensitivity == 1.0 and bal.specificity == 1.0
