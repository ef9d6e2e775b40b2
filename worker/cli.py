"""Worker-side commands, registered into ``triage-node`` through an entry point."""

from __future__ import annotations

import importlib

import typer

# Each module defines ``register(app)``; listed here so the set of commands is explicit.
COMMAND_MODULES: tuple[str, ...] = (
    "worker.model.cli",
    "worker.model.calibrate_cli",
    "worker.model.explain_cli",
    "worker.worker_cli",
    "worker.inference.triton_cli",
    "worker.outbox_cli",
    "worker.destination_cli",
    "worker.docgen",
)


def register(app: typer.Typer) -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(app)
