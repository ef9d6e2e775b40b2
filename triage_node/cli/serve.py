"""``triage-node serve``: the DICOM listener, the completeness timer and the API in one process."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import typer

from triage_node.cli.app import app
from triage_node.cli.common import settings_or_exit
from triage_node.config import Settings
from triage_node.db import audit, schema
from triage_node.db.session import make_engine, make_sessionmaker
from triage_node.ingest.scp import StorageSCP
from triage_node.ingest.store import InstanceStore
from triage_node.logs import get_logger
from triage_node.routing import with_routing
from triage_node.studies.completeness import CompletenessTracker

log = get_logger(__name__)


class _ApiServer:
    """uvicorn running ``triage_node.api.app.create_app`` in a thread of this process."""

    def __init__(self, settings: Settings, session_factory: Any, store: InstanceStore,
                 tracker: CompletenessTracker) -> None:
        import uvicorn

        from triage_node.api.app import create_app

        config = uvicorn.Config(
            create_app(settings, session_factory, store=store, tracker=tracker),
            host=settings.http_host,
            port=settings.http_port,
            log_config=None,
            access_log=False,
            proxy_headers=True,
            forwarded_allow_ips=settings.http_trusted_proxies,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="api", daemon=True)

    def start(self) -> _ApiServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@app.command()
def serve(
    data_dir: Path | None = typer.Option(None, "--data-dir", help="Data directory (TRIAGE_DATA_DIR)."),
    dicom_port: int | None = typer.Option(None, "--dicom-port", help="DICOM port (TRIAGE_DICOM_PORT)."),
    http_port: int | None = typer.Option(None, "--http-port", help="HTTP API port (TRIAGE_HTTP_PORT)."),
    ae_title: str | None = typer.Option(None, "--ae-title", help="Called AE title (TRIAGE_AE_TITLE)."),
    no_api: bool = typer.Option(False, "--no-api", help="Run the DICOM listener without the HTTP API."),
) -> None:
    """Receive studies: DICOM SCP, completeness timer and (when installed) the HTTP API.

    Refuses to start on a database whose schema is not current (run
    ``triage-node db upgrade``). Stops cleanly on SIGTERM or SIGINT.
    """
    settings = settings_or_exit(
        need_secret=True, data_dir=data_dir, dicom_port=dicom_port, http_port=http_port, ae_title=ae_title
    )
    engine = make_engine(settings.effective_database_url)
    try:
        schema.require_current(engine)
    except schema.SchemaOutOfDate as exc:
        typer.echo(f"triage-node serve: {exc}", err=True)
        engine.dispose()
        raise typer.Exit(2) from None
    session_factory = make_sessionmaker(engine)

    tracker = CompletenessTracker(settings, session_factory)
    store = InstanceStore(
        settings,
        session_factory,
        on_stored=with_routing(
            settings, session_factory, tracker.instance_stored
        ),
    )
    stale = store.spool.remove_stale_temp_files()
    if stale:
        log.warning("removed temporary files left by an interrupted write", count=stale)
    scp = StorageSCP(
        settings, store, association_finished=tracker.association_finished
    )
    stop = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        log.info("shutdown requested", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    api: _ApiServer | None = None
    try:
        try:
            scp.start()
        except OSError as exc:
            typer.echo(
                f"triage-node serve: cannot listen on {settings.dicom_host}:{settings.dicom_port}: "
                f"{exc.strerror or exc}",
                err=True,
            )
            raise typer.Exit(2) from None
        tracker.run_in_thread()
        if not no_api:
            api = _ApiServer(settings, session_factory, store, tracker).start()
            log.info("HTTP API started", host=settings.http_host, port=settings.http_port)
        log.info("node ready", data_dir=str(settings.data_dir.resolve()))
        while not stop.wait(1.0):
            pass
    finally:
        log.info("stopping")
        if api is not None:
            api.stop()
        scp.stop()
        tracker.stop()
        audit.flush_refusals()  # the counts of refusal windows still open
        engine.dispose()
        log.info("stopped")
