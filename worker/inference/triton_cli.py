"""``triage-node triton serve``: a local Triton server for the ``triton`` backend.

Serves the ONNX model repository (``deploy/triton/models`` by default) with the Triton
2.51 binary from the ``nvidia-pytriton`` wheel (see :mod:`worker.inference.triton_server`),
so the Triton path runs on any machine, CPU included. Point the worker at it with
``TRIAGE_INFERENCE_BACKEND=triton TRIAGE_TRITON_URL=127.0.0.1:8001``.
"""

from __future__ import annotations

import signal
from pathlib import Path

import typer

from triage_node.config import DEFAULT_MODEL_CARD, DEFAULT_MODEL_REPOSITORY

triton_app = typer.Typer(help="Local Triton Inference Server (from the nvidia-pytriton wheel).",
                         no_args_is_help=True)


@triton_app.callback()
def triton_group() -> None:
    """Local Triton Inference Server (from the nvidia-pytriton wheel)."""


@triton_app.command("serve")
def serve(
    repository: Path = typer.Option(
        DEFAULT_MODEL_REPOSITORY, "--repository", "-r",
        help="Triton model repository with ONNX models (official layout).",
    ),
    grpc_port: int = typer.Option(8001, "--grpc-port", min=1, max=65535, help="gRPC port."),
    http_port: int = typer.Option(8000, "--http-port", min=1, max=65535, help="HTTP/REST port."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    threads: int = typer.Option(2, "--threads", min=1, max=64,
                                help="ONNX Runtime intra-op threads per model."),
    start_timeout: float = typer.Option(60.0, "--start-timeout", min=1.0,
                                        help="Seconds to wait for the models to be ready."),
) -> None:
    """Serve the model repository over gRPC and HTTP until interrupted (Ctrl-C)."""
    from worker.inference.triton_repository import TritonServerError
    from worker.inference.triton_server import TritonServer

    server = TritonServer(repository, grpc_port=grpc_port, http_port=http_port, host=host,
                          start_timeout=start_timeout, threads=threads)

    def _terminate(signum, frame):  # noqa: ARG001 - signal handler signature
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        server.start()
        typer.echo(
            f"Triton ready: gRPC {server.grpc_url}, HTTP {server.http_url}, "
            f"models {', '.join(server.models)}"
        )
        code = server.wait()
        if code != 0:
            typer.echo(f"tritonserver exited with status {code}:\n{server.log_tail()}", err=True)
            raise typer.Exit(1)
    except TritonServerError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo("stopping Triton")
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, previous)


@triton_app.command("check")
def check(
    repository: Path = typer.Option(
        DEFAULT_MODEL_REPOSITORY, "--repository", "-r", help="Triton model repository to check."
    ),
    card_path: Path = typer.Option(
        DEFAULT_MODEL_CARD, "--card", help="model_card.json the worker will compare against."
    ),
) -> None:
    """Validate the repository: configs parse, names match folders, ONNX and card agree."""
    from worker.inference.card import load_model_card
    from worker.inference.triton_check import check_repository

    report = check_repository(repository, load_model_card(card_path))
    for problem in report.problems:
        typer.echo(f"problem: {problem}", err=True)
    if not report.ok:
        raise typer.Exit(1)
    typer.echo(f"ok: {', '.join(report.models)} match {card_path.name}")


def register(app: typer.Typer) -> None:
    """Attach the ``triton`` command group to the ``triage-node`` application."""
    app.add_typer(triton_app, name="triton")


if __name__ == "__main__":  # python -m worker.inference.triton_cli serve ...
    triton_app()
