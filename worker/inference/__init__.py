"""Inference backends: ``onnx`` (ONNX Runtime in the worker) and ``triton`` (gRPC).

Use :func:`make_backend` to build the one named in the settings.
"""

from __future__ import annotations

from typing import Any

from worker.inference.base import (
    BackendUnavailable,
    InferenceBackend,
    InferenceError,
    ModelMismatch,
    SliceOutputs,
    TensorSpec,
)

__all__ = [
    "BackendUnavailable",
    "InferenceBackend",
    "InferenceError",
    "ModelMismatch",
    "SliceOutputs",
    "TensorSpec",
    "make_backend",
]


def make_backend(settings: Any, card: Any | None = None) -> InferenceBackend:
    """Build the backend named by ``settings.inference_backend`` and check it against ``card``.

    Parameters
    ----------
    settings : Settings
        Uses ``inference_backend``, ``model_repository``, ``triton_url``,
        ``inference_threads`` and ``inference_timeout_s``.
    card : ModelCard, optional
        When given, :meth:`InferenceBackend.check` runs and a mismatch raises
        `ModelMismatch` (the worker then refuses to start).
    """
    kind = str(getattr(settings.inference_backend, "value", settings.inference_backend))
    if kind == "onnx":
        from worker.inference.onnx_backend import OnnxBackend

        backend: InferenceBackend = OnnxBackend(
            settings.model_repository, threads=getattr(settings, "inference_threads", 2)
        )
    elif kind == "triton":
        try:
            from worker.inference.triton_backend import TritonBackend
        except ModuleNotFoundError as exc:
            raise RuntimeError(f"inference_backend triton needs the [triton] extra (pip install '.[triton]'): {exc}") from exc

        backend = TritonBackend(settings.triton_url, timeout=getattr(settings, "inference_timeout_s", 30.0))
    else:
        raise ValueError(f"unknown inference backend {kind!r}; expected onnx or triton")
    if card is not None:
        try:
            backend.check(card)
        except Exception:
            backend.close()
            raise
    return backend
