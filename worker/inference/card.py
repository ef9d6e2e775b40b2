"""The model card shipped next to the Triton model repository (``deploy/triton/model_card.json``).

It is the one place the worker reads what the served models expect (input variant, size,
windows, feature shapes), how to turn their outputs into a study decision (aggregation and
per-class thresholds at two operating points) and where the CAM head weights are.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from triage_node import CLASSES
from worker.inference.site import SiteThresholds, site_thresholds_for

INTENDED_USE = (
    "Intended use: pipeline verification only. Trained on synthetic phantoms, not on patient "
    "images. Not for clinical use."
)
#: For weights trained on real patient data.
INTENDED_USE_RESEARCH = (
    "Intended use: research and evaluation of triage workflows only. Not a medical device, not for "
    "clinical use, not for diagnosis: every study must still be read by a radiologist in the usual order."
)
OPERATING_POINTS = ("high_sensitivity", "balanced")


class ServedModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    version: int = 1
    input: str
    outputs: tuple[str, ...]


class ModelCard(BaseModel):
    """Validated content of ``model_card.json``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    version: str
    device_uid: str = Field(pattern=r"^[0-9]+(\.[0-9]+)+$", max_length=64)
    created_utc: str
    classes: tuple[str, ...]
    backbone: str
    input_variant: Literal["windows", "adjacent", "mixed"]
    input_size: int = Field(gt=15)
    windows: dict[str, tuple[float, float]]
    channel_plan: tuple[tuple[int, str], ...]
    #: framing of each slice: "centred" (padded square) or "head" (see worker.pipeline.input_frame)
    crop: Literal["centred", "head"] = "centred"
    embedding_dim: int = Field(gt=0)
    feature_channels: int = Field(gt=0)
    feature_map_size: int = Field(gt=0)
    triton_batching: str
    slice_model: ServedModel
    sequence_model: ServedModel
    study_aggregation: Literal["max"] = "max"
    operating_points: dict[str, dict[str, float]]
    cam_head: str
    metrics: dict = Field(default_factory=dict)
    training: dict = Field(default_factory=dict)
    intended_use: str = INTENDED_USE
    path: Path | None = Field(default=None, exclude=True)
    # set by load_model_card from site_thresholds.json; never written into the card
    site: SiteThresholds | None = Field(default=None, exclude=True)

    @field_validator("classes")
    @classmethod
    def _class_order(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if tuple(v) != CLASSES:
            raise ValueError(f"classes must be {CLASSES} in that order, got {v}")
        return v

    @field_validator("intended_use")
    @classmethod
    def _not_clinical(cls, v: str) -> str:
        if "not for clinical use" not in v.lower():
            raise ValueError("intended_use must say 'not for clinical use'")
        return v

    @model_validator(mode="after")
    def _thresholds(self) -> ModelCard:
        for op in OPERATING_POINTS:
            if op not in self.operating_points:
                raise ValueError(f"operating_points lacks {op!r}")
            got = self.operating_points[op]
            if set(got) != set(CLASSES):
                raise ValueError(f"operating_points[{op!r}] must have one threshold per class {CLASSES}")
            for k, t in got.items():
                if not 0.0 <= t <= 1.0:
                    raise ValueError(f"threshold {op}/{k}={t} outside 0..1")
        for _, w in self.channel_plan:
            if w not in self.windows:
                raise ValueError(f"channel_plan names window {w!r} that windows does not define")
        return self

    def thresholds(self, operating_point: str = "high_sensitivity") -> np.ndarray:
        """Per-class thresholds [6] in CLASSES order: the site's when calibrated, else the card's."""
        if operating_point not in self.operating_points:
            raise KeyError(f"unknown operating point {operating_point!r}; have {sorted(self.operating_points)}")
        points = self.site.operating_points if self.site is not None else self.operating_points
        op = points[operating_point]
        return np.asarray([op[c] for c in CLASSES], dtype=np.float64)

    @property
    def threshold_source(self) -> str:
        """Where :meth:`thresholds` comes from: ``model card`` or ``site calibration <digest> (<date>)``."""
        return "model card" if self.site is None else self.site.source

    def head_weights(self) -> tuple[np.ndarray, np.ndarray]:
        """CAM head of the slice CNN: weight [6, C] and bias [6] (``logits = emb @ W.T + b``)."""
        base = self.path.parent if self.path is not None else Path(".")
        with np.load(base / self.cam_head) as z:
            w, b = z["weight"].astype(np.float32), z["bias"].astype(np.float32)
        if w.shape != (len(CLASSES), self.feature_channels):
            raise ValueError(f"CAM head weight shape {w.shape} != (6, {self.feature_channels})")
        return w, b

    def window_names(self) -> tuple[str, str, str]:
        return tuple(w for _, w in self.channel_plan)  # type: ignore[return-value]


def load_model_card(path: str | Path) -> ModelCard:
    """Read and validate a model card; ``path`` may be the JSON file or its directory.

    A ``site_thresholds.json`` beside the card is attached as ``site`` (see
    :mod:`worker.inference.site`); one made for other weights raises ``SiteCalibrationError``.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "model_card.json"
    data = json.loads(p.read_text())
    card = ModelCard(**data, path=p)
    # only the file beside the card sets site thresholds, never a "site" key in the card
    return card.model_copy(update={"site": site_thresholds_for(card)})


def json_safe(obj):
    """NaN/inf -> None, tuples -> lists, numpy scalars -> Python (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_model_card(card: ModelCard, path: str | Path) -> Path:
    p = Path(path)
    p.write_text(json.dumps(json_safe(card.model_dump(mode="json")), indent=2, allow_nan=False) + "\n")
    return p
