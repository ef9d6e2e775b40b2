"""Site calibration: per-class thresholds chosen on a labelled sample of the site's own studies.

Operating points do not travel between hospitals: a threshold that gave 90 % sensitivity on
the validation patients of one site gives another specificity, and another sensitivity,
elsewhere. :func:`calibrate` runs the served models over the site's labelled studies with
:func:`worker.model.evaluate.predict_dataset` (the serving path, ONNX Runtime) and chooses
per class:

- ``high_sensitivity``: the best specificity whose sensitivity on the sample reaches the
  target (default 0.90), at the lowest threshold that gives it
  (:func:`worker.model.metrics.target_sensitivity_point`, the rule the card's own point was
  chosen by, at the sensitivity the site states).
- ``balanced``: :func:`worker.model.metrics.balanced_point` (highest Youden index with
  sensitivity >= 0.85), the rule the card's own point was chosen by.

A sample too small for the ``any`` class is refused (:class:`CalibrationRefused`); a
subtype with too few positives or negatives keeps the model card's thresholds, and the
site file says so. The result is a :class:`worker.inference.site.SiteThresholds`, written
beside the card; weights and card are not changed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from triage_node import CLASSES
from triage_node.logs import get_logger
from triage_node.timeutil import utcnow
from worker.files import write_atomic
from worker.inference.card import OPERATING_POINTS, ModelCard, json_safe, load_model_card
from worker.inference.site import SITE_FILE, Sample, SiteThresholds, thresholds_digest
from worker.model import metrics as M
from worker.model.metrics import target_sensitivity_point

log = get_logger(__name__)

#: Fewer negatives than this and one study moves specificity by more than 10 points.
DEFAULT_MIN_NEGATIVES = 10


class CalibrationRefused(ValueError):
    """The sample cannot support the requested operating points; the message says what to add."""

    def __init__(self, message: str, n_studies: int | None = None) -> None:
        super().__init__(message)
        self.n_studies = n_studies


def min_positives_for(target_sensitivity: float) -> int:
    """Positives needed before a sensitivity of ``target`` differs from 100 %.

    With ``n`` positives sensitivity moves in steps of ``1/n``; missing one positive keeps
    it at the target only when ``1 - 1/n >= target``, i.e. ``n >= 1/(1 - target)``: 10
    for 0.90, 20 for 0.95. Fewer, and the only threshold reaching the target catches
    every positive.
    """
    if not 0.0 < target_sensitivity < 1.0:
        raise ValueError(f"target sensitivity must be between 0 and 1, got {target_sensitivity}")
    return math.ceil(round(1.0 / (1.0 - target_sensitivity), 9))


def _result(y: np.ndarray, p: np.ndarray, threshold: float, source: str) -> dict:
    s = M.sens_spec(y, p, threshold)
    return json_safe({
        "threshold": s["threshold"], "source": source, "n_pos": s["tp"] + s["fn"], "n_neg": s["tn"] + s["fp"],
        "tp": s["tp"], "fn": s["fn"], "tn": s["tn"], "fp": s["fp"],
        "sensitivity": s["sensitivity"], "sensitivity_ci95": s["sensitivity_ci"],
        "specificity": s["specificity"], "specificity_ci95": s["specificity_ci"],
    })


def choose_thresholds(
    study_y: np.ndarray,
    study_p: np.ndarray,
    card_thresholds: Mapping[str, np.ndarray],
    target_sensitivity: float = 0.90,
    min_positives: int | None = None,
    min_negatives: int = DEFAULT_MIN_NEGATIVES,
) -> dict:
    """Per-class thresholds at both operating points, with their sensitivity and specificity.

    Parameters
    ----------
    study_y, study_p : ndarray [n, 6]
        Study labels and probabilities in CLASSES order (``predict_dataset``'s ``study_y``
        and ``study_seq``).
    card_thresholds : mapping of str to ndarray [6]
        The card's thresholds per operating point, kept for subtypes the sample cannot
        calibrate.
    target_sensitivity : float
        Sensitivity the ``high_sensitivity`` point must reach on the sample.
    min_positives, min_negatives : int
        Studies needed per class; ``min_positives`` defaults to
        :func:`min_positives_for` the target.

    Returns
    -------
    dict
        ``operating_points`` {op: {class: threshold}}, ``results`` {op: {class: dict}}
        (``worker.inference.site.ClassResult`` fields), ``rules`` {op: text},
        ``kept_card_threshold`` {class: reason}, ``min_positives``, ``min_negatives``.

    Raises
    ------
    CalibrationRefused
        ``any`` has fewer than ``min_positives`` positives or ``min_negatives`` negatives.
    """
    y = np.asarray(study_y).astype(bool)
    p = np.asarray(study_p, dtype=np.float64)
    if y.shape != p.shape or y.ndim != 2 or y.shape[1] != len(CLASSES):
        raise ValueError(f"need [n, {len(CLASSES)}] labels and probabilities, got {y.shape} and {p.shape}")
    min_pos = min_positives if min_positives is not None else min_positives_for(target_sensitivity)
    if min_pos < 1 or min_negatives < 1:
        raise ValueError("minimum positives and negatives must be at least 1")
    n_pos, n_neg = y.sum(0), (~y).sum(0)  # column 0 is "any" (CLASSES order)
    if n_pos[0] < min_pos or n_neg[0] < min_negatives:
        raise CalibrationRefused(
            f"the sample has {n_pos[0]} studies positive for 'any' and {n_neg[0]} negative; calibration "
            f"needs at least {min_pos} positives and {min_negatives} negatives. With fewer than "
            f"{min_positives_for(target_sensitivity)} positives a {target_sensitivity:.0%} sensitivity point "
            f"cannot be told apart from 100%, and with fewer than {DEFAULT_MIN_NEGATIVES} negatives one study "
            f"moves specificity by more than 10 points. Add at least {max(min_pos - n_pos[0], 0)} positive and "
            f"{max(min_negatives - n_neg[0], 0)} negative labelled studies (or lower --target-sensitivity, "
            f"--min-positives, --min-negatives, knowing what that costs)",
            n_studies=int(y.shape[0]),
        )
    ops: dict[str, dict[str, float]] = {op: {} for op in OPERATING_POINTS}
    results: dict[str, dict[str, dict]] = {op: {} for op in OPERATING_POINTS}
    kept: dict[str, str] = {}
    for k, c in enumerate(CLASSES):
        yk, pk = y[:, k], p[:, k]
        if n_pos[k] < min_pos or n_neg[k] < min_negatives:
            kept[c] = (
                f"{n_pos[k]} positive and {n_neg[k]} negative studies in the sample, "
                f"fewer than the {min_pos} and {min_negatives} needed"
            )
        for op in OPERATING_POINTS:
            if c in kept:
                t, source = float(card_thresholds[op][k]), "model card"
            elif op == "high_sensitivity":
                t, source = target_sensitivity_point(yk, pk, target_sensitivity).threshold, "site"
            else:
                t, source = M.balanced_point(yk, pk).threshold, "site"
            ops[op][c] = t
            results[op][c] = _result(yk, pk, t, source)
    rules = {
        "high_sensitivity": f"max specificity with sensitivity >= {target_sensitivity:.2f} on the sample, then max sensitivity",
        "balanced": "max Youden, sensitivity >= 0.85 on the sample",
    }
    return {"operating_points": ops, "results": results, "rules": rules, "kept_card_threshold": kept,
            "min_positives": min_pos, "min_negatives": min_negatives}


def site_file_path(model_dir: str | Path, out: str | Path | None = None) -> Path:
    """``out``, or ``site_thresholds.json`` beside the model card (where serving reads it)."""
    return Path(out) if out is not None else Path(model_dir) / SITE_FILE


def calibrate(
    model_dir: str | Path,
    data: str | Path,
    fmt: str = "synth",
    labels_csv: str | Path | None = None,
    target_sensitivity: float = 0.90,
    min_positives: int | None = None,
    min_negatives: int = DEFAULT_MIN_NEGATIVES,
    progress: Callable[[int, int], None] | None = None,
    threads: int = 2,
) -> SiteThresholds:
    """Run the served models over the labelled sample and choose the site's thresholds.

    Parameters
    ----------
    model_dir : path
        Model repository holding ``model_card.json`` (e.g. ``deploy/triton``).
    data, fmt, labels_csv
        Labelled dataset, passed to :func:`worker.model.evaluate.predict_dataset` as they
        are (any format :func:`worker.model.data.index_dataset` reads).
    target_sensitivity, min_positives, min_negatives
        See :func:`choose_thresholds`.

    Raises
    ------
    CalibrationRefused
        Sample too small for ``any``.
    worker.inference.site.SiteCalibrationError
        A site file beside the card was made for other weights (from ``load_model_card``).
    ValueError, FileNotFoundError
        Unknown format, no label file, no series that could be read.
    """
    from worker.model.evaluate import predict_dataset  # ONNX Runtime and preprocessing: load late

    min_positives_for(target_sensitivity)  # refuse a bad target before minutes of inference
    card = load_model_card(Path(model_dir) / "model_card.json")
    pred = predict_dataset(model_dir, data, fmt, labels_csv, progress, threads)
    # the card's own thresholds, not those of an earlier site calibration
    card_thresholds = {op: np.asarray([card.operating_points[op][c] for c in CLASSES]) for op in OPERATING_POINTS}
    chosen = choose_thresholds(pred["study_y"], pred["study_seq"], card_thresholds, target_sensitivity,
                               min_positives, min_negatives)
    sample = Sample(data=str(Path(data).resolve()), format=fmt, n_studies=int(pred["study_y"].shape[0]),
                    failed_series=int(pred["failed_series"]), unreadable_files=int(pred["unreadable_files"]))
    site = site_thresholds(card, chosen, sample, target_sensitivity)
    log.info("model.calibrated", digest=site.digest, n_studies=sample.n_studies, kept=sorted(site.kept_card_threshold))
    return site


def site_thresholds(card: ModelCard, chosen: dict, sample: Sample, target_sensitivity: float) -> SiteThresholds:
    """The site file's content: :func:`choose_thresholds` output for ``card``, with its digest and the time."""
    return SiteThresholds(
        device_uid=card.device_uid,
        model_name=card.name,
        model_version=card.version,
        calibrated_utc=utcnow().isoformat(timespec="seconds"),
        target_sensitivity=target_sensitivity,
        sample=sample,
        digest=thresholds_digest(chosen["operating_points"]),
        **chosen,
    )


def write_site_file(site: SiteThresholds, path: str | Path) -> Path:
    """Write the site file atomically (temp file in the same folder, fsync, replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(site.model_dump(mode="json"), indent=2, allow_nan=False) + "\n"
    # the rename is durable only once the directory entry is: sync_dir
    return write_atomic(path, lambda fh: fh.write(text.encode()), 0o644, sync_dir=True)
