"""One interface for the inference backends (in-process ONNX Runtime and Triton over gRPC).

The worker pipeline never talks to a runtime directly: it passes ``backend.slice_fn`` and
``backend.sequence_fn`` to :func:`worker.pipeline.inference_core.run_study`. Both backends
serve the same two models, named and shaped as in ``deploy/triton/models``:

``ich_slice_cnn``
    input ``image`` FP32 [B, 3, S, S] -> ``logits`` [B, 6], ``embedding`` [B, F],
    ``features`` [B, C, h, w].
``ich_sequence``
    input ``sequence`` FP32 [1, N, F + 6] -> ``logits`` [1, N, 6].
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

SLICE_MODEL = "ich_slice_cnn"
SEQUENCE_MODEL = "ich_sequence"
SLICE_INPUT = "image"
SLICE_OUTPUTS = ("logits", "embedding", "features")
SEQUENCE_INPUT = "sequence"
SEQUENCE_OUTPUTS = ("logits",)


class InferenceError(RuntimeError):
    """An inference request failed for a reason that retrying will not fix."""


class BackendUnavailable(InferenceError):
    """The backend cannot be reached right now (server down, connection refused, timeout).

    The one transient inference error: Celery retries tasks that raise it, with backoff.
    """


class ModelMismatch(InferenceError):
    """The served models do not match the model card; the worker refuses to run."""


#: Outputs of the slice CNN for one batch: ``{"logits": [B, 6], "embedding": [B, F],
#: "features": [B, C, h, w]}`` (what :func:`worker.pipeline.inference_core.run_study` reads).
SliceOutputs = dict[str, np.ndarray]


@dataclass(frozen=True)
class TensorSpec:
    """Name, datatype (Triton spelling: FP32, INT64, ...) and shape (-1 = dynamic)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def accepts(self, other: TensorSpec) -> bool:
        """True when ``other`` (what a server reports) is compatible with this expectation."""
        if self.name != other.name or self.datatype != other.datatype:
            return False
        if len(self.shape) != len(other.shape):
            return False
        return all(a == -1 or b == -1 or a == b for a, b in zip(self.shape, other.shape, strict=True))

    def __str__(self) -> str:
        return f"{self.name} {self.datatype} [{', '.join(str(d) for d in self.shape)}]"


def expected_specs(card: Any) -> dict[str, dict[str, list[TensorSpec]]]:
    """What the model card says each served model must accept and return.

    Dimensions the card does not fix (batch, number of slices) are -1.

    Parameters
    ----------
    card : worker.inference.card.ModelCard
        Uses ``classes``, ``input_size``, ``embedding_dim``, ``feature_channels``,
        ``feature_map_size`` and the served models' names.
    """
    n = len(card.classes)
    size, fmap = int(card.input_size), int(card.feature_map_size)
    return {
        card.slice_model.name: {
            "inputs": [TensorSpec(SLICE_INPUT, "FP32", (-1, 3, size, size))],
            "outputs": [
                TensorSpec("logits", "FP32", (-1, n)),
                TensorSpec("embedding", "FP32", (-1, int(card.embedding_dim))),
                TensorSpec("features", "FP32", (-1, int(card.feature_channels), fmap, fmap)),
            ],
        },
        card.sequence_model.name: {
            "inputs": [TensorSpec(SEQUENCE_INPUT, "FP32", (-1, -1, int(card.embedding_dim) + n))],
            "outputs": [TensorSpec("logits", "FP32", (-1, -1, n))],
        },
    }


def compare_specs(
    model: str, kind: str, expected: Sequence[TensorSpec], served: Sequence[TensorSpec]
) -> list[str]:
    """Human-readable differences between expected and served tensors (empty: they match)."""
    problems: list[str] = []
    by_name = {s.name: s for s in served}
    for spec in expected:
        got = by_name.get(spec.name)
        if got is None:
            names = ", ".join(sorted(by_name)) or "none"
            problems.append(f"{model}: {kind} {spec.name!r} missing (served {kind}s: {names})")
        elif not spec.accepts(got):
            problems.append(f"{model}: {kind} expected {spec}, served {got}")
    return problems


class InferenceBackend(abc.ABC):
    """A runtime serving ``ich_slice_cnn`` and ``ich_sequence``.

    Subclasses are built once per worker process (``worker_process_init``), checked
    against the model card with :meth:`check`, then called for every study.
    """

    name: str = "?"

    @abc.abstractmethod
    def served_specs(self) -> dict[str, dict[str, list[TensorSpec]]]:
        """Inputs and outputs of each served model, as the runtime reports them."""

    @abc.abstractmethod
    def slice_fn(self, batch: np.ndarray) -> SliceOutputs:
        """Run the slice CNN on ``batch`` float32 [B, 3, S, S]."""

    @abc.abstractmethod
    def sequence_fn(self, seq: np.ndarray) -> np.ndarray:
        """Run the sequence model on ``seq`` float32 [1, N, F + 6]; returns logits [1, N, 6]."""

    def check(self, card: Any) -> None:
        """Refuse to run when the served models do not match the model card.

        Raises
        ------
        ModelMismatch
            Naming every input/output whose name, datatype or shape differs.
        """
        served = self.served_specs()
        problems: list[str] = []
        for model, exp in expected_specs(card).items():
            if model not in served:
                problems.append(f"{model}: not served by the {self.name} backend")
                continue
            for kind in ("inputs", "outputs"):
                problems += compare_specs(model, kind[:-1], exp[kind], served[model][kind])
        if problems:
            version = getattr(card, "version", "?")
            raise ModelMismatch(
                f"the {self.name} backend does not serve the models of model card version "
                f"{version}; refusing to run:\n  " + "\n  ".join(problems)
            )

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the runtime's resources."""

    def __enter__(self) -> InferenceBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
