"""``triage-node outbox list|retry|deliver``: look at and act on the delivery outbox."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import typer
from sqlalchemy import select

from triage_node.cli.common import settings_or_exit
from triage_node.db.models import OutboxItem, OutboxState
from triage_node.db.session import make_engine, make_sessionmaker, transaction

outbox_app = typer.Typer(help="Delivery outbox: objects waiting for, or given up by, a PACS.", no_args_is_help=True)

DATA_DIR = typer.Option(None, "--data-dir", help="Data directory (overrides TRIAGE_DATA_DIR).")


def _factory(data_dir: Path | None):
    settings = settings_or_exit(data_dir=data_dir)
    engine = make_engine(settings.effective_database_url)
    return settings, engine, make_sessionmaker(engine)


def _row(item: OutboxItem) -> dict:
    def ts(value: datetime | None) -> str | None:
        if value is None:
            return None
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat(timespec="seconds")

    return {
        "id": item.id,
        "state": item.state,
        "destination": item.destination,
        "attempts": item.attempts,
        "next_attempt_at": ts(item.next_attempt_at) if item.state == OutboxState.pending else None,
        "delivered_at": ts(item.delivered_at),
        "job_id": item.job_id,
        "reason": item.reason,
        "study_uid": item.study_uid,
        "sop_uid": item.sop_uid,
        "last_error": item.last_error,
    }


@outbox_app.command("list")
def outbox_list(
    state: list[str] = typer.Option(  # noqa: B008 - typer declares options this way
        [], "--state", help="Only rows in this state (pending, delivered, dead, refused); repeatable."
    ),
    limit: int = typer.Option(200, "--limit", min=1, help="At most this many rows, newest first."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    data_dir: Path | None = DATA_DIR,
) -> None:
    """List outbox rows (no patient identifiers: UIDs, states and errors only)."""
    bad = [s for s in state if s not in set(OutboxState)]
    if bad:
        typer.echo(f"unknown state {', '.join(bad)}; use {', '.join(OutboxState)}", err=True)
        raise typer.Exit(2)
    _, engine, factory = _factory(data_dir)
    try:
        with factory() as session:
            query = select(OutboxItem).order_by(OutboxItem.id.desc()).limit(limit)
            if state:
                query = query.where(OutboxItem.state.in_(state))
            rows = [_row(i) for i in session.scalars(query)]
    finally:
        engine.dispose()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo("outbox is empty")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("id", "state", "destination", "tries", "next try / delivered", "SOP Instance UID", "last error")
    for r in rows:
        table.add_row(
            str(r["id"]),
            str(r["state"]),
            r["destination"],
            str(r["attempts"]),
            r["next_attempt_at"] or r["delivered_at"] or "",
            r["sop_uid"],
            (r["last_error"] or "")[:80],
        )
    Console(width=200).print(table)


@outbox_app.command("retry")
def outbox_retry(
    item_id: int | None = typer.Option(None, "--id", help="Requeue this row (any state but delivered)."),
    dead: bool = typer.Option(False, "--dead", help="Requeue every dead and refused row."),
    data_dir: Path | None = DATA_DIR,
) -> None:
    """Put rows back to pending for a fresh series of tries (audited)."""
    from worker.pipeline.delivery import requeue

    if (item_id is None) == (not dead):
        typer.echo("give exactly one of --id N or --dead", err=True)
        raise typer.Exit(2)
    _, engine, factory = _factory(data_dir)
    try:
        with transaction(factory) as session:
            n = requeue(session, item_id=item_id, dead=dead, actor="cli")
    finally:
        engine.dispose()
    if item_id is not None and n == 0:
        typer.echo(f"no undelivered outbox row with id {item_id}", err=True)
        raise typer.Exit(1)
    typer.echo(f"requeued {n} row(s)")


@outbox_app.command("deliver")
def outbox_deliver(
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    data_dir: Path | None = DATA_DIR,
) -> None:
    """Send every due row now (what the worker's periodic delivery does)."""
    from worker.pipeline.delivery import deliver_due

    settings, engine, factory = _factory(data_dir)
    try:
        report = deliver_due(factory, settings)
    finally:
        engine.dispose()
    out = report.as_dict()
    typer.echo(json.dumps(out, indent=2) if as_json else " ".join(f"{k}={v}" for k, v in out.items() if k != "by_destination"))


def register(app: typer.Typer) -> None:
    app.add_typer(outbox_app, name="outbox")
