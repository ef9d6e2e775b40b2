"""Per-series outputs of a trained CNN and sequence model, and what they are scored by.

The sequence model sees one series at a time as ``[embedding, sigmoid(CNN logits)]`` per
slice (`sequence_tensor`); `series_probs` gives each series' slice probabilities with and
without it, and `validate` turns the validation series into operating points and study-level
metrics. Training (`worker.model.train`), cross-validation (`worker.model.crossval`) and a
reloaded run (`worker.model.runs`) all score through here.
"""

from __future__ import annotations

import numpy as np
import torch

from triage_node import CLASSES
from worker.model import metrics as M
from worker.model.data import CachedSet
from worker.model.networks import SequenceModel


def sequence_tensor(emb: np.ndarray, logits: np.ndarray, cache: CachedSet, i: int) -> torch.Tensor:
    """Series ``i`` as the sequence model reads it: [1, slices, embedding + 6 CNN probabilities]."""
    s = cache.series_slice(i)
    probs = 1.0 / (1.0 + np.exp(-logits[s]))
    return torch.from_numpy(np.concatenate([emb[s], probs], axis=1).astype(np.float32))[None]


@torch.no_grad()
def series_probs(seq: SequenceModel, emb: np.ndarray, logits: np.ndarray, cache: CachedSet, idx: list[int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per-series slice probabilities [n_i, 6]: (sequence model, CNN only)."""
    out_seq, out_cnn = [], []
    for i in idx:
        x = sequence_tensor(emb, logits, cache, i)
        out_seq.append(torch.sigmoid(seq(x))[0].numpy().astype(np.float64))
        out_cnn.append(1.0 / (1.0 + np.exp(-logits[cache.series_slice(i)].astype(np.float64))))
    return out_seq, out_cnn


def validate(seq: SequenceModel, emb: np.ndarray, logits: np.ndarray, cache: CachedSet, val_idx: list[int]) -> tuple[dict, dict]:
    """Operating points and study-level metrics on the validation series."""
    y_val = np.stack([cache.labels[cache.series_slice(i)].max(0) for i in val_idx])
    p_seq, p_cnn = series_probs(seq, emb, logits, cache, val_idx)
    study_seq = np.stack([p.max(0) for p in p_seq])
    study_cnn = np.stack([p.max(0) for p in p_cnn])
    ops = M.choose_operating_points(y_val, study_seq)
    val_metrics = {
        "n_series": len(val_idx),
        "study_auc_sequence": {c: M.roc_auc(y_val[:, k], study_seq[:, k]) for k, c in enumerate(CLASSES)},
        "study_auc_cnn": {c: M.roc_auc(y_val[:, k], study_cnn[:, k]) for k, c in enumerate(CLASSES)},
        "study_rsna_log_loss_sequence": M.rsna_log_loss(y_val, study_seq),
        "study_rsna_log_loss_cnn": M.rsna_log_loss(y_val, study_cnn),
    }
    return ops, val_metrics
