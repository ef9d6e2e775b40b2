"""The ``triage-node`` command line.

Commands of the node live in modules beside this one; commands that belong to the
worker (train, evaluate, worker, demo, ...) are registered through the
``triage_node.cli`` entry-point group, so this package never imports ``worker``.
"""

from __future__ import annotations

from importlib.metadata import entry_points

import typer

from triage_node.cli.app import app

_built = False


def build_app() -> typer.Typer:
    """Attach every command to the app (once) and return it."""
    global _built
    if not _built:
        from triage_node.cli import (  # noqa: F401  (registers commands)
            audit,
            basic,
            bench,
            db,
            feedback,
            hl7,
            jobs,
            reconcile,
            retention,
            serve,
            studies,
            synth,
            tls,
            token,
        )

        for ep in entry_points(group="triage_node.cli"):
            ep.load()(app)
        _built = True
    return app


def main() -> None:
    build_app()()


__all__ = ["app", "build_app", "main"]
