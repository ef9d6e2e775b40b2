"""``triage-node version`` and ``triage-node config show``."""

from __future__ import annotations

import json

import typer

from triage_node import __version__
from triage_node.cli.app import app
from triage_node.config import SettingsError, load_settings

config_app = typer.Typer(help="Inspect the node's settings.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@app.command()
def version() -> None:
    """Print the node's version."""
    typer.echo(__version__)


@config_app.command("show")
def config_show(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Print the effective settings (secrets masked)."""
    try:
        settings = load_settings()
    except SettingsError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    values = settings.masked()
    if as_json:
        typer.echo(json.dumps(values, indent=2, default=str))
        return
    width = max(len(k) for k in values)
    for key, value in values.items():
        typer.echo(f"{key:<{width}}  {value}")

