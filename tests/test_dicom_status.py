"""DIMSE statuses have one home (triage_node/dicom_status.py): no module writes them as bare numbers."""

from __future__ import annotations

import io
import tokenize
from pathlib import Path

from triage_node.dicom_status import StoreStatus
from triage_node.ingest import header

ROOT = Path(__file__).resolve().parent.parent
HOME = ROOT / "triage_node" / "dicom_status.py"


def _status_literals(path: Path) -> list[tuple[int, str]]:
    """4-digit hex literals in the failure ranges (0x0110..., 0xA000-0xCFFF) in code, not in text."""
    found = []
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if tok.type == tokenize.NUMBER and tok.string.lower().startswith("0x") and len(tok.string) == 6:
            value = int(tok.string, 16)
            if 0xA000 <= value <= 0xCFFF or value in (0x0110, 0x0122, 0x0124, 0x0211, 0x0212):
                found.append((tok.start[0], tok.string))
    return found


def test_no_bare_status_numbers_outside_their_module():
    offenders = {}
    for package in ("triage_node", "worker"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path != HOME and (hits := _status_literals(path)):
                offenders[str(path.relative_to(ROOT))] = hits
    assert offenders == {}, f"use triage_node.dicom_status.StoreStatus instead: {offenders}"


def test_the_scan_would_see_one():
    sample = Path(__file__).with_name("__status_sample.py")
    try:
        sample.write_text("STATUS = 0xA700  # 0xC000 in a comment is fine\n")
        assert _status_literals(sample) == [(1, "0xA700")]
    finally:
        sample.unlink()


def test_members_are_the_ints_pynetdicom_and_json_take():
    assert StoreStatus.OUT_OF_RESOURCES == 0xA700 and StoreStatus.OUT_OF_RESOURCES.hex == "0xA700"
    assert header.OBJECT_TOO_LARGE is StoreStatus.OUT_OF_RESOURCES_TOO_LARGE
    assert isinstance(header.SUCCESS, int) and header.SUCCESS == 0
