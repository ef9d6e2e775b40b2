"""dicom3tools' ``dciodvfy``: checks a file against its IOD's module tables (PS3.3)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from triage_node.peers.process import require_binary

__all__ = ["DciodvfyResult", "dciodvfy"]


@dataclass(frozen=True)
class DciodvfyResult:
    """Outcome of ``dciodvfy`` on one file.

    Attributes
    ----------
    errors : list of str
        Lines ``Error - ...`` (violations of PS3.3 module requirements), prefix removed.
    warnings : list of str
        Lines ``Warning - ...``, prefix removed.
    output : str
        The whole output.
    """

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    output: str = ""

    @property
    def ok(self) -> bool:
        return not self.errors


def dciodvfy(path: Path | str, timeout: float = 120) -> DciodvfyResult:
    """Verify a DICOM file against its IOD with dicom3tools' ``dciodvfy``."""
    proc = subprocess.run(
        [require_binary("dciodvfy"), str(path)],
        capture_output=True, text=True, errors="replace", timeout=timeout, check=False,
    )
    output = proc.stdout + proc.stderr
    errors: list[str] = []
    warnings: list[str] = []
    for line in output.splitlines():
        if line.startswith("Error - "):
            errors.append(line[len("Error - "):])
        elif line.startswith("Warning - "):
            warnings.append(line[len("Warning - "):])
    if proc.returncode != 0 and not errors and "Error" in output:
        errors.append(output.strip().splitlines()[-1])
    return DciodvfyResult(errors=errors, warnings=warnings, output=output)
