"""Measure a sequence model trained on out-of-fold CNN outputs against the run's own.

    python scripts/stacking_cv.py RUN_DIR [--out RUN_DIR/cv/stacking.json]

RUN_DIR is a finished ``triage-node train --cv K`` run (its ``cache/``, ``cv/fold_*.npz`` and
``cv/fold_k/cnn_last.pt``). Every variant below scores the same patients with the same fold
CNNs, so their differences are paired (the training noise of the CNNs is shared); the
intervals are 2000 bootstrap resamples of patients. The first stacked variant is the one
decided on before looking (probabilities only, hidden 32, logit jitter 0.5, 20 epochs); the
others are reported as tried, so a reader can judge how much choosing among them is worth.
See `worker.model.stacking`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from triage_node import CLASSES
from worker.model import metrics as M
from worker.model.stacking import (
    cnn_probs,
    load_out_of_fold,
    mirrored_logits,
    paired_auc_difference,
    stacked_cv,
    study_scores,
)

STACKED = [  # (name, logits, epochs, hidden, jitter)
    ("stacked", "plain", 20, 32, 0.5),
    ("stacked, mirrored inputs", "mirrored", 20, 32, 0.5),
    ("stacked, no jitter", "plain", 20, 32, 0.0),
    ("stacked, hidden 96, jitter 1", "plain", 20, 96, 1.0),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--seeds", type=int, default=3, help="stacker trainings per variant, averaged")
    args = ap.parse_args()
    torch.set_num_threads(1)  # small GRUs: one thread is as fast, and leaves a core to a training run
    t0 = time.monotonic()
    oof = load_out_of_fold(args.run)
    mirrored = mirrored_logits(args.run, oof)
    variants = {"run's own CNN + sequence": oof.baseline, "CNN only": cnn_probs(oof),
                "CNN only, mirrored inputs": cnn_probs(oof, mirrored)}
    for name, which, epochs, hidden, jitter in STACKED:
        logits = mirrored if which == "mirrored" else oof.logits
        runs = [stacked_cv(oof, logits, epochs=epochs, hidden=hidden, jitter=jitter, seed=100 * s)
                for s in range(args.seeds)]
        variants[name] = {i: np.mean([r[i] for r in runs], axis=0) for i in runs[0]}
    y, base, fold = study_scores(oof, oof.baseline)
    rows = {}
    for name, probs in variants.items():
        _, p, _ = study_scores(oof, probs)
        low, high = M.bootstrap_ci(M.roc_auc, y[:, 0], p[:, 0])
        diff = paired_auc_difference(y[:, 0], p[:, 0], base[:, 0])
        rows[name] = {
            "study_auc_any": M.roc_auc(y[:, 0], p[:, 0]), "ci95": [low, high],
            "per_fold": [M.roc_auc(y[fold == k, 0], p[fold == k, 0]) for k in oof.folds],
            "per_class": {c: M.roc_auc(y[:, j], p[:, j]) for j, c in enumerate(CLASSES)},
            "minus_run_own": {"difference": diff[0], "ci95": [diff[1], diff[2]], "share_le_0": diff[3]},
        }
        print(f"{name:32s} AUC(any) {rows[name]['study_auc_any']:.3f} ({low:.3f}-{high:.3f}) "
              f"folds {' '.join(f'{a:.3f}' for a in rows[name]['per_fold'])} "
              f"vs run's own {diff[0]:+.3f} ({diff[1]:+.3f} to {diff[2]:+.3f}, P(<=0) {diff[3]:.2f})")
    out = args.out or args.run / "cv" / "stacking.json"
    out.write_text(json.dumps({"patients": len(y), "positive": int(y[:, 0].sum()), "seeds": args.seeds,
                               "variants": rows, "wall_s": round(time.monotonic() - t0, 1)}, indent=2) + "\n")
    print(f"{len(y)} patients ({int(y[:, 0].sum())} with a bleed); {time.monotonic() - t0:.0f} s; written {out}")


if __name__ == "__main__":
    main()
