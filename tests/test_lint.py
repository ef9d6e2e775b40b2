"""The code checks CI enforces: ruff (rule set in pyproject.toml) over the tree, mypy over the packages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUFF = Path(sys.executable).with_name("ruff")


def test_ruff_is_clean():
    proc = subprocess.run([str(RUFF), "check", "--no-cache", "triage_node", "worker", "tests", "scripts"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


def test_mypy_is_clean(tmp_path):
    """mypy with the [tool.mypy] settings of pyproject.toml (files: triage_node, worker)."""
    mypy = Path(sys.executable).with_name("mypy")
    proc = subprocess.run([str(mypy), "--cache-dir", str(tmp_path / "mypy-cache")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


MAX_MODULE_LINES = 400


def test_no_module_of_the_packages_is_over_400_lines():
    # The layout stays readable only while each module does one thing.
    long = {str(p.relative_to(ROOT)): n for pkg in ("triage_node", "worker") for p in (ROOT / pkg).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"over {MAX_MODULE_LINES} lines: {long}"


def test_no_private_name_is_imported_from_another_module():
    # A leading underscore means "only this module": share a name by making it public.
    import ast

    found = []
    for pkg in ("triage_node", "worker"):
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.ImportFrom) and node.module and node.level == 0
                        and node.module.split(".")[0] in ("triage_node", "worker")):
                    found += [f"{path.relative_to(ROOT)}: {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
    assert not found, "private names imported across modules:\n" + "\n".join(found)
