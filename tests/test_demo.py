"""`triage-node demo`, run once as a user runs it: real node, worker, broker and local PACS."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pydicom

from tests.worker_support import build_small_repository, shipped_model
from triage_node.peers import dciodvfy

TRIAGE_NODE = str(Path(sys.executable).parent / "triage-node")
#: On PYTHONPATH, its sitecustomize hides the [train] and [triton] extras from every process.
CORE_INSTALL = Path(__file__).with_name("core_install")


def test_demo_triages_and_delivers_every_study(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
    # the demo runs on the core install: no torch, MONAI or tritonclient in any of its processes
    env.update(OMP_NUM_THREADS="1", COLUMNS="160", PYTHONPATH=str(CORE_INSTALL))
    if shipped_model() is None:  # before the model is exported: a small one, same code path
        card = build_small_repository(tmp_path / "model", threshold=0.5)
        env.update(TRIAGE_MODEL_REPOSITORY=str(card.parent / "models"), TRIAGE_MODEL_CARD=str(card))
    out = tmp_path / "out"
    proc = subprocess.run(
        [TRIAGE_NODE, "demo", "--studies", "3", "--data-dir", str(tmp_path / "data"), "--out", str(out),
         "--timeout", "80"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    assert "Worklist, most urgent first" in text
    assert text.count(" done ") == 3, text
    assert "Received by the local PACS" in text
    received = sorted(out.rglob("*.dcm"))
    modalities = [pydicom.dcmread(p, stop_before_pixels=True).Modality for p in received]
    assert modalities.count("SR") == 3
    pngs = sorted(out.rglob("*.png"))
    assert len(list(out.glob("*/SR.json"))) == 3
    assert len(pngs) == modalities.count("OT") >= 3
    for path in received[:4] + [p for p, m in zip(received, modalities, strict=True) if m == "SR"][:1]:
        assert dciodvfy(path).ok, path
