"""``triage-node hl7 list|retry|deliver``: the HL7 outbox (messages to the RIS)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import typer
from sqlalchemy import select

from triage_node.cli.app import app
from triage_node.cli.common import DATA_DIR, database_or_exit
from triage_node.db.models import HL7OutboxItem, OutboxState
from triage_node.db.session import transaction

hl7_app = typer.Typer(help="HL7 outbox: messages to the RIS waiting for, or given up without, an ACK.",
                      no_args_is_help=True)
app.add_typer(hl7_app, name="hl7")


def _ts(value: datetime | None) -> str | None:
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat(timespec="seconds")


def _row(item: HL7OutboxItem) -> dict:
    """A row without the message itself, which names the patient."""
    return {
        "id": item.id,
        "state": item.state,
        "message_type": item.message_type,
        "control_id": item.control_id,
        "trigger": item.trigger,
        "attempts": item.attempts,
        "next_attempt_at": _ts(item.next_attempt_at) if item.state == OutboxState.pending else None,
        "delivered_at": _ts(item.delivered_at),
        "ack": item.ack_code,
        "job_id": item.job_id,
        "study_uid": item.study_uid,
        "last_error": item.last_error,
    }


@hl7_app.command("list")
def hl7_list(
    state: list[str] = typer.Option(  # noqa: B008 - typer declares options this way
        [], "--state", help="Only messages in this state (pending, delivered, dead, refused); repeatable."
    ),
    limit: int = typer.Option(200, "--limit", min=1, help="At most this many messages, newest first."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    data_dir: Path | None = DATA_DIR,
) -> None:
    """List HL7 messages (type, MSH-10, state, ACK, error; no patient identifiers)."""
    bad = [s for s in state if s not in set(OutboxState)]
    if bad:
        typer.echo(f"unknown state {', '.join(bad)}; use {', '.join(OutboxState)}", err=True)
        raise typer.Exit(2)
    _, engine, factory = database_or_exit(data_dir)
    try:
        with factory() as session:
            query = select(HL7OutboxItem).order_by(HL7OutboxItem.id.desc()).limit(limit)
            if state:
                query = query.where(HL7OutboxItem.state.in_(state))
            rows = [_row(i) for i in session.scalars(query)]
    finally:
        engine.dispose()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo("no HL7 messages")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("id", "state", "type", "MSH-10", "tries", "ack", "next try / delivered", "Study UID", "last error")
    for r in rows:
        table.add_row(str(r["id"]), str(r["state"]), r["message_type"], r["control_id"], str(r["attempts"]),
                      r["ack"] or "", r["next_attempt_at"] or r["delivered_at"] or "", r["study_uid"],
                      (r["last_error"] or "")[:80])
    Console(width=220).print(table)


@hl7_app.command("retry")
def hl7_retry(
    item_id: int | None = typer.Option(None, "--id", help="Requeue this message (any state but delivered)."),
    dead: bool = typer.Option(False, "--dead", help="Requeue every dead and refused message."),
    data_dir: Path | None = DATA_DIR,
) -> None:
    """Put messages back to pending for a fresh series of tries (audited)."""
    from triage_node.notify.outbox import requeue

    if (item_id is None) == (not dead):
        typer.echo("give exactly one of --id N or --dead", err=True)
        raise typer.Exit(2)
    _, engine, factory = database_or_exit(data_dir)
    try:
        with transaction(factory) as session:
            n = requeue(session, item_id=item_id, dead=dead, actor="cli")
    finally:
        engine.dispose()
    if item_id is not None and n == 0:
        typer.echo(f"no undelivered HL7 message with id {item_id}", err=True)
        raise typer.Exit(1)
    typer.echo(f"requeued {n} message(s)")


@hl7_app.command("deliver")
def hl7_deliver(
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    data_dir: Path | None = DATA_DIR,
) -> None:
    """Send every due message now (what the worker's periodic HL7 delivery does)."""
    from triage_node.notify.outbox import deliver_due

    settings, engine, factory = database_or_exit(data_dir)
    if not settings.hl7_host:
        typer.echo("hl7_host is not set (TRIAGE_HL7_HOST): no RIS to send to", err=True)
        raise typer.Exit(2)
    try:
        out = deliver_due(factory, settings).as_dict()
    finally:
        engine.dispose()
    typer.echo(json.dumps(out, indent=2) if as_json else " ".join(f"{k}={v}" for k, v in out.items()))
