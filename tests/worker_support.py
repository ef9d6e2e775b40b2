"""Helpers for the worker tests: a small exported model repository with its model card.

The repository is exported by the model engineer's real code path
(:func:`worker.model.export.export_repository`) from a randomly initialised narrow
network, so the backends, the Triton server and the pipeline run on real ONNX files in
seconds. Tests that need the shipped model use ``deploy/triton`` when it is present.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from triage_node import CLASSES
from triage_node.config import DEFAULT_MODEL_CARD, DEFAULT_MODEL_REPOSITORY


def build_small_repository(out_dir: Path, size: int = 64, seed: int = 0, threshold: float = 0.5,
                           backbone: str = "resnet-lite") -> Path:
    """Export a slice CNN (default resnet-lite) + GRU to ``out_dir`` (Triton layout) and write its card.

    Returns the path of ``model_card.json``; the repository is ``out_dir / "models"``.
    ``threshold`` is every class's threshold at both operating points.
    """
    import torch

    from worker.inference.card import ModelCard, ServedModel, write_model_card
    from worker.model.export import SEQUENCE_MODEL, SLICE_MODEL, export_repository
    from worker.model.networks import SequenceModel, SliceCNN
    from worker.pipeline.preprocess import WINDOWS, channel_plan

    torch.manual_seed(seed)
    cnn = SliceCNN(backbone)
    seq = SequenceModel(cnn.feature_dim, hidden=16)
    info = export_repository(cnn, seq, size, out_dir)
    plan = channel_plan("windows")
    ops = {c: threshold for c in CLASSES}
    card = ModelCard(
        name="ich-test-net",
        version="0.0.1-test",
        device_uid="1.2.826.0.1.3680043.10.1234.1",
        created_utc=datetime.now(UTC).isoformat(),
        classes=CLASSES,
        backbone=backbone,
        input_variant="windows",
        input_size=size,
        windows={name: WINDOWS[name] for _, name in plan},
        channel_plan=tuple(plan),
        embedding_dim=info["embedding_dim"],
        feature_channels=info["feature_channels"],
        feature_map_size=info["feature_map_size"],
        triton_batching="none",
        slice_model=ServedModel(name=SLICE_MODEL, input="image", outputs=("logits", "embedding", "features")),
        sequence_model=ServedModel(name=SEQUENCE_MODEL, input="sequence", outputs=("logits",)),
        operating_points={"high_sensitivity": ops, "balanced": ops},
        cam_head=info["cam_head"],
    )
    return write_model_card(card, Path(out_dir) / "model_card.json")


def shipped_model() -> tuple[Path, Path] | None:
    """(repository, card) of the model in ``deploy/triton`` when it has been exported."""
    slice_onnx = DEFAULT_MODEL_REPOSITORY / "ich_slice_cnn" / "1" / "model.onnx"
    if DEFAULT_MODEL_CARD.is_file() and slice_onnx.is_file():
        return DEFAULT_MODEL_REPOSITORY, DEFAULT_MODEL_CARD
    return None


def write_ct_series(
    folder: Path,
    *,
    slices: int = 12,
    size: int = 128,
    bleed: bool = False,
    seed: int = 0,
    study_uid: str | None = None,
    requested_priority: str | None = None,
    tilt_deg: float = 0.0,
) -> list[Path]:
    """Write a small non-contrast head CT series (CT Image Storage, PS3.3 A.3) as Part 10 files.

    An elliptical skull (bone) around brain (~35 HU) in air, 5 mm axial slices; with
    ``bleed`` a ~65 HU blob in a few middle slices. Signed pixels with intercept -1024, as
    scanners write them. Headers pass the node's series-selection rules (CT, HEAD,
    ORIGINAL\\PRIMARY\\AXIAL, soft kernel). ``tilt_deg`` tilts the gantry about the
    patient's left-right axis, as head CTs often are (up to about 20 degrees).
    """
    import numpy as np
    from pydicom.uid import generate_uid

    from triage_node.synth.ct_series import ct_slice_dataset

    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = size / 2, size / 2
    t = np.deg2rad(tilt_deg)
    row_dir = np.array([1.0, 0.0, 0.0])
    col_dir = np.array([0.0, np.cos(t), -np.sin(t)])
    normal = np.cross(row_dir, col_dir)
    origin = np.array([-0.25 * size, -0.25 * size, 0.0])
    paths = []
    for z in range(slices):
        scale = 1.0 - 0.5 * abs(z - slices / 2) / slices
        r = ((yy - cy) / (0.42 * size * scale)) ** 2 + ((xx - cx) / (0.36 * size * scale)) ** 2
        hu = np.full((size, size), -1000.0, np.float32)
        hu[r <= 1.0] = 1000.0
        hu[r <= 0.85] = 35.0
        if bleed and abs(z - slices // 2) <= 1:
            br = ((yy - cy + 0.1 * size) / (0.08 * size)) ** 2 + ((xx - cx - 0.12 * size) / (0.06 * size)) ** 2
            hu[br <= 1.0] = 65.0
        hu += rng.normal(0, 4, hu.shape).astype(np.float32)
        ds = ct_slice_dataset(
            np.clip(hu + 1024, -32768, 32767).astype(np.int16),
            study_uid=study_uid, series_uid=series_uid,
            frame_uid=generate_uid(entropy_srcs=[study_uid, "for"]), instance_number=z + 1,
            position=[round(float(v), 4) for v in origin + 5.0 * z * normal],
            orientation=[round(float(v), 6) for v in (*row_dir, *col_dir)],
            pixel_spacing=[0.5 * 512 / size, 0.5 * 512 / size], slice_thickness=5.0,
        )
        ds.PatientName = "Phantom^Test"
        ds.PatientID = "PH-0001"
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.AccessionNumber = "ACC0001"
        ds.ReferringPhysicianName = ""
        ds.StudyID = "1"
        ds.StudyDescription = "CT HEAD WO CONTRAST"
        ds.SeriesDescription = "Head 5mm brain"
        ds.BodyPartExamined = "HEAD"
        ds.Manufacturer = "TestPhantom"
        ds.SeriesNumber = 2
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ConvolutionKernel = "H30s"
        ds.KVP = 120
        ds.PatientPosition = "HFS"
        ds.SliceLocation = 5.0 * z
        ds.PositionReferenceIndicator = ""
        ds.RescaleType = "HU"
        ds.WindowCenter = 40
        ds.WindowWidth = 80
        ds.AcquisitionNumber = 1
        if requested_priority:
            item = type(ds)()
            item.RequestedProcedurePriority = requested_priority
            ds.RequestAttributesSequence = [item]
        path = folder / f"{z + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def ingest_files(settings, session_factory, paths, *, calling_ae: str = "TESTSCU", enqueuer=None):  # type: ignore[no-untyped-def]
    """Store files through the node's real InstanceStore and complete their series.

    ``enqueuer`` gets the new job ids (default: none is sent). Returns the job ids.
    """
    from triage_node.ingest.store import InstanceStore
    from triage_node.studies.completeness import CompletenessTracker

    store = InstanceStore(settings, session_factory)
    series: list[str] = []
    for path in paths:
        outcome = store.store(Path(path).read_bytes(), calling_ae=calling_ae, peer="127.0.0.1", source="dimse")
        assert outcome.stored or outcome.duplicate, outcome
        if outcome.series_uid not in series:
            series.append(outcome.series_uid)
    tracker = CompletenessTracker(settings, session_factory, enqueuer=enqueuer or (lambda ids: None))
    job_ids: list[int] = []
    for uid in series:
        job_ids += list(tracker.complete_series(uid, "test").job_ids)
    return job_ids
