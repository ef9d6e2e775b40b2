"""Helpers shared by command modules."""

from __future__ import annotations

from typing import Any

import typer

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
