"""Proof that every hermetic test server works: one real round trip each."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
import sqlalchemy as sa
from pydicom.uid import (
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

from triage_node.peers import (
    OrthancServer,
    PostgresServer,
    RedisServer,
    ServerError,
    dciodvfy,
    free_port,
    require_binary,
    storescu,
)
from triage_node.synth.ct_series import ct_slice_dataset


def make_ct_series(folder: Path, n: int = 3, size: int = 64) -> list[Path]:
    """Write ``n`` axial CT slices of one series (CT Image IOD, PS3.3 A.3) to ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    now = dt.datetime(2026, 1, 2, 3, 4, 5)
    rng = np.random.default_rng(0)
    paths = []
    for index in range(n):
        pixels = rng.integers(-1000, 100, size=(size, size), dtype=np.int16)
        ds = ct_slice_dataset(
            pixels, study_uid=study_uid, series_uid=series_uid, frame_uid=frame_uid,
            instance_number=index + 1, position=[-0.5 * size, -0.5 * size, 5.0 * index],
            pixel_spacing=[1.0, 1.0], slice_thickness=5.0, intercept="0", slope="1",
        )
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.AccessionNumber = "A1"
        ds.Manufacturer = "Test"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "CT HEAD WO CONTRAST"
        ds.PatientName = "Test^Server"
        ds.PatientID = "P1"
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.BodyPartExamined = "HEAD"
        ds.KVP = "120"
        ds.PatientPosition = "HFS"
        ds.StudyID = "1"
        ds.SeriesNumber = 2
        ds.AcquisitionNumber = 1
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = 5.0 * index
        ds.RescaleType = "HU"
        ds.WindowCenter = "40"
        ds.WindowWidth = "80"
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def test_postgres_runs_sql(postgres_url: str, postgres_db: str) -> None:
    assert postgres_url.startswith("postgresql+psycopg2://postgres@127.0.0.1:")
    assert postgres_url.endswith("/triage")
    for url in (postgres_url, postgres_db):
        engine = sa.create_engine(url)
        try:
            with engine.begin() as conn:
                conn.execute(sa.text("CREATE TABLE IF NOT EXISTS probe (id serial PRIMARY KEY, v text)"))
                conn.execute(sa.text("INSERT INTO probe (v) VALUES ('x'), ('y')"))
            with engine.connect() as conn:
                assert conn.execute(sa.text("SELECT count(*) FROM probe")).scalar() >= 2
                assert conn.execute(sa.text("SHOW server_version")).scalar().startswith("15")
        finally:
            engine.dispose()


def test_postgres_db_is_fresh_per_test(postgres_db: str) -> None:
    engine = sa.create_engine(postgres_db)
    try:
        with engine.connect() as conn:
            tables = conn.execute(
                sa.text("SELECT count(*) FROM information_schema.tables WHERE table_schema='public'")
            ).scalar()
        assert tables == 0
    finally:
        engine.dispose()


def test_redis_set_get_and_restart_loses_data(redis_server: RedisServer) -> None:
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.set("triage:probe", b"42")
    assert client.get("triage:probe") == b"42"
    redis_server.restart()
    client = redis.Redis.from_url(redis_server.url)
    assert client.get("triage:probe") is None  # no persistence: a restart empties it
    client.set("triage:probe", b"43")
    assert client.get("triage:probe") == b"43"
    client.close()


def test_storescu_to_orthanc_then_qido_finds_study(orthanc: OrthancServer, tmp_path: Path) -> None:
    files = make_ct_series(tmp_path / "study", n=3)
    study_uid = pydicom.dcmread(files[0]).StudyInstanceUID
    result = storescu(tmp_path / "study", "127.0.0.1", orthanc.dicom_port, orthanc.aet)
    assert result.returncode == 0, result.stderr
    assert len(orthanc.instances()) == 3

    response = httpx.get(
        f"{orthanc.dicomweb_url}/studies",
        params={"StudyInstanceUID": study_uid},
        headers={"Accept": "application/dicom+json"},
        timeout=30,
    )
    assert response.status_code == 200
    studies = response.json()
    assert len(studies) == 1
    assert studies[0]["0020000D"]["Value"] == [study_uid]
    # Number of Study Related Instances (0020,1208)
    assert studies[0]["00201208"]["Value"] == [3]


def test_synthetic_jpeg_lossless_study_reaches_orthanc(orthanc: OrthancServer, tmp_path: Path) -> None:
    from triage_node.synth.study import write_dataset

    (truth,) = write_dataset(
        tmp_path / "synth", 1, seed=3, rows=256, components=("axial",), transfer_syntax="jpeg-lossless"
    )
    files = sorted((tmp_path / "synth" / truth.study_uid).rglob("*.dcm"))
    assert files
    result = storescu(tmp_path / "synth" / truth.study_uid, "127.0.0.1", orthanc.dicom_port, orthanc.aet)
    assert result.returncode == 0, result.stderr

    response = httpx.get(
        f"{orthanc.dicomweb_url}/studies/{truth.study_uid}/series",
        headers={"Accept": "application/dicom+json"},
        timeout=30,
    )
    assert response.status_code == 200
    (series,) = response.json()
    # Number of Series Related Instances (0020,1209)
    assert series["00201209"]["Value"] == [len(files)]
    stored = orthanc.get(f"/instances/{orthanc.instances()[0]}/metadata/TransferSyntax").text
    assert stored == "1.2.840.10008.1.2.4.70"  # kept as sent: JPEG Lossless SV1


def test_orthanc_stop_refuses_then_start_keeps_storage(orthanc: OrthancServer, tmp_path: Path) -> None:
    files = make_ct_series(tmp_path / "s", n=1)
    assert storescu(files, "127.0.0.1", orthanc.dicom_port, orthanc.aet).returncode == 0
    orthanc.stop()
    refused = storescu(files, "127.0.0.1", orthanc.dicom_port, orthanc.aet, timeout=30)
    assert refused.returncode != 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(orthanc.http_url + "/system", timeout=2)
    orthanc.start()
    assert len(orthanc.instances()) == 1


def test_storescu_to_storescp_writes_file(storescp, tmp_path: Path) -> None:
    scp = storescp(aet="ARCHIVE")
    files = make_ct_series(tmp_path / "s", n=2)
    result = storescu(files, "127.0.0.1", scp.port, "ARCHIVE", calling_aet="NODE")
    assert result.returncode == 0, result.stderr
    received = scp.files()
    assert len(received) == 2
    sent = {pydicom.dcmread(p).SOPInstanceUID for p in files}
    got = {pydicom.dcmread(p).SOPInstanceUID for p in received}
    assert got == sent
    assert np.array_equal(pydicom.dcmread(received[0]).pixel_array.shape, (64, 64))


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=["rle", "j2k"])
def test_storescu_sends_compressed_files_as_they_are(storescp, tmp_path: Path, syntax) -> None:
    files = make_ct_series(tmp_path / "s", n=2)
    for path in files:
        ds = pydicom.dcmread(path)
        ds.compress(syntax)
        ds.save_as(path)
    scp = storescp(aet="ARCHIVE")
    result = storescu(tmp_path / "s", "127.0.0.1", scp.port, "ARCHIVE")
    assert result.returncode == 0, result.stderr
    received = scp.files()
    assert len(received) == 2
    originals = {ds.SOPInstanceUID: ds for ds in map(pydicom.dcmread, files)}
    for path in received:
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == syntax
        assert np.array_equal(ds.pixel_array, originals[ds.SOPInstanceUID].pixel_array)


def test_storescu_refuses_mixed_compressed_syntaxes(tmp_path: Path) -> None:
    files = make_ct_series(tmp_path / "s", n=2)
    for path, syntax in zip(files, (RLELossless, JPEG2000Lossless), strict=True):
        ds = pydicom.dcmread(path)
        ds.compress(syntax)
        ds.save_as(path)
    with pytest.raises(ValueError, match="several compressed transfer syntaxes"):
        storescu(files, "127.0.0.1", free_port(), "ANY")


def test_dciodvfy_passes_good_file_and_reports_bad_one(tmp_path: Path) -> None:
    good = make_ct_series(tmp_path / "good", n=1)[0]
    result = dciodvfy(good)
    assert result.errors == [], result.output
    assert "CTImage" in result.output  # it really recognised the IOD

    ds = pydicom.dcmread(good)
    del ds.Rows  # Image Pixel Module, Type 1 (PS3.3 C.7.6.3)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NOT_A_VALUE", "X", "Y"]
    bad = tmp_path / "bad.dcm"
    ds.save_as(bad)
    result = dciodvfy(bad)
    assert any("Rows" in line for line in result.errors), result.output


def test_missing_binary_is_a_clear_error() -> None:
    with pytest.raises(ServerError, match="not found: install the Debian package"):
        require_binary("definitely-not-a-dicom-tool")


def test_postgres_cleanup_removes_cluster() -> None:
    server = PostgresServer(database="probe")
    server.start()
    root = server.root
    assert root is not None and (root / "data" / "PG_VERSION").exists()
    assert server.execute("SELECT 1", database="probe") == [(1,)]
    server.cleanup()
    assert not root.exists()
