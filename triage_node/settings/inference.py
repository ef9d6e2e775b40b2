"""Inference settings: the backend (ONNX Runtime or Triton), the models, the worker, and its monitoring."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field, field_validator

from triage_node.setting_types import InferenceBackend, OperatingPoint
from triage_node.settings import REPO_ROOT

DEFAULT_MODEL_REPOSITORY = REPO_ROOT / "deploy" / "triton" / "models"
DEFAULT_MODEL_CARD = REPO_ROOT / "deploy" / "triton" / "model_card.json"


class InferenceSettings(BaseModel):
    # -- inference -----------------------------------------------------------
    inference_backend: InferenceBackend = Field(
        InferenceBackend.onnx, description="onnx (in-process) or triton (gRPC)"
    )
    triton_url: str = Field("127.0.0.1:8001", description="Triton gRPC host:port")
    model_repository: Path = Field(
        DEFAULT_MODEL_REPOSITORY, description="Triton-layout model repository with model_card.json"
    )
    model_card: Path = Field(
        DEFAULT_MODEL_CARD, description="model_card.json of the served models"
    )
    operating_point: OperatingPoint = Field(
        OperatingPoint.high_sensitivity, description="high_sensitivity or balanced"
    )
    key_slices_per_class: int = Field(
        2, ge=1, le=10, description="Overlay images per positive class"
    )
    inference_threads: int = Field(
        2, ge=1, le=64, description="ONNX Runtime intra-op threads in each worker process"
    )
    inference_timeout_s: float = Field(
        30.0, gt=0, description="Timeout of each Triton request and start-up check (seconds)"
    )
    task_time_limit_s: int = Field(
        300, ge=10, description="Hard time limit of one triage task; the soft limit is 30 s less"
    )
    reconcile_interval_s: float = Field(
        30.0, ge=1.0, le=3600.0,
        description="Seconds between the beat's sweeps of stuck jobs (stale, never sent, lost by the broker)",
    )
    worker_concurrency: int = Field(
        1, ge=1, le=32, description="Worker processes of `triage-node worker` (each loads the models)"
    )

    # -- monitoring ----------------------------------------------------------------
    worker_metrics_port: int = Field(
        0, ge=0, le=65535,
        description="Port of the worker's own /metrics (latency histograms, deliveries), "
        "summed over its pool processes; 0: not served",
    )
    worker_metrics_host: str = Field(
        "127.0.0.1", description="Address the worker's /metrics binds (no token: counts only); "
        "0.0.0.0 in a container on the monitoring network",
    )
    expected_positive_rate: dict[str, float] = Field(
        default_factory=dict,
        description="Expected share of positive studies per class at the operating point (JSON, "
        'e.g. {"any": 0.66}); overrides the model card\'s expected_positive_rate',
    )
    positive_rate_band: float = Field(
        2.0, gt=1.0, le=100.0,
        description="The positive rate alarm fires outside expected/band .. expected*band",
    )

    @field_validator("expected_positive_rate")
    @classmethod
    def _rates_are_shares(cls, value: dict[str, float]) -> dict[str, float]:
        bad = sorted(k for k, v in value.items() if not 0.0 < v < 1.0)
        if bad:
            raise ValueError(f"expected_positive_rate must be between 0 and 1 (exclusive): {', '.join(bad)}")
        return value
