"""Helpers for the study-pipeline tests: databases on both engines, small CT files,
rows created directly, and a real Celery worker process running `tests.celery_probe`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from sqlalchemy.orm import Session, sessionmaker

from triage_node.db import schema
from triage_node.db.models import Instance, Series, Study
from triage_node.db.session import make_engine, make_sessionmaker
from triage_node.synth.ct_series import ct_slice_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated, empty database on SQLite and on PostgreSQL (a fresh database)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'triage.db'}"
    else:
        url = request.getfixturevalue("postgres_db")
    schema.upgrade(url)
    return url


@pytest.fixture
def session_factory(database_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(database_url)
    try:
        yield make_sessionmaker(engine)
    finally:
        engine.dispose()


# -- DICOM files -------------------------------------------------------------------------


def ct_dataset(
    study_uid: str,
    series_uid: str,
    sop_uid: str | None = None,
    *,
    instance_number: int = 1,
    z: float = 0.0,
    kernel: str = "H30s",
    thickness: float = 5.0,
    description: str = "HEAD W/O CONTRAST",
    body_part: str = "HEAD",
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    window_width: float | None = 80.0,
    size: int = 8,
    patient_name: str = "Doe^Jane",
    priority: str | None = None,
) -> Dataset:
    """A small but complete CT Image Storage dataset (PS3.3 A.3) with file meta."""
    ds = ct_slice_dataset(
        np.full((size, size), 1064, dtype=np.uint16),
        study_uid=study_uid, series_uid=series_uid, sop_uid=sop_uid, instance_number=instance_number,
        position=[-100.0, -100.0, float(z)], orientation=[1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
        slice_thickness=thickness, bits_stored=12,
    )
    ds.PatientName = patient_name
    ds.PatientID = "PID-0001"
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.StudyDescription = "CT HEAD"
    ds.SeriesDescription = description
    ds.BodyPartExamined = body_part
    ds.ImageType = list(image_type)
    ds.ConvolutionKernel = kernel
    ds.SeriesNumber = 2
    if window_width is not None:
        ds.WindowCenter = 40
        ds.WindowWidth = window_width
    if priority:
        ds.RequestedProcedurePriority = priority
    return ds


def part10(ds: Dataset) -> bytes:
    """Encode as a Part 10 file (preamble, file meta, dataset; PS3.10 7.1)."""
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def ct_series_files(n: int, *, study_uid: str | None = None, series_uid: str | None = None,
                    spacing: float = 5.0, **kwargs: object) -> list[bytes]:
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    return [
        part10(ct_dataset(study_uid, series_uid, instance_number=i + 1, z=i * spacing, **kwargs))
        for i in range(n)
    ]


# -- rows created directly ---------------------------------------------------------------


@dataclass
class SeriesSpec:
    n: int = 20
    kernel: str | None = "H30s"
    thickness: float | None = 5.0
    description: str | None = "HEAD W/O CONTRAST"
    body_part: str | None = "HEAD"
    image_type: str | None = "ORIGINAL\\PRIMARY\\AXIAL"
    contrast_agent: str | None = None
    modality: str = "CT"
    series_number: int = 2
    expected: int | None = None
    spacing: float = 5.0
    numbers: Sequence[int] | None = None
    window_width: float | None = None


def add_series(
    factory: sessionmaker[Session],
    study_uid: str,
    spec: SeriesSpec | None = None,
    *,
    series_uid: str | None = None,
    received_at: datetime | None = None,
    calling_ae: str = "CT_SCANNER",
    requested_priority: str | None = None,
) -> str:
    """Create (or extend) a study with one series of ``spec.n`` instance rows."""
    spec = spec or SeriesSpec()
    series_uid = series_uid or generate_uid()
    when = received_at or datetime.now(UTC)
    with factory() as session, session.begin():
        study = session.query(Study).filter_by(study_uid=study_uid).one_or_none()
        if study is None:
            study = Study(study_uid=study_uid, modality="CT", calling_ae=calling_ae,
                          requested_priority=requested_priority, study_description="CT HEAD")
            session.add(study)
            session.flush()
        series = Series(
            study_id=study.id, series_uid=series_uid, modality=spec.modality,
            series_number=spec.series_number, description=spec.description,
            body_part=spec.body_part, image_type=spec.image_type,
            convolution_kernel=spec.kernel, slice_thickness=spec.thickness,
            contrast_agent=spec.contrast_agent, sop_class_uid=CTImageStorage,
            expected_instances=spec.expected, instance_count=spec.n,
            window_width=spec.window_width, first_received_at=when, last_received_at=when,
        )
        session.add(series)
        session.flush()
        numbers = list(spec.numbers) if spec.numbers is not None else list(range(1, spec.n + 1))
        for i, number in enumerate(numbers):
            session.add(Instance(
                series_id=series.id, sop_uid=generate_uid(), version=1,
                sop_class_uid=CTImageStorage, transfer_syntax=ExplicitVRLittleEndian,
                instance_number=number, slice_position=i * spec.spacing,
                path=f"/nonexistent/{i}.dcm", sha256="0" * 64, size_bytes=1,
                calling_ae=calling_ae, source="dimse", received_at=when,
            ))
    return series_uid


def add_instances(factory: sessionmaker[Session], series_uid: str, numbers: Sequence[int],
                  spacing: float = 5.0, received_at: datetime | None = None) -> None:
    """Late instances for an existing series."""
    when = received_at or datetime.now(UTC)
    with factory() as session, session.begin():
        series = session.query(Series).filter_by(series_uid=series_uid).one()
        for number in numbers:
            session.add(Instance(
                series_id=series.id, sop_uid=generate_uid(), version=1,
                sop_class_uid=CTImageStorage, transfer_syntax=ExplicitVRLittleEndian,
                instance_number=number, slice_position=(number - 1) * spacing,
                path="/nonexistent/late.dcm", sha256="0" * 64, size_bytes=1,
                calling_ae="CT_SCANNER", source="dimse", received_at=when,
            ))
        series.instance_count += len(numbers)
        series.last_received_at = when


def later(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


# -- a real Celery worker ----------------------------------------------------------------


class ProbeWorker:
    """``celery -A tests.celery_probe worker`` in a subprocess; each task it runs
    appends ``job_id version queue`` to ``out``."""

    def __init__(self, data_dir: Path, broker_url: str | None = None) -> None:
        self.data_dir = data_dir
        self.out = data_dir / "probe-tasks.txt"
        self.log_path = data_dir / "probe-worker.log"
        self.env = {
            **os.environ,
            "TRIAGE_DATA_DIR": str(data_dir),
            "PROBE_OUT": str(self.out),
            "PYTHONPATH": str(REPO_ROOT),
        }
        self.env.pop("TRIAGE_CONFIG_FILE", None)
        if broker_url:
            self.env["TRIAGE_BROKER_URL"] = broker_url
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 45.0) -> ProbeWorker:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "tests.celery_probe", "worker",
                 "-Q", "stat,routine", "-P", "solo", "-c", "1", "--without-heartbeat",
                 "--without-gossip", "--without-mingle", "-l", "INFO", "-n", "probe@%h"],
                cwd=REPO_ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"probe worker exited:\n{self.log_path.read_text()[-3000:]}")
            if "ready." in self.log_path.read_text(errors="replace"):
                return self
            time.sleep(0.1)
        raise RuntimeError(f"probe worker not ready:\n{self.log_path.read_text()[-3000:]}")

    def tasks(self) -> list[tuple[int, int, str]]:
        if not self.out.exists():
            return []
        rows = []
        for line in self.out.read_text().splitlines():
            job_id, version, queue = line.split()
            rows.append((int(job_id), int(version), queue))
        return rows

    def wait_for(self, count: int, timeout: float = 20.0) -> list[tuple[int, int, str]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            tasks = self.tasks()
            if len(tasks) >= count:
                return tasks
            time.sleep(0.05)
        raise AssertionError(
            f"worker ran {self.tasks()} (wanted {count}):\n{self.log_path.read_text()[-3000:]}"
        )

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(15)

    def __enter__(self) -> ProbeWorker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- the API on a real HTTP server ----------------------------------------------------------


class LiveServer:
    """Run an ASGI app with uvicorn on a free loopback port in a thread."""

    def __init__(self, app) -> None:  # type: ignore[no-untyped-def]
        import threading

        import uvicorn

        from triage_node.peers import free_port

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off",
        ))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def multipart_related(parts: Sequence[bytes], boundary: str = "triage-boundary-1",
                      part_type: str = "application/dicom") -> bytes:
    """A multipart/related body (RFC 2387) with one ``part_type`` part per item."""
    out = bytearray()
    for data in parts:
        out += f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode()
        out += data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out)
