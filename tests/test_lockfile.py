"""constraints.txt (scripts/lock.sh) pins every dependency pyproject.toml declares."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _name(requirement: str) -> str:
    """PEP 503 normalised project name of a requirement string."""
    name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement).group(0)
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[_name(name)] = version
    return pins


def test_every_declared_dependency_is_pinned():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        declared += extra
    pins = pinned()
    missing = sorted({_name(r) for r in declared} - set(pins))
    assert missing == [], f"not in constraints.txt (run scripts/lock.sh): {missing}"
    assert pins["torch"].startswith("2.13.0")


def test_every_install_goes_through_the_constraints():
    assert "-c constraints.txt" in (ROOT / "scripts" / "pip_install.sh").read_text()
    assert "-c constraints.txt" in (ROOT / "deploy" / "Dockerfile").read_text()
