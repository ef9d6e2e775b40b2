"""A sequence model trained on out-of-fold CNN outputs, measured by cross-validation.

Why: the shipped recipe trains its sequence model on the CNN's outputs for the CNN's own
training series, where the CNN is confident and mostly right; on a new patient it is
neither, and the sequence model has never seen how it errs there (most out-of-fold errors
are normal patients whose top slice lies at the skull base). Trained instead on out-of-fold
outputs, it sees the CNN as a new patient will.

`stacked_cv` takes a finished cross-validation run (``RUN/cache``, ``RUN/cv/fold_*.npz`` and
each fold's CNN checkpoint ``RUN/cv/fold_k/cnn_last.pt``). For every fold k it trains a
sequence model that reads only the CNN probabilities (`SequenceModel(use_embedding=False)`:
the other folds' CNNs do not share an embedding space) on the out-of-fold outputs of the
other folds' patients, and scores fold k's patients with it. Fold k's CNN outputs are out
of fold too, so the model is tested on the kind of input it learnt from. No fold's labels
reach its own sequence model; the CNNs of the other folds did train on fold k's patients,
but only their outputs for *other* patients are used. Synthetic series (never tested) are
left out of this stage.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from triage_node import CLASSES
from worker.model import metrics as M
from worker.model.data import CachedSet, load_cache, subset_slices
from worker.model.networks import SequenceModel, SliceCNN
from worker.model.series_eval import series_probs
from worker.model.train import TrainConfig, train_sequence

#: The stacked sequence model's size and the noise on its inputs; decided before the
#: cross-validation that measured it (`scripts/stacking_cv.py`, variant ``stacked``).
STACKED_HIDDEN = 32
STACKED_JITTER = 0.5


@dataclass
class OutOfFold:
    """Out-of-fold CNN logits of every real series, and which fold tested it."""

    cache: CachedSet
    logits: np.ndarray  # [slices, 6]; rows of untested (synthetic) series stay 0
    fold_of: dict[int, int]  # series index -> fold
    baseline: dict[int, np.ndarray]  # series index -> the run's own CNN+sequence slice probabilities

    @property
    def folds(self) -> list[int]:
        return sorted(set(self.fold_of.values()))

    def series(self, fold: int, held_out: bool) -> list[int]:
        return sorted(i for i, k in self.fold_of.items() if (k == fold) == held_out)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def load_out_of_fold(run: str | Path) -> OutOfFold:
    """Read a finished CV run's cache and fold results."""
    run = Path(run)
    cache = load_cache(run / "cache")
    logits = np.zeros((cache.labels.shape[0], len(CLASSES)), np.float32)
    fold_of: dict[int, int] = {}
    baseline: dict[int, np.ndarray] = {}
    paths = sorted((run / "cv").glob("fold_*.npz"))
    if not paths:
        raise FileNotFoundError(f"{run / 'cv'}: no finished folds")
    for path in paths:
        k = int(path.stem.split("_")[1])
        with np.load(path) as z:
            ends = np.cumsum(z["lengths"])
            for j, i in enumerate(z["test"]):
                a, b = (int(ends[j - 1]) if j else 0), int(ends[j])
                s = cache.series_slice(int(i))
                if s.stop - s.start != b - a:
                    raise ValueError(f"{path.name}: series {i} has {b - a} slices, the cache {s.stop - s.start}")
                logits[s] = _logit(z["slice_cnn"][a:b])
                baseline[int(i)] = z["slice_seq"][a:b]
                fold_of[int(i)] = k
    return OutOfFold(cache, logits, fold_of, baseline)


@torch.no_grad()
def mirrored_logits(run: str | Path, oof: OutOfFold) -> np.ndarray:
    """The out-of-fold logits averaged with those of the left-right mirrored slices.

    Each fold's CNN (its last checkpoint) scores its own test series mirrored; a CNN trained
    with mirroring should see the same head either way, so the mean is a cheaper ensemble.
    """
    run = Path(run)
    out = oof.logits.copy()
    for k in oof.folds:
        state = torch.load(run / "cv" / f"fold_{k}" / "cnn_last.pt", map_location="cpu", weights_only=False)
        cnn = SliceCNN(state["config"]["backbone"])
        cnn.load_state_dict(state["model"])
        cnn.eval()
        rows = subset_slices(oof.cache, oof.series(k, held_out=True))
        for a in range(0, len(rows), 64):
            r = rows[a : a + 64]
            x = torch.from_numpy(np.asarray(oof.cache.inputs[r], dtype=np.float32)).flip(-1)
            lo, _, _ = cnn(x)
            out[r] = 0.5 * (oof.logits[r] + lo.numpy())
    return out


def stacked_cv(oof: OutOfFold, logits: np.ndarray | None = None, *, epochs: int = 20, hidden: int = STACKED_HIDDEN,
               jitter: float = STACKED_JITTER, seed: int = 0) -> dict[int, np.ndarray]:
    """Slice probabilities of every real series from a sequence model trained on the other folds."""
    logits = oof.logits if logits is None else logits
    no_embedding = np.zeros((logits.shape[0], 0), np.float32)
    out: dict[int, np.ndarray] = {}
    for k in oof.folds:
        cfg = TrainConfig(data="", out="", seq_epochs=epochs, seq_hidden=hidden, seq_use_embedding=False,
                          seq_logit_jitter=jitter, seed=seed + k)
        train_idx, test_idx = oof.series(k, held_out=False), oof.series(k, held_out=True)
        seq, _ = train_sequence(cfg, no_embedding, logits, oof.cache, train_idx)
        probs, _ = series_probs(seq, no_embedding, logits, oof.cache, test_idx)
        out.update(zip(test_idx, probs, strict=True))
    return out


def with_stacked_sequence(run: str | Path, results: list[dict], cfg: TrainConfig) -> list[dict]:
    """The folds' results with ``slice_seq`` from `stacked_cv` instead of each fold's own sequence model."""
    stacked = stacked_cv(load_out_of_fold(run), epochs=cfg.seq_epochs, seed=cfg.seed)
    return [{**r, "slice_seq": np.concatenate([stacked[int(i)] for i in r["test"]])} for r in results]


def final_sequence_model(cfg: TrainConfig, run: str | Path, feature_dim: int) -> tuple[SequenceModel, list[float]]:
    """The shipped sequence model: trained on every real patient's out-of-fold CNN outputs.

    It is served behind the final CNN with the usual ``[embedding, probabilities]`` input
    (``feature_dim`` wide), of which it reads only the probabilities.
    """
    oof = load_out_of_fold(run)
    stacked_cfg = replace(cfg, seq_hidden=STACKED_HIDDEN, seq_logit_jitter=STACKED_JITTER, seq_use_embedding=False)
    no_embedding = np.zeros((oof.logits.shape[0], 0), np.float32)
    model, history = train_sequence(stacked_cfg, no_embedding, oof.logits, oof.cache, sorted(oof.fold_of))
    served = SequenceModel(feature_dim, hidden=STACKED_HIDDEN, cell=cfg.seq_cell, use_embedding=False)
    served.load_state_dict(model.state_dict())
    return served.eval(), history


def cnn_probs(oof: OutOfFold, logits: np.ndarray | None = None) -> dict[int, np.ndarray]:
    logits = oof.logits if logits is None else logits
    return {i: 1.0 / (1.0 + np.exp(-logits[oof.cache.series_slice(i)].astype(np.float64))) for i in oof.fold_of}


def study_scores(oof: OutOfFold, slice_probs: dict[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(study labels [n,6], study scores = max over slices [n,6], fold [n]) in series order."""
    idx = sorted(oof.fold_of)
    y = np.stack([oof.cache.labels[oof.cache.series_slice(i)].max(0) for i in idx])
    p = np.stack([slice_probs[i].max(0) for i in idx])
    return y, p, np.asarray([oof.fold_of[i] for i in idx])


def paired_auc_difference(y: np.ndarray, a: np.ndarray, b: np.ndarray, n_boot: int = 2000,
                          seed: int = 0) -> tuple[float, float, float, float]:
    """AUC(a) - AUC(b) on the same patients, its 95 % bootstrap interval and the share of resamples <= 0."""
    rng = np.random.default_rng(seed)
    diffs: list[float] = []
    n = len(y)
    while len(diffs) < n_boot:
        r = rng.integers(0, n, n)
        if 0 < y[r].sum() < n:
            diffs.append(M.roc_auc(y[r], a[r]) - M.roc_auc(y[r], b[r]))
    d = np.asarray(diffs)
    return (M.roc_auc(y, a) - M.roc_auc(y, b), float(np.quantile(d, 0.025)), float(np.quantile(d, 0.975)),
            float((d <= 0).mean()))

