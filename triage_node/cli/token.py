"""``triage-node token create|list|revoke``: API bearer tokens (stored hashed)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from triage_node.api.auth import Role, create_token, revoke_token
from triage_node.cli.app import app
from triage_node.cli.common import settings_or_exit
from triage_node.config import Settings
from triage_node.db.models import ApiToken
from triage_node.db.schema import SchemaOutOfDate, require_current
from triage_node.db.session import make_engine, make_sessionmaker, transaction

token_app = typer.Typer(help="API bearer tokens (viewer, sender, admin).", no_args_is_help=True)
app.add_typer(token_app, name="token")

DATA_DIR = typer.Option(None, "--data-dir", help="Data directory (overrides TRIAGE_DATA_DIR).")


def _factory(data_dir: Path | None) -> tuple[Settings, sessionmaker[Session]]:
    settings = settings_or_exit(need_secret=True, data_dir=data_dir)
    engine = make_engine(settings.effective_database_url)
    try:
        require_current(engine)
    except SchemaOutOfDate as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    return settings, make_sessionmaker(engine)


@token_app.command("create")
def token_create(
    role: Role = typer.Option(..., "--role", help="viewer, sender (STOW-RS) or admin"),
    name: str | None = typer.Option(None, "--name", help="Who the token is for (audit actor)"),
    data_dir: Path | None = DATA_DIR,
) -> None:
    """Create a token and print it once (only its hash is stored)."""
    settings, factory = _factory(data_dir)
    with transaction(factory) as session:
        count = session.query(ApiToken).count()
        try:
            row, token = create_token(session, settings, role, name or f"{role.value}-{count + 1}")
        except ValueError as exc:
            typer.echo(str(exc), err=True)
            raise typer.Exit(2) from None
    typer.echo(f"token {row.id} ({row.name}, {row.role}); shown once, keep it safe:", err=True)
    typer.echo(token)


@token_app.command("list")
def token_list(
    data_dir: Path | None = DATA_DIR,
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List tokens (never the tokens themselves)."""
    _settings, factory = _factory(data_dir)
    with factory() as session:
        rows = [
            {"id": r.id, "name": r.name, "role": r.role, "created_at": r.created_at.isoformat(),
             "revoked_at": r.revoked_at.isoformat() if r.revoked_at else None}
            for r in session.scalars(select(ApiToken).order_by(ApiToken.id))
        ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        typer.echo(f"{r['id']:>4}  {r['role']:<7} {r['name']:<24} {r['created_at']}"
                   + (f"  revoked {r['revoked_at']}" if r["revoked_at"] else ""))


@token_app.command("revoke")
def token_revoke(
    token_id: int = typer.Argument(..., help="Token id (from `token list`)"),
    data_dir: Path | None = DATA_DIR,
) -> None:
    """Revoke a token; requests with it get 401 from then on."""
    _settings, factory = _factory(data_dir)
    with transaction(factory) as session:
        if not revoke_token(session, token_id):
            typer.echo(f"no active token {token_id}", err=True)
            raise typer.Exit(1)
    typer.echo(f"token {token_id} revoked")
