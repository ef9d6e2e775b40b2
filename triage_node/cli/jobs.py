"""``triage-node jobs list|retry``: see triage jobs and send failed ones again."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from sqlalchemy import select

from triage_node.cli.app import app
from triage_node.cli.common import settings_or_exit
from triage_node.db.models import Job, Series, Study
from triage_node.db.session import make_engine, make_sessionmaker
from triage_node.queue import make_client, retry_failed_jobs

jobs_app = typer.Typer(help="Triage jobs: list them, send failed ones again.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")

DATA_DIR = typer.Option(None, "--data-dir", help="Data directory (overrides TRIAGE_DATA_DIR).")


@jobs_app.command("list")
def jobs_list(
    state: str | None = typer.Option(None, "--state", help="Only jobs in this state (e.g. failed)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    data_dir: Path | None = DATA_DIR,
) -> None:
    """Jobs, newest first, with their state, attempts and error (no patient identifiers)."""
    settings = settings_or_exit(data_dir=data_dir)
    engine = make_engine(settings.effective_database_url)
    with make_sessionmaker(engine)() as session:
        query = (
            select(Job, Study.study_uid, Series.series_uid)
            .join(Study, Study.id == Job.study_id)
            .join(Series, Series.id == Job.series_id)
            .order_by(Job.id.desc())
        )
        if state:
            query = query.where(Job.state == state)
        rows = [
            {
                "id": job.id, "version": job.version, "state": job.state, "queue": job.queue,
                "attempts": job.attempts, "study_uid": study_uid, "series_uid": series_uid,
                "error": job.error,
            }
            for job, study_uid, series_uid in session.execute(query)
        ]
    engine.dispose()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        typer.echo(
            f"{row['id']:>6} v{row['version']} {row['state']:<10} {row['queue']:<8} "
            f"attempts={row['attempts']} {row['study_uid']}"
            + (f"  error: {str(row['error'])[:80]}" if row["error"] else "")
        )


@jobs_app.command("retry")
def jobs_retry(
    job_id: list[int] = typer.Option(None, "--id", help="Job id to send again (repeatable)."),
    failed: bool = typer.Option(False, "--failed", help="Send every failed job again."),
    data_dir: Path | None = DATA_DIR,
) -> None:
    """Send failed jobs again once their cause (Triton, database) is fixed; audited."""
    if not job_id and not failed:
        typer.echo("give --id N (repeatable) or --failed", err=True)
        raise typer.Exit(2)
    settings = settings_or_exit(data_dir=data_dir)
    engine = make_engine(settings.effective_database_url)
    client = make_client(settings)
    try:
        outcomes = retry_failed_jobs(
            make_sessionmaker(engine), client, actor="cli", job_ids=job_id or None
        )
    finally:
        client.close()
        engine.dispose()
    for outcome in outcomes:
        typer.echo(f"job {outcome.job_id}: " + ("sent" if outcome.sent else f"not sent ({outcome.error})"))
    if not outcomes:
        typer.echo("no failed job matched")
    if any(not o.sent for o in outcomes):
        raise typer.Exit(1)
