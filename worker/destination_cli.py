"""``triage-node destination list|test`` and ``triage-node echo``: check peers before go-live."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from triage_node.cli.common import settings_or_exit

destination_app = typer.Typer(help="Result destinations (PACS, archives): list them, test them.", no_args_is_help=True)

DATA_DIR = typer.Option(None, "--data-dir", help="Data directory (overrides TRIAGE_DATA_DIR).")
AS_JSON = typer.Option(False, "--json", help="Print JSON instead of lines.")


def _print_steps(steps: list, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps([s.as_dict() for s in steps], indent=2))
        return
    for step in steps:
        typer.echo(f"{'ok  ' if step.ok else 'FAIL'} {step.name:<12} {step.detail}")


@destination_app.command("list")
def destination_list(as_json: bool = AS_JSON, data_dir: Path | None = DATA_DIR) -> None:
    """Configured destinations, secrets masked."""
    settings = settings_or_exit(data_dir=data_dir)
    rows = [d.masked() for d in settings.destinations]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo("no destinations configured (TRIAGE_DESTINATIONS)")
    for d in rows:
        where = d["url"] if d["kind"] == "dicomweb" else f"{d['ae_title']}@{d['host']}:{d['port']}"
        typer.echo(f"{d['name']:<16} {d['kind']:<9} {where}  sr_class={d['sr_class']} overlays={d['send_overlays']}")


@destination_app.command("test")
def destination_test(
    name: str = typer.Argument(..., help="Destination name, as in TRIAGE_DESTINATIONS."),
    store_test_object: bool = typer.Option(
        False, "--store-test-object",
        help="Also send a synthetic test image (patient ID TRIAGE-NODE-TEST) by C-STORE or STOW-RS.",
    ),
    as_json: bool = AS_JSON,
    data_dir: Path | None = DATA_DIR,
) -> None:
    """Check one destination: connect and C-ECHO (DIMSE) or a QIDO-RS search (DICOMweb), with
    the node's AE title, TLS settings and the destination's credentials. Exit 1 if a step fails."""
    from worker.pipeline.destination_check import check_destination

    settings = settings_or_exit(data_dir=data_dir)
    found = [d for d in settings.destinations if d.name == name]
    if not found:
        known = ", ".join(d.name for d in settings.destinations) or "none"
        typer.echo(f"no destination named {name!r} (configured: {known})", err=True)
        raise typer.Exit(2)
    steps = check_destination(
        found[0], calling_ae=settings.ae_title, tls_cert=settings.tls_cert, tls_key=settings.tls_key,
        store_test_object=store_test_object,
    )
    _print_steps(steps, as_json)
    raise typer.Exit(0 if all(s.ok for s in steps) else 1)


def echo_command(
    host: str = typer.Argument(..., help="Peer host name or address."),
    port: int = typer.Argument(..., min=1, max=65535, help="Peer DICOM port."),
    called_ae: str = typer.Option("ANY-SCP", "--aec", help="Called AE title (the peer's)."),
    calling_ae: str | None = typer.Option(None, "--aet", help="Calling AE title; default: the node's."),
    timeout: float = typer.Option(10.0, "--timeout", min=0.1, help="Seconds per network step."),
    as_json: bool = AS_JSON,
    data_dir: Path | None = DATA_DIR,
) -> None:
    """Quick association check of any AE: TCP connect, association, C-ECHO. Exit 1 on failure."""
    from worker.pipeline.destination_check import echo

    calling = calling_ae or settings_or_exit(data_dir=data_dir).ae_title
    steps = echo(host, port, called_ae, calling, timeout=timeout)
    _print_steps(steps, as_json)
    raise typer.Exit(0 if all(s.ok for s in steps) else 1)


def register(app: typer.Typer) -> None:
    app.add_typer(destination_app, name="destination")
    app.command("echo")(echo_command)
