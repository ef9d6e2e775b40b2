"""Helpers shared by command modules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from triage_node.config import Settings, SettingsError, load_settings
from triage_node.logs import configure_logging, protect_vocabulary, settings_vocabulary


def settings_or_exit(*, need_secret: bool = False, **overrides: Any) -> Settings:
    """Load settings with CLI overrides; a bad value exits 2 with a readable message.

    ``need_secret``: the command hashes tokens or signs webhooks, so an unset
    ``secret_key`` exits 2 too (there is no default secret in any environment).
    """
    try:
        settings = load_settings(**overrides)
        if need_secret:
            settings.require_secret()
    except SettingsError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    configure_logging(settings.log_level, settings.log_format.value)
    protect_vocabulary(settings_vocabulary(settings))
    return settings


DATA_DIR = typer.Option(None, "--data-dir", help="Data directory (overrides TRIAGE_DATA_DIR).")


def database_or_exit(data_dir: Path | None) -> tuple[Settings, Engine, sessionmaker[Session]]:
    """Settings, engine and session factory of a command that reads or writes the database;
    exits 2 when the schema is not at the code's revision (run ``triage-node db upgrade``)."""
    from triage_node.db.schema import SchemaOutOfDate, require_current
    from triage_node.db.session import make_engine, make_sessionmaker

    settings = settings_or_exit(data_dir=data_dir)
    engine = make_engine(settings.effective_database_url)
    try:
        require_current(engine)
    except SchemaOutOfDate as exc:
        engine.dispose()
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    return settings, engine, make_sessionmaker(engine)
