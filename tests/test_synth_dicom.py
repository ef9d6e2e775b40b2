"""Synthetic studies on disk: dciodvfy, decoding every transfer syntax, exact HU round trip."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from triage_node.peers import dciodvfy, require_binary
from triage_node.synth import render_axial, study_spec, write_dataset
from triage_node.synth.dicom_writer import MANUFACTURER, TRANSFER_SYNTAXES


def _series_dirs(root: Path, truth: dict) -> dict[str, Path]:
    return {s["role"]: root / truth["study_uid"] / s["series_uid"] for s in truth["series"]}


@pytest.fixture(scope="module")
def scanner_datasets(tmp_path_factory) -> list[Path]:
    """Scanner-profile studies with every series role: one with a thin series, one without."""
    first = tmp_path_factory.mktemp("synth_scanner_thin")
    write_dataset(first, studies=1, seed=20, thin=True, rows=256, transfer_syntax="mixed")
    second = tmp_path_factory.mktemp("synth_scanner")
    write_dataset(second, studies=1, seed=23, rows=256, transfer_syntax="jpeg-lossless")
    return [first, second]


def test_every_scanner_file_passes_dciodvfy(scanner_datasets: list[Path]) -> None:
    roles = set()
    checked = 0
    failures = {}
    for root in scanner_datasets:
        files = sorted(root.rglob("*.dcm"))
        truths = json.loads((root / "studies.json").read_text())
        roles |= {s["role"] for t in truths for s in t["series"]}
        assert len(files) == sum(s["n_instances"] for t in truths for s in t["series"])
        for path in files:
            result = dciodvfy(path)
            bad = [line for line in result.output.splitlines() if "Error" in line]
            if bad or result.errors:
                failures[path.name] = bad or result.errors
            checked += 1
    assert roles == {"localizer", "axial", "bone", "thin", "dose_summary"}
    assert not failures, f"{len(failures)} of {checked} files fail dciodvfy: {list(failures.items())[:3]}"


def test_scanner_headers_have_the_study_composition(scanner_datasets: list[Path]) -> None:
    for root in scanner_datasets:
        for truth in json.loads((root / "studies.json").read_text()):
            _check_composition(root, truth)


def _check_composition(root: Path, truth: dict) -> None:
    dirs = _series_dirs(root, truth)
    loc = pydicom.dcmread(next(dirs["localizer"].glob("*.dcm")))
    assert list(loc.ImageType) == ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    bone = pydicom.dcmread(next(dirs["bone"].glob("*.dcm")), stop_before_pixels=True)
    assert (float(bone.WindowCenter), float(bone.WindowWidth)) == (900.0, 2500.0)
    dose = pydicom.dcmread(next(dirs["dose_summary"].glob("*.dcm")))
    assert dose.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    axial = pydicom.dcmread(next(dirs["axial"].glob("*.dcm")), stop_before_pixels=True)
    assert axial.Manufacturer == MANUFACTURER
    assert axial.PatientName == truth["patient_name"] and "^" in str(axial.PatientName)
    assert axial.PatientID == truth["patient_id"] and axial.PatientID.startswith("PID")
    assert axial.StudyInstanceUID == truth["study_uid"] and axial.StudyInstanceUID.startswith("2.25.")
    assert float(axial.SliceThickness) == next(s for s in truth["series"] if s["role"] == "axial")[
        "slice_thickness"]


def _read_hu(path: Path) -> tuple[pydicom.Dataset, np.ndarray]:
    ds = pydicom.dcmread(path)
    return ds, ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


@pytest.mark.parametrize("syntax", sorted(TRANSFER_SYNTAXES))
@pytest.mark.parametrize("profile", ["scanner", "rsna"])
def test_lossless_syntaxes_round_trip_hu_exactly(tmp_path: Path, syntax: str, profile: str) -> None:
    seed = 31
    truth = write_dataset(tmp_path, studies=1, seed=seed, transfer_syntax=syntax, profile=profile, rows=256,
                          components=("axial",))[0]
    series = truth.series[0]
    rendered = render_axial(study_spec(seed, 0), rows=256, slice_thickness_mm=series.slice_thickness,
                            n_slices=series.n_instances, tilt_deg=series.tilt_deg, descending=series.descending)
    files = sorted((tmp_path / truth.study_uid / series.series_uid).glob("*.dcm"))
    assert len(files) == series.n_instances
    by_number = {}
    for path in files:
        ds, hu = _read_hu(path)
        assert ds.file_meta.TransferSyntaxUID == TRANSFER_SYNTAXES[syntax]
        by_number[int(ds.get("InstanceNumber", 0)) or series.sop_instance_uids.index(ds.SOPInstanceUID) + 1] = (
            ds, hu)
    for k in range(series.n_instances):
        ds, hu = by_number[k + 1]
        assert ds.SOPInstanceUID == series.sop_instance_uids[k]
        inside = rendered.fov_mask
        np.testing.assert_array_equal(hu[inside], rendered.hu[k][inside])
        outside = np.unique(hu[~inside])
        assert len(outside) == 1 and outside[0] in (-1024.0, -2000.0, -3024.0)
        if profile == "rsna":
            assert "PatientName" not in ds and "SliceThickness" not in ds and "SOPClassUID" not in ds
            assert ds.file_meta.MediaStorageSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
            assert len(ds.WindowCenter) == 2 and len(ds.WindowWidth) == 2


def test_rsna_profile_mixes_12_bit_unsigned_files(tmp_path: Path) -> None:
    truth = write_dataset(tmp_path, studies=1, seed=3, profile="rsna", rows=256, components=("axial",))[0]
    kinds = set()
    for path in (tmp_path / truth.study_uid).rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        kinds.add((int(ds.BitsStored), int(ds.PixelRepresentation), float(ds.RescaleIntercept)))
    assert (12, 0, -1024.0) in kinds and len(kinds) == 2


def test_jpeg_lossless_is_decoded_identically_by_dcmtk(tmp_path: Path) -> None:
    """Our Process 14 SV1 encoder against an independent decoder (DCMTK dcmdjpeg)."""
    dcmdjpeg = require_binary("dcmdjpeg")
    truth = write_dataset(tmp_path, studies=1, seed=8, transfer_syntax="jpeg-lossless", rows=256,
                          components=("axial",))[0]
    src = next((tmp_path / truth.study_uid).rglob("*.dcm"))
    dst = tmp_path / "decoded.dcm"
    subprocess.run([dcmdjpeg, str(src), str(dst)], check=True, capture_output=True, timeout=60)
    ours = pydicom.dcmread(src).pixel_array
    theirs = pydicom.dcmread(dst)
    assert theirs.file_meta.TransferSyntaxUID != TRANSFER_SYNTAXES["jpeg-lossless"]
    np.testing.assert_array_equal(theirs.pixel_array, ours)


def test_dataset_is_deterministic_from_the_seed(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((a, 4), (b, 4), (c, 5)):
        write_dataset(out, studies=1, seed=seed, rows=256, transfer_syntax="rle")
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert (a / "labels.csv").read_text() != (c / "labels.csv").read_text()
    shutil.rmtree(c)
