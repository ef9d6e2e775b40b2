"""Inference on a Triton Inference Server over gRPC (``tritonclient.grpc``).

At start the backend checks that the server is live and ready, that both models are
ready, that each model's configuration carries the name of its folder, and (through
:meth:`InferenceBackend.check`) that the inputs and outputs in the model metadata match
the model card, as Triton's ``image_client.py`` does before its first request. gRPC is
used because the HTTP client is not thread-safe.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from triage_node.logs import get_logger
from worker.inference.base import (
    SEQUENCE_INPUT,
    SEQUENCE_MODEL,
    SLICE_INPUT,
    SLICE_MODEL,
    SLICE_OUTPUTS,
    BackendUnavailable,
    InferenceBackend,
    InferenceError,
    ModelMismatch,
    SliceOutputs,
    TensorSpec,
)

log = get_logger(__name__)

#: gRPC status codes that mean "try again later" rather than "this request is wrong".
_TRANSIENT_GRPC = {"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.RESOURCE_EXHAUSTED"}


def _translate(exc: Exception, what: str) -> InferenceError:
    """Turn a tritonclient exception into the worker's own (STYLE.md 11)."""
    status = str(getattr(exc, "status", lambda: None)() or "")
    message = getattr(exc, "message", lambda: str(exc))() or str(exc)
    if status in _TRANSIENT_GRPC or "failed to connect" in message.lower() or "unavailable" in message.lower():
        return BackendUnavailable(f"triton: {what}: {message}")
    return InferenceError(f"triton: {what}: {message}")


class TritonBackend(InferenceBackend):
    """Client of one Triton server.

    Parameters
    ----------
    url : str
        gRPC ``host:port`` (``settings.triton_url``).
    timeout : float
        Seconds allowed for each request (also for the start-up checks).

    Raises
    ------
    BackendUnavailable
        Server not live/ready or a model not ready.
    ModelMismatch
        A model's configuration is not named after its folder.
    """

    name = "triton"

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        self._grpc = grpcclient
        self._exc = InferenceServerException
        self.url = url
        self.timeout = float(timeout)
        self.client = grpcclient.InferenceServerClient(url=url)
        try:
            live = self.client.is_server_live(client_timeout=self.timeout)
            ready = live and self.client.is_server_ready(client_timeout=self.timeout)
        except InferenceServerException as exc:
            raise BackendUnavailable(f"triton at {url} cannot be reached: {exc.message()}") from None
        if not (live and ready):
            raise BackendUnavailable(f"triton at {url}: server live={live} ready={ready}")
        for model in (SLICE_MODEL, SEQUENCE_MODEL):
            try:
                model_ready = self.client.is_model_ready(model, client_timeout=self.timeout)
            except InferenceServerException as exc:
                raise _translate(exc, f"is_model_ready({model})") from None
            if not model_ready:
                raise BackendUnavailable(f"triton at {url}: model {model!r} is not ready (is it in the repository?)")
            config = self._call("get_model_config", model, as_json=True)
            config_name = config.get("config", config).get("name")
            if config_name != model:
                raise ModelMismatch(
                    f"triton at {url}: folder {model!r} holds a configuration named {config_name!r}"
                )
        log.info("triton_backend_ready", url=url)

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self.client, method)(*args, client_timeout=self.timeout, **kwargs)
        except self._exc as exc:
            raise _translate(exc, method) from None

    def served_specs(self) -> dict[str, dict[str, list[TensorSpec]]]:
        out: dict[str, dict[str, list[TensorSpec]]] = {}
        for model in (SLICE_MODEL, SEQUENCE_MODEL):
            meta = self._call("get_model_metadata", model, as_json=True)
            out[model] = {
                kind: [
                    TensorSpec(t["name"], t["datatype"], tuple(int(d) for d in t.get("shape", [])))
                    for t in meta.get(kind, [])
                ]
                for kind in ("inputs", "outputs")
            }
        return out

    def _infer(self, model: str, input_name: str, array: np.ndarray, outputs: tuple[str, ...]) -> list[np.ndarray]:
        array = np.ascontiguousarray(array, dtype=np.float32)
        inp = self._grpc.InferInput(input_name, list(array.shape), "FP32")
        inp.set_data_from_numpy(array)
        requested = [self._grpc.InferRequestedOutput(name) for name in outputs]
        result = self._call("infer", model, [inp], outputs=requested)
        return [result.as_numpy(name) for name in outputs]

    def slice_fn(self, batch: np.ndarray) -> SliceOutputs:
        return dict(zip(SLICE_OUTPUTS, self._infer(SLICE_MODEL, SLICE_INPUT, batch, SLICE_OUTPUTS), strict=True))

    def sequence_fn(self, seq: np.ndarray) -> np.ndarray:
        (logits,) = self._infer(SEQUENCE_MODEL, SEQUENCE_INPUT, seq, ("logits",))
        return logits

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # noqa: BLE001 - closing a dead channel is not an error worth raising
            pass
