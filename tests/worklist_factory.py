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
        sr_sop_uid=generate_uid() if sr_series_uid else None,
        sr_series_uid=sr_series_uid,
        overlay_series_uid=overlay_series_uid,
        overlay_sop_uids=overlay_sop_uids or [],
        output_dir=output_dir,
        created_at=now,
    )
    session.add(result)
    session.flush()
    return result
