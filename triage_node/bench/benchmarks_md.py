"""docs/BENCHMARKS.md: each benchmark command rewrites its own ``## `` section of it."""

from __future__ import annotations

from pathlib import Path

from triage_node.config import REPO_ROOT

__all__ = ["BENCHMARKS_MD", "update_benchmarks_md"]

BENCHMARKS_MD = REPO_ROOT / "docs" / "BENCHMARKS.md"


def update_benchmarks_md(section: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace (or append) the section of ``path`` that ``section``'s first line (its ``## ``
    heading) names; the other sections stay as they are."""
    heading = section.splitlines()[0].strip()
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.strip() == heading), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        new = "".join(lines[:start]) + section + ("\n" if end < len(lines) else "") + "".join(lines[end:])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)
