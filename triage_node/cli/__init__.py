"""The ``triage-node`` command line.

Commands of the node live in modules beside this one; commands that belong to the
worker (train, evaluate, worker, demo, ...) are registered through the
``triage_node.cli`` entry-point group, so this package never imports ``worker``.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from triage_node.cli.app import app


def _load_plugins() -> None:
    for ep in entry_points(group="triage_node.cli"):
        register = ep.load()
        register(app)


def main() -> None:
    from triage_node.cli import basic, db, synth  # noqa: F401  (registers commands)

    _load_plugins()
    app()


__all__ = ["app", "main"]
