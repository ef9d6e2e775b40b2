"""Finished training runs: load their models, and choose their operating points again."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from worker.model.data import load_cache
from worker.model.networks import SequenceModel, SliceCNN
from worker.model.series_eval import validate
from worker.model.train import TrainConfig, extract, split_series
from worker.pipeline.preprocess import DEFAULT_WINDOWS


def load_run(run: str | Path) -> tuple[TrainConfig, SliceCNN, SequenceModel]:
    """Config and trained models of a finished run folder."""
    run = Path(run)
    data = json.loads((run / "config.json").read_text())
    data["windows"] = tuple(data.get("windows", DEFAULT_WINDOWS))
    cfg = TrainConfig(**data)
    cnn = SliceCNN(cfg.backbone)
    cnn.load_state_dict(torch.load(run / "cnn_final.pt", map_location="cpu"))
    seq = SequenceModel(cnn.feature_dim, hidden=cfg.seq_hidden, cell=cfg.seq_cell)
    seq.load_state_dict(torch.load(run / "sequence_final.pt", map_location="cpu"))
    return cfg, cnn.eval(), seq.eval()


def reselect_operating_points(run: str | Path) -> tuple[dict, dict]:
    """Choose the operating points again on a finished run's validation series (same split).

    For when the selection rule changes after training: the models are not touched.
    """
    cfg, cnn, seq = load_run(run)
    torch.set_num_threads(cfg.threads)
    cache = load_cache(cfg.cache_dir or Path(run) / "cache")
    _, val_idx = split_series(cache, cfg.val_fraction, cfg.seed)
    if not val_idx:
        raise ValueError(
            f"{run} held out no validation patients (after --cv it trains on every patient): its operating "
            "points come from the cross-validation's out-of-fold predictions (cv/predictions.npz)"
        )
    emb, logits = extract(cnn, cache, series_idx=val_idx)
    return validate(seq, emb, logits, cache, val_idx)
