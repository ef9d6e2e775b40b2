"""``triage-node worker`` and ``triage-node demo`` (registered through ``worker.cli``).

``worker`` checks everything it depends on before it takes a job (database schema, model
card, inference backend against the card; Triton live, ready and serving matching
models), then starts a Celery worker on the ``stat`` and ``routine`` queues, stat first.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import typer

from triage_node import QUEUES
from triage_node.cli.common import settings_or_exit
from triage_node.config import Settings, get_settings

DATA_DIR = typer.Option(None, "--data-dir", help="Data directory (overrides TRIAGE_DATA_DIR).")


def preflight(settings: Settings) -> str:
    """Build and check this worker's clients once; returns a one-line description.

    Raises
    ------
    worker.inference.InferenceError, triage_node.db.schema.SchemaOutOfDate, OSError
        With a message an operator can act on.
    """
    from worker.pipeline.context import build_context

    ctx = build_context(settings)
    try:
        return (
            f"backend {ctx.backend.name}, model {ctx.card.name} {ctx.card.version}, "
            f"operating point {settings.operating_point.value}, thresholds from {ctx.card.threshold_source}"
        )
    finally:
        ctx.close()


def worker_argv(queues: list[str], concurrency: int, loglevel: str, pool: str, beat: bool,
                data_dir: Path) -> list[str]:
    """argv of ``celery worker`` for these options."""
    argv = [
        "worker",
        "-Q", ",".join(queues),
        "-c", str(concurrency),
        "-P", pool,
        "--prefetch-multiplier", "1",
        "-n", f"triage-{os.getpid()}@{socket.gethostname()}",
        "--loglevel", loglevel,
        "--without-gossip",
        "--without-mingle",
    ]
    if beat:
        argv += ["-B", "-s", str(data_dir.resolve() / "celerybeat-schedule")]
    return argv


def beat_argv(loglevel: str, data_dir: Path) -> list[str]:
    """argv of ``celery beat``; the schedule file keeps last-run times across restarts."""
    return ["beat", "-s", str(data_dir.resolve() / "celerybeat-schedule"), "--loglevel", loglevel]


def register(app: typer.Typer) -> None:
    from triage_node.cli.bench import bench_app
    from worker.bench_e2e import register as register_bench_e2e

    register_bench_e2e(bench_app)

    @app.command("worker")
    def worker_command(
        queues: str = typer.Option("stat,routine", "--queues", "-Q",
                                   help="Queues to consume, most urgent first."),
        concurrency: int | None = typer.Option(None, "--concurrency", "-c", min=1,
                                               help="Worker processes (default: settings.worker_concurrency)."),
        data_dir: Path | None = DATA_DIR,
        backend: str | None = typer.Option(None, "--backend", help="onnx or triton (overrides settings)."),
        pool: str = typer.Option("prefork", "--pool", help="Celery pool: prefork or solo."),
        beat: bool = typer.Option(True, "--beat/--no-beat",
                                  help="Run the periodic tasks (delivery retries, lost jobs) in this worker; "
                                       "with several workers run `triage-node beat` once instead."),
    ) -> None:
        """Run a Celery worker: triage jobs from the stat queue first, then routine."""
        overrides = {"data_dir": data_dir, "inference_backend": backend}
        settings = settings_or_exit(need_secret=True, **overrides)
        # Pool processes read the process settings (get_settings): hand the overrides
        # down through the environment.
        if data_dir is not None:
            os.environ["TRIAGE_DATA_DIR"] = str(data_dir)
        if backend is not None:
            os.environ["TRIAGE_INFERENCE_BACKEND"] = backend
        get_settings.cache_clear()
        names = [q.strip() for q in queues.split(",") if q.strip()]
        unknown = [q for q in names if q not in QUEUES]
        if not names or unknown:
            typer.echo(f"--queues: unknown queue(s) {unknown or names}; use stat and/or routine", err=True)
            raise typer.Exit(2)
        from worker.inference import InferenceError

        try:
            description = preflight(settings)
        except (InferenceError, OSError, RuntimeError, ValueError) as exc:
            typer.echo(f"worker not started: {exc}", err=True)
            raise typer.Exit(2) from None
        typer.echo(f"triage worker: queues {','.join(names)}; {description}", err=True)
        from worker.celery_app import app as celery_app
        from worker.celery_app import beat_schedule

        use_beat = beat and pool != "solo"
        if use_beat:
            celery_app.conf.beat_schedule = beat_schedule(settings)
        if settings.worker_metrics_port:
            from triage_node.metrics import BuildInfo
            from worker import metrics

            # Before the pool forks, so that its processes write where the server reads.
            metrics.enable_multiprocess()
            metrics.start_server(settings.worker_metrics_host, settings.worker_metrics_port,
                                 BuildInfo.from_settings(settings))
        celery_app.worker_main(worker_argv(
            names, concurrency or settings.worker_concurrency, settings.log_level, pool, use_beat,
            settings.data_dir,
        ))

    @app.command("beat")
    def beat_command(
        data_dir: Path | None = DATA_DIR,
    ) -> None:
        """Run the periodic tasks' scheduler (delivery retries, lost jobs, retention): one
        per site, however many workers (which then run with --no-beat)."""
        settings = settings_or_exit(data_dir=data_dir)
        if data_dir is not None:
            os.environ["TRIAGE_DATA_DIR"] = str(data_dir)
        get_settings.cache_clear()
        from worker.celery_app import app as celery_app
        from worker.celery_app import beat_schedule

        schedule = beat_schedule(settings)
        celery_app.conf.beat_schedule = schedule
        typer.echo(f"triage beat: {', '.join(sorted(schedule))}", err=True)
        celery_app.start(beat_argv(settings.log_level, settings.data_dir))

    @app.command("demo")
    def demo_command(
        out: Path | None = typer.Option(None, "--out", help="Copy what the local PACS received "
                                        "(.dcm) and PNG renders here."),
        studies: int = typer.Option(4, "--studies", min=1, max=20, help="Synthetic studies to send."),
        data_dir: Path | None = typer.Option(None, "--data-dir",
                                             help="Data directory (default: a fresh temporary one)."),
        timeout: float = typer.Option(110.0, "--timeout", help="Seconds to wait for all results."),
    ) -> None:
        """Generate studies, run node + worker + a local PACS, send, and show the worklist."""
        import signal
        import sys

        from worker.demo import run_demo
        from worker.demo_parts import DemoError

        # SIGTERM unwinds like Ctrl-C, so the node, the worker and the PACS are stopped.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

        try:
            code = run_demo(out=out, n_studies=studies, data_dir=data_dir, timeout=timeout)
        except DemoError as exc:
            typer.echo(f"demo failed: {exc}", err=True)
            raise typer.Exit(1) from None
        raise typer.Exit(code)
