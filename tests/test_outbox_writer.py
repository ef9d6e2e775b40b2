"""Outbox rows have one writer (triage_node/outbox.py): no other module builds an OutboxItem."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WRITER = ROOT / "triage_node" / "outbox.py"


def _builds_outbox_rows(path: Path) -> list[int]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "OutboxItem"]


def test_only_the_outbox_module_builds_outbox_rows():
    offenders = {str(p.relative_to(ROOT)): lines
                 for package in ("triage_node", "worker") for p in sorted((ROOT / package).rglob("*.py"))
                 if p != WRITER and (lines := _builds_outbox_rows(p))}
    assert offenders == {}, f"queue outbox rows through triage_node.outbox.enqueue_outbox: {offenders}"
    assert _builds_outbox_rows(WRITER), "the scan no longer sees the writer itself"
