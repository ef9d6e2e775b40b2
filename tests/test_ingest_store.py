"""InstanceStore on SQLite and PostgreSQL: rows, audit, duplicates, versions, failure statuses."""

from __future__ import annotations

import stat
import threading
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import MRImageStorage, RLELossless, generate_uid
from sqlalchemy import select, text
from structlog.testing import capture_logs

from tests.ingest_support import (
    PATIENT_ID,
    PATIENT_NAME,
    ct_dataset,
    database_url,  # noqa: F401  (fixture)
    dataset_bytes,
    part10,
)
from triage_node.config import load_settings
from triage_node.db import schema
from triage_node.db.models import AuditEvent, Instance, Series, Study
from triage_node.db.session import make_engine, make_sessionmaker
from triage_node.ingest.store import (
    CANNOT_UNDERSTAND,
    DATABASE_UNAVAILABLE,
    DATASET_DOES_NOT_MATCH_SOP_CLASS,
    INVALID_UID,
    OUT_OF_RESOURCES,
    SUCCESS,
    InstanceStore,
    slice_position,
)


class Env:
    def __init__(self, url: str, data_dir: Path, **overrides: object) -> None:
        values = {"data_dir": data_dir, "database_url": url, "min_free_disk_mb": 1, **overrides}
        self.settings = load_settings(**values)
        schema.upgrade(url)
        self.engine = make_engine(url)
        self.factory = make_sessionmaker(self.engine)
        self.stored: list[str] = []
        self.store = InstanceStore(self.settings, self.factory, on_stored=self.stored.append)

    def put(self, data: bytes, **kwargs: object):
        return self.store.store(data, calling_ae="CT_SCANNER", peer="127.0.0.1", source="dimse",
                                **kwargs)

    def audit(self, action: str) -> list[AuditEvent]:
        with self.factory() as s:
            return list(s.scalars(select(AuditEvent).where(AuditEvent.action == action)))

    def instances(self) -> list[Instance]:
        with self.factory() as s:
            return list(s.scalars(select(Instance).order_by(Instance.id)))

    def spooled(self) -> list[Path]:
        return sorted(p for p in self.settings.spool_dir.rglob("*") if p.is_file())


@pytest.fixture
def env(database_url: str, tmp_path: Path) -> Iterator[Env]:  # noqa: F811
    e = Env(database_url, tmp_path / "data")
    yield e
    e.engine.dispose()


def test_store_writes_the_bytes_the_rows_and_an_audit_row(env: Env) -> None:
    study, series = generate_uid(), generate_uid()
    sent = []
    for i in range(3):
        ds = ct_dataset(study, series, i)
        ds.NumberOfSeriesRelatedInstances = 3
        ds.WindowWidth = [80, 2800]  # brain and bone: the series row keeps the first
        sent.append((ds.SOPInstanceUID, part10(ds)))
    outcomes = [env.put(data) for _, data in sent]
    assert [o.status for o in outcomes] == [SUCCESS] * 3
    assert all(o.stored and not o.duplicate and o.version == 1 for o in outcomes)
    for (sop, data), outcome in zip(sent, outcomes, strict=True):
        assert outcome.path.read_bytes() == data
        assert outcome.path.name == f"{sop}.dcm"
        assert stat.S_IMODE(outcome.path.stat().st_mode) == 0o600
    with env.factory() as s:
        st = s.scalars(select(Study)).one()
        se = s.scalars(select(Series)).one()
        rows = list(s.scalars(select(Instance).order_by(Instance.instance_number)))
    assert st.study_uid == study and st.patient_name == PATIENT_NAME and st.patient_id == PATIENT_ID
    assert st.calling_ae == "CT_SCANNER"
    assert se.series_uid == series and se.instance_count == 3 and se.expected_instances == 3
    assert se.image_type == "ORIGINAL\\PRIMARY\\AXIAL" and se.body_part == "HEAD"
    assert se.convolution_kernel == "H30s" and se.slice_thickness == 5.0
    assert se.window_width == 80.0  # from the header as received, not read back from the spool
    assert [r.instance_number for r in rows] == [1, 2, 3]
    assert [r.slice_position for r in rows] == pytest.approx([10.0, 15.0, 20.0])
    assert {r.transfer_syntax for r in rows} == {"1.2.840.10008.1.2.1"}
    assert len(env.audit("instance.stored")) == 3
    assert env.stored == [series] * 3


def test_identical_object_twice_is_an_idempotent_success(env: Env) -> None:
    data = part10(ct_dataset(generate_uid(), generate_uid(), 0))
    first, again = env.put(data), env.put(data)
    assert first.status == again.status == SUCCESS
    assert not first.duplicate and again.duplicate and again.version == 1
    assert len(env.instances()) == 1 and len(env.spooled()) == 1
    assert len(env.audit("instance.duplicate")) == 1
    assert len(env.stored) == 1  # duplicates do not wake completeness


def test_same_dataset_with_other_file_meta_is_a_duplicate(env: Env) -> None:
    ds = ct_dataset(generate_uid(), generate_uid(), 0)
    first = part10(ds)
    ds.file_meta.ImplementationVersionName = "OTHER_SENDER"
    second = part10(ds)
    assert first != second
    assert env.put(first).version == 1
    assert env.put(second).duplicate


def test_different_object_under_a_known_sop_uid_is_a_new_audited_version(env: Env) -> None:
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    v1 = part10(ct_dataset(study, series, 0, sop_uid=sop, seed=1))
    v2 = part10(ct_dataset(study, series, 0, sop_uid=sop, seed=2))
    one, two = env.put(v1), env.put(v2)
    assert (one.version, two.version) == (1, 2) and not two.duplicate
    assert two.path.name == f"{sop}.v2.dcm"
    assert one.path.read_bytes() == v1 and two.path.read_bytes() == v2
    rows = env.instances()
    assert [(r.sop_uid, r.version) for r in rows] == [(sop, 1), (sop, 2)]
    assert rows[0].sha256 != rows[1].sha256
    [event] = env.audit("instance.new_version")
    assert event.sop_uid == sop and event.detail["version"] == 2
    with env.factory() as s:
        assert s.scalars(select(Series.instance_count)).one() == 1
    # Sending version 1 again is a duplicate of version 1, not a third version.
    assert env.put(v1).duplicate and len(env.instances()) == 2


@pytest.mark.parametrize(
    ("keyword", "value"),
    [("SOPInstanceUID", "../../x"), ("SeriesInstanceUID", "1.2.3/../../etc"),
     ("StudyInstanceUID", "1.2.abc"), ("SOPInstanceUID", "1." + "2" * 70)],
)
def test_invalid_uids_never_become_paths(env: Env, keyword: str, value: str) -> None:
    ds = ct_dataset(generate_uid(), generate_uid(), 0)
    setattr(ds, keyword, value)
    outcome = env.put(part10(ds))
    assert outcome.status == INVALID_UID and 0xC000 <= outcome.status <= 0xCFFF
    assert not outcome.stored and env.spooled() == [] and env.instances() == []
    [event] = env.audit("instance.rejected")
    assert event.outcome == "failed" and event.detail["status"] == "0xC001"
    assert keyword in event.detail["reason"]


def test_file_cut_inside_the_header_lacks_required_uids(env: Env) -> None:
    data = part10(ct_dataset(generate_uid(), generate_uid(), 0))[:300]
    assert env.put(data).status == DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert env.spooled() == []


def test_missing_sop_instance_uid_does_not_match_the_sop_class(env: Env) -> None:
    ds = ct_dataset(generate_uid(), generate_uid(), 0)
    del ds.SOPInstanceUID
    outcome = env.put(part10(ds))
    assert outcome.status == DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert "SOPInstanceUID" in env.audit("instance.rejected")[0].detail["reason"]


def test_sop_class_other_than_the_presentation_context_is_refused(env: Env) -> None:
    data = part10(ct_dataset(generate_uid(), generate_uid(), 0))
    outcome = env.put(data, expected_sop_class=MRImageStorage)
    assert outcome.status == DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert env.instances() == [] and env.spooled() == []


def test_sop_class_only_in_file_meta_is_accepted(env: Env) -> None:
    # De-identified files sometimes lack SOPClassUID in the data set (DESIGN.md).
    ds = ct_dataset(generate_uid(), generate_uid(), 0)
    del ds.SOPClassUID
    outcome = env.put(part10(ds))
    assert outcome.status == SUCCESS and outcome.sop_class_uid == ds.file_meta.MediaStorageSOPClassUID


@pytest.mark.parametrize("mangle", ["garbage", "truncated", "truncated_compressed", "no_meta"])
def test_unparseable_files_cannot_be_understood(env: Env, mangle: str) -> None:
    data = part10(ct_dataset(generate_uid(), generate_uid(), 0))
    if mangle == "garbage":
        data = b"\x00" * 128 + b"DICM" + bytes(range(256)) * 4
    elif mangle == "truncated":
        data = data[:-100]
    elif mangle == "truncated_compressed":
        data = part10(ct_dataset(generate_uid(), generate_uid(), 0), RLELossless)[:-20]
    else:
        data = data[132:]
    outcome = env.put(data)
    assert outcome.status == CANNOT_UNDERSTAND
    assert env.spooled() == [] and env.instances() == []
    assert env.audit("instance.rejected")[0].detail["status"] == "0xC000"


def test_below_the_free_disk_watermark_nothing_is_written(database_url: str, tmp_path: Path) -> None:  # noqa: F811
    env = Env(database_url, tmp_path / "data", min_free_disk_mb=1 << 40)
    try:
        outcome = env.put(part10(ct_dataset(generate_uid(), generate_uid(), 0)))
        assert outcome.status == OUT_OF_RESOURCES
        assert env.spooled() == [] and env.instances() == []
        assert "free disk" in env.audit("instance.rejected")[0].detail["reason"]
    finally:
        env.engine.dispose()


@pytest.mark.parametrize("failing", ["write", "fsync"])
def test_a_failed_spool_write_is_out_of_resources_and_leaves_nothing(
    env: Env, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    """A full disk on the write (ENOSPC) or a failing one on the fsync (EIO)."""
    import errno
    import os

    real = getattr(os, failing)

    def fail_in_incoming(fd: int, *args: object) -> object:
        if Path(os.readlink(f"/proc/self/fd/{fd}")).parent.name == ".incoming":
            raise OSError(errno.ENOSPC if failing == "write" else errno.EIO, "simulated")
        return real(fd, *args)

    monkeypatch.setattr(os, failing, fail_in_incoming)
    outcome = env.put(part10(ct_dataset(generate_uid(), generate_uid(), 0)))
    assert outcome.status == OUT_OF_RESOURCES and not outcome.stored
    assert env.spooled() == [] and env.instances() == []
    assert "spool write failed" in env.audit("instance.rejected")[0].detail["reason"]
    assert env.stored == []


def _break_instance_inserts(env: Env) -> None:
    with env.engine.begin() as conn:
        if env.engine.dialect.name == "sqlite":
            conn.execute(text(
                "CREATE TRIGGER no_instances BEFORE INSERT ON instances "
                "BEGIN SELECT RAISE(ABORT, 'simulated database failure'); END"
            ))
        else:
            conn.execute(text(
                "CREATE FUNCTION no_instances() RETURNS trigger AS $$ BEGIN "
                "RAISE EXCEPTION 'simulated database failure'; END $$ LANGUAGE plpgsql"
            ))
            conn.execute(text(
                "CREATE TRIGGER no_instances BEFORE INSERT ON instances "
                "FOR EACH ROW EXECUTE FUNCTION no_instances()"
            ))


def test_database_failure_is_never_a_success_and_leaves_no_file(env: Env) -> None:
    _break_instance_inserts(env)
    outcome = env.put(part10(ct_dataset(generate_uid(), generate_uid(), 0)))
    assert outcome.status == DATABASE_UNAVAILABLE and 0xA700 <= outcome.status <= 0xA7FF
    assert not outcome.stored
    assert env.spooled() == []
    with env.factory() as s:
        assert s.scalars(select(Series)).all() == []  # the whole transaction rolled back
    assert env.audit("instance.rejected")[0].detail["status"] == "0xA701"
    assert env.stored == []


def test_database_failure_keeps_older_versions(env: Env) -> None:
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    v1 = env.put(part10(ct_dataset(study, series, 0, sop_uid=sop, seed=1)))
    _break_instance_inserts(env)
    v2 = env.put(part10(ct_dataset(study, series, 0, sop_uid=sop, seed=2)))
    assert v2.status == DATABASE_UNAVAILABLE
    assert env.spooled() == [v1.path] and v1.path.exists()


def test_concurrent_series_of_one_study_from_several_threads(env: Env) -> None:
    study = generate_uid()
    series_uids = [generate_uid() for _ in range(4)]
    errors: list[object] = []

    def send(series: str) -> None:
        for i in range(5):
            outcome = env.put(part10(ct_dataset(study, series, i)))
            if outcome.status != SUCCESS:
                errors.append(outcome)

    threads = [threading.Thread(target=send, args=(s,)) for s in series_uids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with env.factory() as s:
        assert len(s.scalars(select(Study)).all()) == 1
        counts = dict(s.execute(select(Series.series_uid, Series.instance_count)).all())
    assert counts == {uid: 5 for uid in series_uids}


def test_patient_identifiers_never_reach_a_log_event(env: Env) -> None:
    ds = ct_dataset(generate_uid(), generate_uid(), 0)
    bad = ds.copy()
    bad.SOPInstanceUID = "../x"
    with capture_logs() as logs:
        env.put(part10(ds))
        env.put(part10(bad))
    text_of_logs = repr(logs)
    assert logs and PATIENT_NAME not in text_of_logs and PATIENT_ID not in text_of_logs
    assert "Zyxwv" not in text_of_logs


def test_slice_position_projects_on_the_slice_normal() -> None:
    ds = ct_dataset("1.2", "1.2.3", 0)
    # Gantry tilt: rows along x, columns tilted 20 degrees out of the y axis.
    import math

    c, s = math.cos(math.radians(20)), math.sin(math.radians(20))
    ds.ImageOrientationPatient = [1, 0, 0, 0, c, -s]
    ds.ImagePositionPatient = [3.0, 4.0, 50.0]
    normal = (0.0, s, c)  # row x column
    assert slice_position(ds) == pytest.approx(4.0 * normal[1] + 50.0 * normal[2])
    del ds.ImageOrientationPatient
    assert slice_position(ds) is None


def test_stow_source_is_recorded(env: Env) -> None:
    data = part10(ct_dataset(generate_uid(), generate_uid(), 0))
    outcome = env.store.store(data, calling_ae="token-a", peer="10.0.0.9", source="stow")
    assert outcome.ok
    [row] = env.instances()
    assert row.source == "stow"
    assert env.audit("instance.stored")[0].actor == "stow:token-a"
    assert dcmread(BytesIO(outcome.path.read_bytes())).SOPInstanceUID == row.sop_uid


def test_concurrent_different_objects_under_one_sop_uid_get_distinct_versions(env: Env) -> None:
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    payloads = [part10(ct_dataset(study, series, 0, sop_uid=sop, seed=s)) for s in range(6)]
    outcomes: list = []
    barrier = threading.Barrier(len(payloads))

    def send(data: bytes) -> None:
        barrier.wait()
        outcomes.append(env.put(data))

    threads = [threading.Thread(target=send, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(o.version for o in outcomes) == [1, 2, 3, 4, 5, 6]
    assert all(o.status == SUCCESS for o in outcomes)
    # Every row's file holds exactly the object whose digest the row records.
    import hashlib

    for row in env.instances():
        data = Path(row.path).read_bytes()
        assert data in payloads
        assert hashlib.sha256(dataset_bytes(data)).hexdigest() == row.sha256
    assert len(env.spooled()) == 6
