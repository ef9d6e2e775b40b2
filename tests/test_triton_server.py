"""The local Triton server (``nvidia-pytriton`` wheel) serves an ONNX repository over gRPC,
through the Python API and through ``triage-node triton serve``."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from triage_node.peers import free_port
from worker.inference.triton_repository import TritonServerError, build_python_repository, read_model_config
from worker.inference.triton_server import TritonServer

# The tiny test models use the TorchScript ONNX exporter (no onnxscript needed).
pytestmark = [
    pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export"),
    pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning"),
]

SIZE = 32  # S: image side
FEATURES = 8  # F: embedding width
CHANNELS = 4  # C: feature-map channels

SLICE_CONFIG = f"""
name: "ich_slice_cnn"
backend: "onnxruntime"
max_batch_size: 0
input [ {{ name: "image" data_type: TYPE_FP32 dims: [ -1, 3, {SIZE}, {SIZE} ] }} ]
output [
  {{ name: "logits" data_type: TYPE_FP32 dims: [ -1, 6 ] }},
  {{ name: "embedding" data_type: TYPE_FP32 dims: [ -1, {FEATURES} ] }},
  {{ name: "features" data_type: TYPE_FP32 dims: [ -1, {CHANNELS}, -1, -1 ] }}
]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
"""

SEQUENCE_CONFIG = f"""
name: "ich_sequence"
platform: "onnxruntime_onnx"
max_batch_size: 0
input [ {{ name: "sequence" data_type: TYPE_FP32 dims: [ -1, -1, {FEATURES + 6} ] }} ]
output [ {{ name: "logits" data_type: TYPE_FP32 dims: [ -1, -1, 6 ] }} ]
"""


class TinySliceCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, CHANNELS, 3, stride=2, padding=1)
        self.embed = torch.nn.Linear(CHANNELS, FEATURES)
        self.head = torch.nn.Linear(FEATURES, 6)

    def forward(self, image: torch.Tensor):
        features = torch.relu(self.conv(image))
        embedding = torch.tanh(self.embed(features.mean(dim=(2, 3))))
        return self.head(embedding), embedding, features


class TinySequence(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv1d(FEATURES + 6, 6, 3, padding=1)

    def forward(self, sequence: torch.Tensor) -> torch.Tensor:
        return self.conv(sequence.transpose(1, 2)).transpose(1, 2)


def _export(model: torch.nn.Module, example: torch.Tensor, path: Path, inputs, outputs, axes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    torch.onnx.export(
        model, (example,), str(path), input_names=inputs, output_names=outputs,
        dynamic_axes=axes, opset_version=17, dynamo=False,
    )


@pytest.fixture(scope="module")
def onnx_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    repo = tmp_path_factory.mktemp("triton") / "models"
    _export(
        TinySliceCNN(), torch.randn(2, 3, SIZE, SIZE), repo / "ich_slice_cnn" / "1" / "model.onnx",
        ["image"], ["logits", "embedding", "features"],
        {"image": {0: "n"}, "logits": {0: "n"}, "embedding": {0: "n"}, "features": {0: "n"}},
    )
    (repo / "ich_slice_cnn" / "config.pbtxt").write_text(SLICE_CONFIG)
    _export(
        TinySequence(), torch.randn(1, 5, FEATURES + 6), repo / "ich_sequence" / "1" / "model.onnx",
        ["sequence"], ["logits"], {"sequence": {0: "b", 1: "n"}, "logits": {0: "b", 1: "n"}},
    )
    (repo / "ich_sequence" / "config.pbtxt").write_text(SEQUENCE_CONFIG)
    return repo


def test_python_twin_keeps_name_io_and_batching(onnx_repository: Path, tmp_path: Path) -> None:
    names = build_python_repository(onnx_repository, tmp_path / "twin")
    assert names == ["ich_sequence", "ich_slice_cnn"]
    config = read_model_config(tmp_path / "twin" / "ich_slice_cnn" / "config.pbtxt")
    assert config.backend == "python" and config.platform == ""
    assert config.max_batch_size == 0
    assert [i.name for i in config.input] == ["image"]
    assert list(config.input[0].dims) == [-1, 3, SIZE, SIZE]
    assert [o.name for o in config.output] == ["logits", "embedding", "features"]
    version = tmp_path / "twin" / "ich_slice_cnn" / "1"
    assert (version / "model.py").exists()
    assert (version / "model.onnx").resolve() == (onnx_repository / "ich_slice_cnn" / "1" / "model.onnx").resolve()


def test_repository_without_models_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(TritonServerError, match="no model"):
        build_python_repository(tmp_path / "empty", tmp_path / "twin")


def test_triton_grpc_matches_onnxruntime(onnx_repository: Path, triton_server) -> None:
    import tritonclient.grpc as grpcclient

    server: TritonServer = triton_server(onnx_repository, threads=1)
    rng = np.random.default_rng(1)
    image = rng.standard_normal((3, 3, SIZE, SIZE)).astype(np.float32)
    sequence = rng.standard_normal((1, 7, FEATURES + 6)).astype(np.float32)

    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        assert client.is_server_live() and client.is_server_ready()
        meta = client.get_model_metadata("ich_slice_cnn", as_json=True)
        assert [o["name"] for o in meta["outputs"]] == ["logits", "embedding", "features"]

        inp = grpcclient.InferInput("image", list(image.shape), "FP32")
        inp.set_data_from_numpy(image)
        names = ["logits", "embedding", "features"]
        result = client.infer(
            "ich_slice_cnn", [inp], outputs=[grpcclient.InferRequestedOutput(n) for n in names],
            client_timeout=30,
        )
        got = {n: result.as_numpy(n) for n in names}

        seq_in = grpcclient.InferInput("sequence", list(sequence.shape), "FP32")
        seq_in.set_data_from_numpy(sequence)
        seq_logits = client.infer("ich_sequence", [seq_in], client_timeout=30).as_numpy("logits")
    finally:
        client.close()

    session = ort.InferenceSession(
        str(onnx_repository / "ich_slice_cnn" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    expected = dict(zip(names, session.run(names, {"image": image}), strict=True))
    assert got["logits"].shape == (3, 6)
    assert got["embedding"].shape == (3, FEATURES)
    assert got["features"].shape == (3, CHANNELS, SIZE // 2, SIZE // 2)
    for name in names:
        assert np.max(np.abs(got[name] - expected[name])) < 1e-5, name

    log = server.log_path.read_text()
    assert "Traceback" not in log and "Error" not in log, server.log_tail()

    seq_session = ort.InferenceSession(
        str(onnx_repository / "ich_sequence" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    (seq_expected,) = seq_session.run(["logits"], {"sequence": sequence})
    assert seq_logits.shape == (1, 7, 6)
    assert np.max(np.abs(seq_logits - seq_expected)) < 1e-5


def test_bad_model_fails_start_with_log(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    (repo / "ich_sequence" / "1").mkdir(parents=True)
    (repo / "ich_sequence" / "1" / "model.onnx").write_bytes(b"not an onnx file")
    (repo / "ich_sequence" / "config.pbtxt").write_text(SEQUENCE_CONFIG)
    server = TritonServer(repo, start_timeout=60)
    with pytest.raises(TritonServerError, match="ich_sequence"):
        server.start()
    assert server.process is None


def test_triage_node_has_triton_serve_with_help() -> None:
    from triage_node.cli import build_app

    result = CliRunner().invoke(build_app(), ["triton", "serve", "--help"])
    assert result.exit_code == 0, result.output
    for option in ("--repository", "--grpc-port", "--http-port"):
        assert option in result.output


def test_serve_answers_grpc_then_stops_on_sigterm(onnx_repository: Path) -> None:
    import tritonclient.grpc as grpcclient

    grpc_port, http_port = free_port(), free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "triage-node"), "triton", "serve",
         "--repository", str(onnx_repository), "--grpc-port", str(grpc_port),
         "--http-port", str(http_port), "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 90
        line = ""
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if line.startswith("Triton ready") or not line and proc.poll() is not None:
                break
        assert line.startswith("Triton ready"), line + (proc.stdout.read() if proc.poll() is not None else "")
        assert f"127.0.0.1:{grpc_port}" in line

        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        image = np.zeros((1, 3, SIZE, SIZE), np.float32)
        inp = grpcclient.InferInput("image", list(image.shape), "FP32")
        inp.set_data_from_numpy(image)
        logits = client.infer("ich_slice_cnn", [inp], client_timeout=30).as_numpy("logits")
        assert logits.shape == (1, 6) and np.isfinite(logits).all()
        client.close()

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", grpc_port)) != 0  # the server went with it
