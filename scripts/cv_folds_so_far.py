"""Study-level AUC(any) of each finished fold of a cross-validation run, while it runs.

    python scripts/cv_folds_so_far.py RUN_DIR

RUN_DIR is the ``--out`` of ``triage-node train --cv K`` (its ``cache/`` and ``cv/fold_*.npz``).
The study score is the highest slice probability of the series, as in the CV report
(`worker.model.crossval.pooled`); the report itself is written only when every fold is done.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from worker.model import metrics as M
from worker.model.data import load_cache


def main(run: Path) -> None:
    cache = load_cache(run / "cache")
    pooled_y: list[float] = []
    pooled_p: list[float] = []
    for path in sorted((run / "cv").glob("fold_*.npz")):
        r = dict(np.load(path))
        ends = np.cumsum(r["lengths"])
        y, seq, cnn = [], [], []
        for j, i in enumerate(r["test"]):
            a, b = (ends[j - 1] if j else 0), ends[j]
            y.append(cache.labels[cache.series_slice(int(i))][:, 0].max())
            seq.append(r["slice_seq"][a:b, 0].max())
            cnn.append(r["slice_cnn"][a:b, 0].max())
        y_ = np.asarray(y)
        pooled_y += y
        pooled_p += seq
        print(f"{path.stem}: {len(y)} patients ({int(y_.sum())} with a bleed), study AUC(any) "
              f"CNN+sequence {M.roc_auc(y_, np.asarray(seq)):.3f}, CNN only {M.roc_auc(y_, np.asarray(cnn)):.3f}, "
              f"{len(r['cnn_loss'])} epochs, final CNN loss {r['cnn_loss'][-1]:.4f}, {float(r['wall_s']) / 60:.1f} min")
    if pooled_y:
        y_, p_ = np.asarray(pooled_y), np.asarray(pooled_p)
        low, high = M.bootstrap_ci(M.roc_auc, y_, p_)  # 1000 resamples of patients, as the CV report
        print(f"pooled over the finished folds: {len(y_)} patients, study AUC(any) CNN+sequence "
              f"{M.roc_auc(y_, p_):.3f} ({low:.3f}-{high:.3f})")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
