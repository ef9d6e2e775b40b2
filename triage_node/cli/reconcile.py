"""``triage-node reconcile``: send again jobs the broker or a dead worker lost."""

from __future__ import annotations

import json
import time

import typer

from triage_node.cli.app import app
from triage_node.cli.common import settings_or_exit


@app.command()
def reconcile(
    grace: float = typer.Option(120.0, "--grace", min=0,
                                help="Leave jobs sent or started less than this many seconds ago alone."),
    every: float | None = typer.Option(None, "--every", min=1,
                                       help="Run every this many seconds until stopped (default: once)."),
    as_json: bool = typer.Option(False, "--json", help="Print what was sent again as JSON lines."),
) -> None:
    """Find jobs queued or running in the database with no live task (not waiting in the
    broker, not held by a worker) and send them again (``job.reenqueued`` audit rows)."""
    from triage_node.db.session import make_engine, make_sessionmaker
    from triage_node.queue import make_client
    from triage_node.reconcile import reconcile_lost_jobs

    settings = settings_or_exit(need_secret=True)
    engine = make_engine(settings.effective_database_url)
    client = make_client(settings)
    factory = make_sessionmaker(engine)
    try:
        while True:
            for r in reconcile_lost_jobs(factory, client, grace=grace):
                row = {"job_id": r.job_id, "version": r.version, "state": r.state,
                       "old_task_id": r.old_task_id, "task_id": r.task_id, "error": r.error}
                typer.echo(json.dumps(row) if as_json else
                           f"job {r.job_id} v{r.version} ({r.state}): "
                           + (f"sent as {r.task_id}" if r.sent else f"not sent: {r.error}"))
            if every is None:
                break
            time.sleep(every)
    except KeyboardInterrupt:
        pass
    finally:
        client.close()
        engine.dispose()
