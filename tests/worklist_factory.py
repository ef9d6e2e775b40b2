"""Rows for worklist, API and web tests, written straight into a migrated database.

No worker runs in these tests: a "result" is the row the worker would write.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy.orm import Session, sessionmaker

from triage_node import CLASSES
from triage_node.db import schema
from triage_node.db.models import Job, JobState, Result, Series, SeriesState, Study
from triage_node.db.session import make_engine, make_sessionmaker


@dataclass
class Database:
    url: str
    factory: sessionmaker[Session]


def migrated_database(url: str) -> Iterator[Database]:
    """Upgrade ``url`` to head and yield a session factory on it."""
    schema.upgrade(url)
    engine = make_engine(url)
    try:
        yield Database(url=url, factory=make_sessionmaker(engine))
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """A migrated database, once on SQLite and once on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'triage.db'}"
    else:
        url = request.getfixturevalue("postgres_db")
    yield from migrated_database(url)


@pytest.fixture
def sqlite_database(tmp_path: Path) -> Iterator[Database]:
    yield from migrated_database(f"sqlite:///{tmp_path / 'triage.db'}")


def add_study(
    session: Session,
    *,
    received_at: datetime | None = None,
    requested_priority: str | None = None,
    calling_ae: str = "CT_ED_1",
    modality: str = "CT",
    description: str = "CT HEAD WO CONTRAST",
    patient_name: str = "Test^Patient",
) -> Study:
    """A study with one complete axial CT series."""
    received_at = received_at or datetime.now(UTC)
    study = Study(
        study_uid=generate_uid(),
        patient_name=patient_name,
        patient_id="PID-" + generate_uid()[-6:],
        accession_number="ACC1",
        study_date=received_at.strftime("%Y%m%d"),
        study_description=description,
        modality=modality,
        calling_ae=calling_ae,
        requested_priority=requested_priority,
        received_at=received_at,
    )
    session.add(study)
    session.flush()
    series = Series(
        study_id=study.id,
        series_uid=generate_uid(),
        modality=modality,
        series_number=2,
        description="AXIAL 5mm",
        body_part="HEAD",
        instance_count=30,
        state=SeriesState.complete.value,
        first_received_at=received_at,
        last_received_at=received_at,
        selection="selected",
    )
    session.add(series)
    session.flush()
    return study


def add_result(
    session: Session,
    study: Study,
    probabilities: dict[str, float],
    *,
    positive: bool | None = None,
    state: str = JobState.done.value,
    version: int | None = None,
    created_at: datetime | None = None,
    output_dir: str | None = None,
    sr_series_uid: str | None = None,
    sr_sop_uid: str | None = None,
    overlay_series_uid: str | None = None,
    overlay_sop_uids: list[str] | None = None,
) -> Result:
    """A finished job of the study's first series and its result row."""
    series = study.series[0] if study.series else session.query(Series).filter_by(study_id=study.id).first()
    assert series is not None
    if version is None:
        version = 1 + session.query(Job).filter_by(series_id=series.id).count()
    now = created_at or datetime.now(UTC)
    job = Job(
        study_id=study.id,
        series_id=series.id,
        version=version,
        state=state,
        queue="stat",
        enqueued_at=now - timedelta(seconds=20),
        started_at=now - timedelta(seconds=15),
        inferred_at=now - timedelta(seconds=5),
        reported_at=now - timedelta(seconds=2),
        finished_at=now,
        created_at=now - timedelta(seconds=21),
    )
    session.add(job)
    session.flush()
    probs = {name: 0.0 for name in CLASSES}
    probs.update(probabilities)
    if positive is None:
        positive = probs["any"] >= 0.5
    decisions = {name: probs[name] >= 0.5 for name in CLASSES}
    result = Result(
        job_id=job.id,
        study_id=study.id,
        model_name="ich_sequence",
        model_version="0.1.0",
        device_uid="1.2.3.4",
        operating_point="high_sensitivity",
        positive=positive,
        study_probabilities=probs,
        decisions=decisions,
        slice_probabilities=[[probs[c] for c in CLASSES]] * 3,
        key_slices={name: [1] for name in CLASSES if decisions[name] and name != "any"},
        sr_sop_uid=sr_sop_uid or (generate_uid() if sr_series_uid else None),
        sr_series_uid=sr_series_uid,
        overlay_series_uid=overlay_series_uid,
        overlay_sop_uids=overlay_sop_uids or [],
        output_dir=output_dir,
        created_at=now,
    )
    session.add(result)
    session.flush()
    return result


# -- result objects on disk: CT source slices, an SC overlay series and an SR ----------
def ct_slice(study: Study, series_uid: str, index: int, size: int = 64):
    """One CT slice of the study (CT Image IOD), with a bright blob as the 'bleed'."""
    import numpy as np

    from triage_node.synth.ct_series import ct_slice_dataset

    yy, xx = np.mgrid[:size, :size]
    hu = np.where((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 2.3) ** 2, 35, -1000)
    hu = np.where((yy - size / 3) ** 2 + (xx - size / 2.5) ** 2 < (size / 10) ** 2, 75, hu)
    ds = ct_slice_dataset(
        hu.astype(np.int16), study_uid=study.study_uid, series_uid=series_uid,
        frame_uid="1.2.826.0.1.3680043.8.498.1", instance_number=index + 1,
        position=[0, 0, 5.0 * index], slice_thickness=5, intercept=0,
    )
    ds.PatientName, ds.PatientID = study.patient_name, study.patient_id
    ds.PatientBirthDate, ds.PatientSex = "", "O"
    ds.StudyDate = study.study_date
    ds.StudyTime, ds.StudyID, ds.ReferringPhysicianName = "120000", "1", ""
    ds.AccessionNumber = study.accession_number
    ds.Manufacturer, ds.SeriesNumber = "Test", 2
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PatientPosition = "HFS"
    return ds


def write_result_objects(out_dir: Path, study: Study, n_overlays: int = 2, size: int = 64) -> dict:
    """Write ``n_overlays`` RGB heat-map SC images and a TID 1500 SR under ``out_dir``.

    Returns the UIDs a Result row refers to.
    """
    import highdicom as hd
    import numpy as np
    from pydicom.sr.codedict import codes

    out_dir.mkdir(parents=True, exist_ok=True)
    source_series = generate_uid()
    sources = [ct_slice(study, source_series, i, size) for i in range(max(1, n_overlays))]
    overlay_series, sr_series = generate_uid(), generate_uid()
    overlay_sops = []
    for i, src in enumerate(sources[:n_overlays]):
        hu = np.frombuffer(src.PixelData, np.int16).reshape(size, size).astype(float)
        grey = np.clip(hu / 80.0, 0, 1)  # brain window 40/80
        yy, xx = np.mgrid[:size, :size]
        heat = np.exp(-(((yy - size / 3) ** 2 + (xx - size / 2.5) ** 2) / (2 * (size / 8) ** 2)))
        alpha = 0.6 * heat[..., None]
        colour = np.stack([np.ones_like(heat), heat, np.zeros_like(heat)], axis=-1)  # red-yellow
        rgb = ((1 - alpha) * grey[..., None] + alpha * colour) * 255
        rgb = np.clip(rgb, 0, 255).astype(np.uint8)
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=src, pixel_array=rgb, photometric_interpretation="RGB", bits_allocated=8,
            coordinate_system="PATIENT", series_instance_uid=overlay_series, series_number=901,
            sop_instance_uid=generate_uid(), instance_number=i + 1, manufacturer="Test",
            pixel_spacing=(0.5, 0.5), patient_orientation=("L", "P"),
        )
        sc.SeriesDescription = "AI ICH heat maps"
        sc.save_as(out_dir / f"overlay_{i:02d}.dcm", enforce_file_format=True)
        overlay_sops.append(str(sc.SOPInstanceUID))
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(uid=generate_uid()),
        )
    )
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=[
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="ICH"),
                qualitative_evaluations=[
                    hd.sr.QualitativeEvaluation(
                        name=hd.sr.CodedConcept("95453-2", "LN", "Intracranial hemorrhage"),
                        value=codes.SCT.Present if n_overlays else codes.SCT.Absent,
                    )
                ],
            )
        ],
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=sources, content=report, series_instance_uid=sr_series, series_number=900,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="Test",
    )
    sr.save_as(out_dir / "sr.dcm", enforce_file_format=True)
    return {
        "output_dir": str(out_dir),
        "sr_series_uid": sr_series,
        "sr_sop_uid": str(sr.SOPInstanceUID),
        "overlay_series_uid": overlay_series if n_overlays else None,
        "overlay_sop_uids": overlay_sops,
    }


# -- the API app with tokens ------------------------------------------------------------
@dataclass
class Api:
    """A node app on a migrated database, with one token per role."""

    settings: object
    db: Database
    app: object
    tokens: dict[str, str]

    def client(self, role: str | None = "viewer", host: str = "127.0.0.1"):
        from starlette.testclient import TestClient

        headers = {"Authorization": f"Bearer {self.tokens[role]}"} if role else {}
        return TestClient(self.app, headers=headers, client=(host, 50000), follow_redirects=False)


def build_api(db: Database, data_dir: Path, **overrides) -> Api:
    from triage_node.api.app import create_app
    from triage_node.api.auth import create_token
    from triage_node.config import load_settings
    from triage_node.db.session import transaction

    settings = load_settings(data_dir=data_dir, database_url=db.url, secret_key="api-test-secret-0123",
                             **overrides)
    tokens = {}
    with transaction(db.factory) as session:
        for role in ("viewer", "admin", "sender"):
            _, tokens[role] = create_token(session, settings, role, f"{role}-user", actor="test")
    return Api(settings=settings, db=db, app=create_app(settings, db.factory), tokens=tokens)


@pytest.fixture
def api(database: Database, tmp_path: Path) -> Api:
    """The API on SQLite and on PostgreSQL (through ``database``)."""
    return build_api(database, tmp_path / "data")


@pytest.fixture
def sqlite_api(sqlite_database: Database, tmp_path: Path) -> Api:
    return build_api(sqlite_database, tmp_path / "data")


class RunningApp:
    """The app served by a real uvicorn on a free loopback port (for HTTP clients and browsers)."""

    def __init__(self, app) -> None:
        import socket
        import threading

        import uvicorn

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None, access_log=False)
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> RunningApp:
        import time

        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
