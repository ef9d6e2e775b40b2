"""``triage-node synth`` end to end, and tilt geometry as written in the files."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom

from triage_node.synth import write_dataset
from triage_node.synth.study import plan_study

CLI = Path(sys.executable).with_name("triage-node")


def test_synth_help_lists_the_options() -> None:
    proc = subprocess.run([str(CLI), "synth", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for option in ("--out", "--studies", "--seed", "--positive-fraction", "--subtypes", "--thin",
                   "--transfer-syntax", "--profile", "--rows", "--preview"):
        assert option in proc.stdout


def test_synth_writes_studies_labels_and_previews(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    proc = subprocess.run(
        [str(CLI), "synth", "--out", str(out), "--studies", "2", "--seed", "3", "--positive-fraction", "1",
         "--subtypes", "subdural,epidural", "--rows", "256", "--transfer-syntax", "rle", "--preview"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "wrote 2 studies (2 positive)" in proc.stdout and "studies/s" in proc.stdout
    truths = json.loads((out / "studies.json").read_text())
    assert len(truths) == 2
    files = list(out.rglob("*.dcm"))
    assert len(files) == sum(s["n_instances"] for t in truths for s in t["series"])
    for t in truths:
        assert t["positive"] and set(t["subtypes"]) <= {"subdural", "epidural"}
        for s in t["series"]:
            assert (out / t["study_uid"] / s["series_uid"]).is_dir()
    with open(out / "labels.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["ID", "Label"]
    axial = [s for t in truths for s in t["series"] if s["role"] == "axial"]
    assert len(rows) - 1 == 6 * sum(s["n_instances"] for s in axial)
    ids = {r[0] for r in rows[1:]}
    uid = axial[0]["sop_instance_uids"][0]
    for sub in ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any"):
        assert f"ID_{uid}_{sub}" in ids
    positives = {r[0].rsplit("_", 1)[1] for r in rows[1:] if r[1] == "1"}
    assert "any" in positives and positives <= {"any", "subdural", "epidural"}
    previews = sorted(p.name for p in (out / "preview").glob("*.png"))
    assert previews == [f"{i:04d}_{w}.png" for i in range(2) for w in ("bone", "brain", "subdural")]


def test_synth_rejects_an_unknown_subtype(tmp_path: Path) -> None:
    proc = subprocess.run([str(CLI), "synth", "--out", str(tmp_path), "--subtypes", "tumour"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "subtypes" in proc.stderr


def test_tilted_files_carry_consistent_orientation_and_positions(tmp_path: Path) -> None:
    seed = next(s for s in range(100) if abs(plan_study(s, 0).tilt_deg) > 5)
    truth = write_dataset(tmp_path, studies=1, seed=seed, rows=256, components=("axial",))[0]
    series = truth.series[0]
    assert series.tilt_deg == plan_study(seed, 0).tilt_deg
    datasets = sorted(
        (pydicom.dcmread(p, stop_before_pixels=True) for p in (tmp_path / truth.study_uid).rglob("*.dcm")),
        key=lambda ds: int(ds.InstanceNumber),
    )
    iop = np.array(datasets[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    tilt = float(datasets[0].GantryDetectorTilt)
    assert tilt == series.tilt_deg
    assert np.isclose(np.degrees(np.arccos(abs(normal[2]))), abs(tilt), atol=1e-3)
    assert np.isclose(np.degrees(np.arctan2(iop[5], iop[4])), tilt, atol=1e-3)
    ipp = np.array([ds.ImagePositionPatient for ds in datasets], dtype=float)
    steps = np.diff(ipp, axis=0) @ normal
    thickness = float(datasets[0].SliceThickness)
    np.testing.assert_allclose(np.abs(steps), thickness, atol=1e-3)
    assert np.all(np.sign(steps) == np.sign(steps[0]))
    for ds in datasets:
        assert list(ds.ImageOrientationPatient) == list(datasets[0].ImageOrientationPatient)
