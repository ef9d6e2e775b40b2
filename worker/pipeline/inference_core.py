"""Backend-neutral inference for one study: slice CNN in batches, sequence model, decision.

The backends (ONNX Runtime in process, Triton over gRPC) supply two callables with the
served models' signatures; everything else is plain numpy, so both backends give the same
answer for the same inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from triage_node import CLASSES
from worker.inference.card import ModelCard
from worker.pipeline.input_frame import InputFrame
from worker.pipeline.preprocess import series_inputs

SliceFn = Callable[[np.ndarray], Mapping[str, np.ndarray]]
SequenceFn = Callable[[np.ndarray], np.ndarray]


def sigmoid(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return np.where(x >= 0, 1.0 / (1.0 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1.0 + np.exp(-np.abs(x))))


@dataclass(frozen=True)
class StudyPrediction:
    """Result of :func:`run_study`.

    Attributes
    ----------
    slice_probs : ndarray [N, 6]      sequence-model probability per slice
    cnn_slice_probs : ndarray [N, 6]  CNN-only probability per slice
    study_probs : ndarray [6]         aggregated (max over slices) sequence probabilities
    cnn_study_probs : ndarray [6]     aggregated CNN-only probabilities
    features : ndarray [N, C, h, w]   CNN feature maps for heat maps
    thresholds : ndarray [6]          thresholds of ``operating_point``
    decision : dict[str, bool]        study_probs >= thresholds, per class name
    key_slices : dict[str, int]       slice index of the highest probability, per class
    operating_point : str
    """

    slice_probs: np.ndarray
    cnn_slice_probs: np.ndarray
    study_probs: np.ndarray
    cnn_study_probs: np.ndarray
    features: np.ndarray
    thresholds: np.ndarray
    decision: dict[str, bool]
    key_slices: dict[str, int]
    operating_point: str

    @property
    def positive(self) -> bool:
        """Study flagged for hemorrhage (the ``any`` class)."""
        return bool(self.decision["any"])


def aggregate(slice_probs: np.ndarray, rule: str = "max") -> np.ndarray:
    """Study probability per class from per-slice probabilities [N, 6]."""
    if rule != "max":
        raise ValueError(f"unknown aggregation {rule!r}")
    return np.asarray(slice_probs, dtype=np.float64).max(axis=0)


def card_inputs(volume, card: ModelCard) -> tuple[np.ndarray, InputFrame]:
    """The inputs the card's models expect for a volume (channel plan, windows, size, framing), and their frame."""
    return series_inputs(volume, card.channel_plan, card.windows, card.input_size, card.crop)


def run_study(
    volume_inputs: np.ndarray,
    slice_fn: SliceFn,
    sequence_fn: SequenceFn,
    card: ModelCard,
    operating_point: str = "high_sensitivity",
    batch_size: int = 8,
) -> StudyPrediction:
    """Run both models on one series' inputs and decide at an operating point.

    Parameters
    ----------
    volume_inputs : ndarray float32 [N, 3, S, S]
        From :func:`worker.pipeline.preprocess.make_inputs` with the card's variant and size.
    slice_fn : callable
        ``batch [B,3,S,S] -> {"logits": [B,6], "embedding": [B,F], "features": [B,C,h,w]}``.
    sequence_fn : callable
        ``sequence [1,N,F+6] -> logits [1,N,6]``.
    card : ModelCard
    operating_point : {"high_sensitivity", "balanced"}
    batch_size : int
        CNN batch size (8-16 on CPU).
    """
    x = np.ascontiguousarray(volume_inputs, dtype=np.float32)
    if x.ndim != 4 or x.shape[1:] != (3, card.input_size, card.input_size):
        raise ValueError(f"inputs must be [N,3,{card.input_size},{card.input_size}], got {x.shape}")
    if x.shape[0] == 0:
        raise ValueError("no slices")
    logits, emb, feats = [], [], []
    for start in range(0, x.shape[0], batch_size):
        out = slice_fn(x[start : start + batch_size])
        logits.append(np.asarray(out["logits"], dtype=np.float32))
        emb.append(np.asarray(out["embedding"], dtype=np.float32))
        feats.append(np.asarray(out["features"], dtype=np.float32))
    cnn_probs = sigmoid(np.concatenate(logits))
    embedding = np.concatenate(emb)
    features = np.concatenate(feats)
    seq = np.concatenate([embedding, cnn_probs.astype(np.float32)], axis=1)[None]
    seq_logits = np.asarray(sequence_fn(seq.astype(np.float32)))
    if seq_logits.shape != (1, x.shape[0], len(CLASSES)):
        raise ValueError(f"sequence model returned {seq_logits.shape}, expected (1, {x.shape[0]}, 6)")
    slice_probs = sigmoid(seq_logits[0])
    study = aggregate(slice_probs, card.study_aggregation)
    thr = card.thresholds(operating_point)
    return StudyPrediction(
        slice_probs=slice_probs,
        cnn_slice_probs=cnn_probs,
        study_probs=study,
        cnn_study_probs=aggregate(cnn_probs, card.study_aggregation),
        features=features,
        thresholds=thr,
        decision={c: bool(study[i] >= thr[i]) for i, c in enumerate(CLASSES)},
        key_slices={c: int(np.argmax(slice_probs[:, i])) for i, c in enumerate(CLASSES)},
        operating_point=operating_point,
    )


def onnx_callables(model_dir: str, threads: int = 2) -> tuple[SliceFn, SequenceFn]:
    """ONNX Runtime callables for a Triton-layout model repository (``<dir>/models/<name>/1/model.onnx``).

    A convenience for evaluation and tests; the worker's backends wrap the same files.
    """
    from pathlib import Path

    import onnxruntime as ort

    root = Path(model_dir)
    models = root / "models" if (root / "models").is_dir() else root
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    cnn = ort.InferenceSession(str(models / "ich_slice_cnn" / "1" / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    seq = ort.InferenceSession(str(models / "ich_sequence" / "1" / "model.onnx"), opts, providers=["CPUExecutionProvider"])

    def slice_fn(batch: np.ndarray) -> dict[str, np.ndarray]:
        lo, em, fe = cnn.run(["logits", "embedding", "features"], {"image": batch})
        return {"logits": lo, "embedding": em, "features": fe}

    def sequence_fn(s: np.ndarray) -> np.ndarray:
        return seq.run(["logits"], {"sequence": s})[0]

    return slice_fn, sequence_fn
