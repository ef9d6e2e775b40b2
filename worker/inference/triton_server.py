"""A local Triton Inference Server from the ``nvidia-pytriton`` wheel, CPU included.

The production path uses the official Triton image, which serves ``deploy/triton/models``
with the ONNX Runtime backend. The ``nvidia-pytriton==0.7.0`` wheel (the ``triton``
extra) ships a real Triton 2.51 ``tritonserver`` binary but only the Python backend, so
:class:`TritonServer` serves the same ONNX files through a generated repository:

* for each ``<repo>/<name>/config.pbtxt`` with the ``onnxruntime`` backend (or the
  ``onnxruntime_onnx`` platform), ``<tmp>/models/<name>/config.pbtxt`` keeps the name,
  ``max_batch_size``, inputs, outputs and batching but says ``backend: "python"``, and
  each ``<version>/`` holds a ``model.py`` running the ONNX file with ONNX Runtime on CPU
  next to a link to the original ``model.onnx`` (models of other backends are linked
  unchanged);
* the wheel's ``backends/`` folder is copied to ``<tmp>/backends`` with the Python-backend
  stub for this interpreter (``python_backend_stubs/3.X/triton_python_backend_stub``)
  added, so the installed wheel is never modified;
* ``LD_LIBRARY_PATH`` starts with this interpreter's libpython directory (the stub must
  load the same libpython as the standard library it imports), then the wheel's
  ``nvidia_pytriton.libs``; ``TRIAGE_TRITON_SYS_PATH`` carries this interpreter's
  ``sys.path`` into ``model.py`` (the stub ignores ``PYTHONPATH``) so it finds NumPy and
  ONNX Runtime in the virtual environment.

Clients talk to it exactly as to the official server, over gRPC (KServe v2 protocol).
The generated repository is written by ``worker.inference.triton_repository``; this
module runs the server on it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from types import TracebackType

from triage_node.logs import get_logger
from worker.inference.triton_repository import TritonServerError, build_python_repository

log = get_logger(__name__)

START_TIMEOUT_S = 60.0

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def find_wheel() -> tuple[Path, Path]:
    """Return ``(tritonserver_dir, libs_dir)`` of the installed ``nvidia-pytriton`` wheel.

    Raises
    ------
    TritonServerError
        When the wheel is not installed.
    """
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonServerError(
            "nvidia-pytriton is not installed: .venv/bin/pip install --no-deps nvidia-pytriton==0.7.0"
        )
    package = Path(next(iter(spec.submodule_search_locations)))
    server_dir = package / "tritonserver"
    libs_dir = package.parent / "nvidia_pytriton.libs"
    if not (server_dir / "bin" / "tritonserver").exists():
        raise TritonServerError(f"no tritonserver binary under {server_dir}")
    return server_dir, libs_dir


class TritonServer:
    """Run ``tritonserver`` from the ``nvidia-pytriton`` wheel on a model repository.

    Parameters
    ----------
    repository : str or Path
        Model repository in the official layout (ONNX Runtime backend).
    grpc_port, http_port : int, optional
        Ports on 127.0.0.1 (free ones when omitted).
    start_timeout : float
        Seconds to wait for the server and every model to become ready.
    threads : int
        ONNX Runtime intra-op threads per model instance.

    Examples
    --------
    >>> with TritonServer("deploy/triton/models") as server:    # doctest: +SKIP
    ...     client = tritonclient.grpc.InferenceServerClient(server.grpc_url)
    """

    def __init__(
        self,
        repository: str | Path,
        grpc_port: int | None = None,
        http_port: int | None = None,
        *,
        host: str = "127.0.0.1",
        start_timeout: float = START_TIMEOUT_S,
        threads: int = 2,
    ) -> None:
        self.repository = Path(repository)
        self.host = host
        self.grpc_port = grpc_port or _free_port()
        self.http_port = http_port or _free_port()
        while self.http_port == self.grpc_port:
            self.http_port = _free_port()
        self.start_timeout = start_timeout
        self.threads = threads
        self.models: list[str] = []
        self.process: subprocess.Popen | None = None
        self._workdir: Path | None = None

    @property
    def grpc_url(self) -> str:
        """``host:port`` for ``tritonclient.grpc.InferenceServerClient``."""
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def log_path(self) -> Path | None:
        return self._workdir / "tritonserver.log" if self._workdir else None

    def _prepare(self, workdir: Path) -> tuple[list[str], dict[str, str]]:
        server_dir, libs_dir = find_wheel()
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = server_dir / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.exists():
            raise TritonServerError(f"the wheel has no Python-backend stub for Python {version}")
        backends = workdir / "backends"
        shutil.copytree(server_dir / "backends", backends, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(stub, backends / "python" / stub.name)
        self.models = build_python_repository(self.repository, workdir / "models")

        env = dict(os.environ)
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (libdir, str(libs_dir), env.get("LD_LIBRARY_PATH", "")) if p
        )
        env["TRIAGE_TRITON_SYS_PATH"] = os.pathsep.join(
            p for p in sys.path if p and Path(p).is_dir()
        )
        env["TRIAGE_TRITON_THREADS"] = str(self.threads)
        env.setdefault("OMP_NUM_THREADS", str(self.threads))
        command = [
            str(server_dir / "bin" / "tritonserver"),
            f"--model-repository={workdir / 'models'}",
            f"--backend-directory={backends}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            "--allow-metrics=false",
            "--allow-gpu-metrics=false",
            "--strict-readiness=true",
            "--exit-on-error=true",
            "--exit-timeout-secs=10",
            "--log-verbose=0",
            "--backend-config=python,shm-default-byte-size=16777216",
            "--backend-config=python,shm-growth-byte-size=16777216",
        ]
        return command, env

    def start(self) -> TritonServer:
        """Start the server and wait until it and every model are ready."""
        if self.process is not None and self.process.poll() is None:
            return self
        self._workdir = Path(tempfile.mkdtemp(prefix="triage-triton-"))
        try:
            command, env = self._prepare(self._workdir)
            with open(self._workdir / "tritonserver.log", "ab") as out:
                self.process = subprocess.Popen(
                    command,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=self._workdir,
                    start_new_session=True,  # stubs share the group; stop() ends them all
                )
            log.info("triton_starting", grpc_url=self.grpc_url, models=self.models)
            started = time.monotonic()
            self._wait_ready()
            log.info("triton_ready", grpc_url=self.grpc_url, seconds=round(time.monotonic() - started, 2))
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        deadline = time.monotonic() + self.start_timeout
        client = grpcclient.InferenceServerClient(self.grpc_url)
        try:
            while True:
                if self.process is None or self.process.poll() is not None:
                    raise TritonServerError(f"tritonserver exited early:\n{self.log_tail()}")
                try:
                    if client.is_server_ready(client_timeout=2) and all(
                        client.is_model_ready(name, client_timeout=2) for name in self.models
                    ):
                        return
                except InferenceServerException:
                    pass
                if time.monotonic() > deadline:
                    raise TritonServerError(
                        f"tritonserver not ready after {self.start_timeout:.0f} s:\n{self.log_tail()}"
                    )
                time.sleep(0.2)
        finally:
            client.close()

    def log_tail(self, lines: int = 15) -> str:
        """Error lines and the last lines of the server's log (model load failures)."""
        path = self.log_path
        if path is None or not path.exists():
            return "(no log)"
        text = path.read_text(errors="replace").splitlines()
        errors = [
            line for line in text
            if line.startswith("E") or "UNAVAILABLE" in line or "Error" in line
        ]
        return "\n".join([*errors[-20:], "...", *text[-lines:]])

    def wait(self) -> int:
        """Block until the server exits; return its exit status."""
        if self.process is None:
            raise TritonServerError("server not started")
        return self.process.wait()

    def stop(self) -> None:
        """Stop the server (SIGTERM to its process group, SIGKILL after 20 s) and clean up."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
            except ProcessLookupError:
                pass
        if process is not None:
            # Python-backend stubs left behind in the group (server killed mid-start).
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            log.info("triton_stopped", grpc_url=self.grpc_url)
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
