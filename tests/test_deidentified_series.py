"""A de-identified research series (RSNA-challenge style) is selected by its geometry and triaged.

The export keeps what the RSNA 2019 intracranial-hemorrhage files keep: UIDs (replaced by
valid ones), PatientID ``ID_...``, geometry, pixel module, windows and rescale; no
ImageType, no names or descriptions, and the SOP Class only in the file meta. The
study goes through the node's real store and completeness tracker and ``run_job``.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from tests.worker_support import build_small_repository, ingest_files, write_ct_series
from triage_node.config import load_settings
from triage_node.db import schema
from triage_node.db.models import JobState, Result, SelectionDecision, Series
from worker.pipeline.context import build_context
from worker.pipeline.run import run_job

#: What the RSNA 2019 files keep (ImageType dropped, as in the challenge's test set).
KEPT = {
    "SOPInstanceUID", "Modality", "PatientID", "StudyInstanceUID", "SeriesInstanceUID",
    "StudyID", "ImagePositionPatient", "ImageOrientationPatient", "SamplesPerPixel",
    "PhotometricInterpretation", "Rows", "Columns", "PixelSpacing", "BitsAllocated",
    "BitsStored", "HighBit", "PixelRepresentation", "WindowCenter", "WindowWidth",
    "RescaleIntercept", "RescaleSlope", "PixelData",
}
SLICES = 12


def deidentify(paths: list[Path], patient_id: str = "ID_52c1ab5a") -> None:
    """Reduce each file to the RSNA attribute set, in place."""
    for path in paths:
        ds = pydicom.dcmread(path)
        for elem in list(ds):
            if elem.keyword not in KEPT:
                del ds[elem.tag]
        ds.PatientID = patient_id
        ds.save_as(path, enforce_file_format=True)


def resliced_sagittal(paths: list[Path]) -> None:
    """Make a series a sagittal stack (a reformat as exports carry them): slices along x."""
    for index, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
        ds.ImagePositionPatient = [-60.0 + 5.0 * index, -128.0, 128.0]
        ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def model_card(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_small_repository(tmp_path_factory.mktemp("model"), threshold=0.3)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'triage.db'}"
    return request.getfixturevalue("postgres_db")


def test_deidentified_series_without_image_type_is_selected_by_geometry_and_triaged(
    tmp_path: Path, model_card: Path, database_url: str
) -> None:
    axial = write_ct_series(tmp_path / "axial", slices=SLICES, bleed=True, tilt_deg=12)
    study_uid = pydicom.dcmread(axial[0], stop_before_pixels=True).StudyInstanceUID
    sagittal = write_ct_series(tmp_path / "sagittal", slices=SLICES, study_uid=study_uid, seed=1)
    resliced_sagittal(sagittal)
    deidentify(axial)
    deidentify(sagittal)
    sent = pydicom.dcmread(axial[0])
    assert "ImageType" not in sent and "SOPClassUID" not in sent and "PatientName" not in sent
    assert sent.file_meta.MediaStorageSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"

    settings = load_settings(
        data_dir=tmp_path / "data", database_url=database_url,
        model_repository=model_card.parent / "models", model_card=model_card,
    )
    schema.upgrade(settings.effective_database_url)
    ctx = build_context(settings)
    try:
        job_ids = ingest_files(settings, ctx.session_factory, sagittal + axial)
        with ctx.session_factory() as session:
            rows = {s.series_uid: s for s in session.scalars(select(Series))}
        chosen = rows[sent.SeriesInstanceUID]
        other = rows[pydicom.dcmread(sagittal[0], stop_before_pixels=True).SeriesInstanceUID]
        assert chosen.selection == SelectionDecision.selected
        assert chosen.selection_reason.startswith(
            "no ImageType: axial by orientation (tilted 12°), 5.0 mm spacing, 256 mm field of view; "
        ), chosen.selection_reason
        assert chosen.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"
        assert other.selection == SelectionDecision.rejected
        assert other.selection_reason.startswith("no ImageType, and sagittal by orientation")

        outcome = run_job(ctx, job_ids[-1], 1)
        assert outcome.ran and outcome.state == JobState.done
        with ctx.session_factory() as session:
            result = session.scalars(select(Result).where(Result.job_id == job_ids[-1])).one()
        assert len(result.slice_probabilities) == SLICES
        sr = pydicom.dcmread(Path(outcome.output_dir) / "sr.dcm")
        assert sr.StudyInstanceUID == study_uid
    finally:
        ctx.close()
