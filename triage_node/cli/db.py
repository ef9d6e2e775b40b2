"""``triage-node db upgrade|current``: schema migrations as an explicit step."""

from __future__ import annotations

from pathlib import Path

import typer

from triage_node.cli.app import app
from triage_node.cli.common import settings_or_exit
from triage_node.db import schema
from triage_node.db.session import make_engine

db_app = typer.Typer(help="Database schema (Alembic migrations).", no_args_is_help=True)
app.add_typer(db_app, name="db")

DATA_DIR = typer.Option(None, "--data-dir", help="Data directory (overrides TRIAGE_DATA_DIR).")


@db_app.command("upgrade")
def db_upgrade(data_dir: Path | None = DATA_DIR) -> None:
    """Apply all migrations up to the code's schema."""
    settings = settings_or_exit(data_dir=data_dir)
    schema.upgrade(settings.effective_database_url)
    typer.echo(f"database at revision {schema.head_revision()}")


@db_app.command("current")
def db_current(data_dir: Path | None = DATA_DIR) -> None:
    """Print the database's schema revision and the code's."""
    settings = settings_or_exit(data_dir=data_dir)
    engine = make_engine(settings.effective_database_url)
    typer.echo(f"database: {schema.current_revision(engine) or 'none'}")
    typer.echo(f"code:     {schema.head_revision()}")
    engine.dispose()
