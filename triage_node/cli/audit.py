"""``triage-node audit``: read the audit trail from the command line (table, JSON or CSV)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import typer

from triage_node.cli.app import app
from triage_node.cli.common import settings_or_exit
from triage_node.db.session import make_engine, make_sessionmaker
from triage_node.timeutil import utcnow
from triage_node.worklist.audit_trail import AuditFilter, audit_rows, list_audit


def parse_since(value: str | None, now: datetime | None = None) -> datetime | None:
    """ISO 8601 time (UTC when no offset is given) or a duration back from now: ``90m``,
    ``12h``, ``7d``."""
    if not value:
        return None
    now = now or utcnow()
    units = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
    if value[-1:] in units and value[:-1].isdigit():
        return now - timedelta(**{units[value[-1]]: int(value[:-1])})
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r}: expected ISO 8601 (2026-01-31T08:00) or 90m/12h/7d") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@app.command("audit")
def audit(
    data_dir: Path | None = typer.Option(None, "--data-dir", help="Data directory (TRIAGE_DATA_DIR)."),
    study: str | None = typer.Option(None, "--study", help="Only events of this StudyInstanceUID."),
    since: str | None = typer.Option(None, "--since", help="ISO 8601 time or 90m/12h/7d ago."),
    until: str | None = typer.Option(None, "--until", help="ISO 8601 time (exclusive)."),
    action: str | None = typer.Option(None, "--action", help="Action, or a prefix ending in * (worklist.*)."),
    actor: str | None = typer.Option(None, "--actor", help="Actor, e.g. token:dr-smith or worker."),
    limit: int = typer.Option(1000, "--limit", min=1, help="At most this many events."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
    as_csv: bool = typer.Option(False, "--csv", help="CSV with a header row."),
) -> None:
    """Print audit events, oldest first."""
    settings = settings_or_exit(data_dir=data_dir)
    flt = AuditFilter(since=parse_since(since), until=parse_since(until), study_uid=study,
                      action=action, actor=actor, limit=limit)
    engine = make_engine(settings.effective_database_url)
    try:
        with make_sessionmaker(engine)() as session:
            events, total = list_audit(session, flt)
            rows = audit_rows(events)
    finally:
        engine.dispose()
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row, sort_keys=True, default=str))
    elif as_csv:
        from triage_node.api.audit_api import to_csv

        typer.echo(to_csv(rows), nl=False)
    else:
        for row in rows:
            detail = " ".join(f"{k}={v}" for k, v in row["detail"].items())
            study_uid = row["study_uid"] or "-"
            typer.echo(f"{row['at'][:19]}  {row['actor']:<24} {row['action']:<26} {row['outcome']:<7} "
                       f"{study_uid}  {detail}")
        if total > len(rows):
            typer.echo(f"({total - len(rows)} more; use --limit)", err=True)
