"""Helpers shared by command modules."""

from __future__ import annotations

from typing import Any

import typer

from triage_node.config import Settings, SettingsError, load_settings
from triage_node.logs import configure_logging


def settings_or_exit(**overrides: Any) -> Settings:
    """Load settings with CLI overrides; a bad value exits 2 with a readable message."""
    try:
        settings = load_settings(**overrides)
    except SettingsError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    configure_logging(settings.log_level, settings.log_format.value)
    return settings
