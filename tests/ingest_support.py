"""Helpers for the ingest tests: synthetic CT objects in every transfer syntax, a node to talk to.

Objects are built with pydicom (uncompressed, deflated, RLE and JPEG 2000 encoders)
and DCMTK ``dcmcjpeg`` (JPEG Lossless, processes 14 and 14 SV1) and ``dcmcjpls``
(JPEG-LS lossless and near-lossless), so each compressed file was produced by a real codec.
"""

from __future__ import annotations

import struct
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification

from triage_node.config import Settings, load_settings
from triage_node.db import schema
from triage_node.db.session import make_engine, make_sessionmaker
from triage_node.ingest.scp import StorageSCP
from triage_node.ingest.store import InstanceStore, dataset_offset
from triage_node.peers import require_binary
from triage_node.synth.ct_series import ct_slice_dataset

ALL_TRANSFER_SYNTAXES = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)

#: DCMTK encoders of the syntaxes pydicom cannot encode here, with their options.
DCMTK_ENCODERS = {
    JPEGLossless: ("dcmcjpeg", "+el"),
    JPEGLosslessSV1: ("dcmcjpeg", "+e1"),
    JPEGLSLossless: ("dcmcjpls", "+el"),
    JPEGLSNearLossless: ("dcmcjpls", "+en"),
}

PATIENT_NAME = "Zyxwv^Quentin"
PATIENT_ID = "PID-778899"


def ct_dataset(
    study_uid: str,
    series_uid: str,
    index: int,
    size: int = 32,
    sop_uid: str | None = None,
    seed: int = 0,
) -> Dataset:
    """One axial CT slice (CT Image Storage), slices 5 mm apart along z."""
    rng = np.random.default_rng(seed + index)
    ds = ct_slice_dataset(
        rng.integers(900, 1200, (size, size), dtype=np.int16),
        study_uid=study_uid, series_uid=series_uid, sop_uid=sop_uid, frame_uid=generate_uid(),
        instance_number=index + 1, position=[-100.0, -100.0, 10.0 + 5.0 * index],
    )
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.AccessionNumber = "ACC12345"
    ds.StudyDate = "20260102"
    ds.StudyDescription = "CT HEAD WO"
    ds.SeriesDescription = "Head 5mm"
    ds.BodyPartExamined = "HEAD"
    ds.SeriesNumber = 2
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ConvolutionKernel = "H30s"
    return ds


def part10(ds: Dataset, transfer_syntax: str = ExplicitVRLittleEndian) -> bytes:
    """Encode ``ds`` as a Part 10 file in an uncompressed or pydicom-encodable syntax."""
    ds = ds.copy()
    ds.file_meta = ds.file_meta.copy()
    if transfer_syntax in (RLELossless, JPEG2000Lossless):
        ds.compress(transfer_syntax)
    elif transfer_syntax == JPEG2000:
        ds.compress(transfer_syntax, j2k_cr=[1])
    else:
        ds.file_meta.TransferSyntaxUID = transfer_syntax
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True, implicit_vr=transfer_syntax == ImplicitVRLittleEndian,
               little_endian=True)
    return buffer.getvalue()


def encode_with_dcmtk(ds: Dataset, path: Path, transfer_syntax: str) -> None:
    """Write ``ds`` to ``path`` in ``transfer_syntax`` with DCMTK's encoder for it."""
    if transfer_syntax == JPEGLSNearLossless:
        # dcmcjpls encodes near-lossless only unsigned pixels; these are all positive.
        ds = ds.copy()
        ds.PixelRepresentation = 0
    tool, flag = DCMTK_ENCODERS[transfer_syntax]
    source = path.with_name(f".{path.name}.src")
    source.write_bytes(part10(ds))
    try:
        subprocess.run([require_binary(tool), flag, str(source), str(path)], check=True, capture_output=True)
    finally:
        source.unlink()


def write_series(
    folder: Path, n: int, transfer_syntax: str = ExplicitVRLittleEndian, size: int = 32,
    study_uid: str | None = None, series_uid: str | None = None,
) -> list[Path]:
    """Write ``n`` slices of one new series in ``transfer_syntax``; return the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    paths = []
    for i in range(n):
        ds = ct_dataset(study_uid, series_uid, i, size=size)
        path = folder / f"{i:04d}.dcm"
        if transfer_syntax in DCMTK_ENCODERS:
            encode_with_dcmtk(ds, path, transfer_syntax)
        else:
            path.write_bytes(part10(ds, transfer_syntax))
        written_ts = dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
        assert written_ts == transfer_syntax, (written_ts, transfer_syntax)
        paths.append(path)
    return paths


def associate_rq(contexts: list, max_pdu: int = 16382, calling: str = "MODALITY",
                 called: str = "TRIAGE_NODE") -> bytes:
    """An encoded A-ASSOCIATE-RQ (pynetdicom's encoder), for peers that speak raw PDUs."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    primitive.presentation_context_definition_list = contexts
    length = MaximumLengthNotification()
    length.maximum_length_received = max_pdu
    primitive.user_information = [length]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()


def pdv(context_id: int, control: int, fragment: bytes) -> bytes:
    """One presentation data value item (PS3.8 9.3.5.1): length, context, control header."""
    return struct.pack(">IBB", len(fragment) + 2, context_id, control) + fragment


def p_data(*items: bytes) -> bytes:
    """A P-DATA-TF PDU carrying ``items`` (PS3.8 9.3.5)."""
    body = b"".join(items)
    return struct.pack(">BxI", 0x04, len(body)) + body


def dataset_bytes(data: bytes) -> bytes:
    """The data set part of a Part 10 file (after preamble and file meta)."""
    meta = dcmread(BytesIO(data), stop_before_pixels=True).file_meta
    offset = dataset_offset(data, meta)
    assert offset > 0
    return data[offset:]


@dataclass
class Node:
    """An in-process SCP with its store, database and recorded callbacks."""

    settings: Settings
    scp: StorageSCP
    store: InstanceStore
    session_factory: object
    engine: object
    stored: list[str] = field(default_factory=list)
    finished: list[list[str]] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.scp.port


@contextmanager
def running_node(database_url: str | None = None, data_dir: Path | None = None,
                 **overrides: object) -> Iterator[Node]:
    """Start a StorageSCP on a free port with a migrated database (SQLite by default)."""
    from triage_node.peers import free_port

    data_dir = data_dir or Path(tempfile.mkdtemp(prefix="triage-ingest-"))
    values = {"data_dir": data_dir, "dicom_port": free_port(), "min_free_disk_mb": 1}
    if database_url:
        values["database_url"] = database_url
    values.update(overrides)
    settings = load_settings(**values)
    schema.upgrade(settings.effective_database_url)
    engine = make_engine(settings.effective_database_url)
    factory = make_sessionmaker(engine)
    node = Node(settings=settings, scp=None, store=None, session_factory=factory,  # type: ignore[arg-type]
                engine=engine)
    node.store = InstanceStore(settings, factory, on_stored=node.stored.append)
    node.scp = StorageSCP(settings, node.store, association_finished=node.finished.append)
    node.scp.start()
    try:
        yield node
    finally:
        node.scp.stop()
        engine.dispose()


import pytest  # noqa: E402  (fixtures below are imported by the test modules)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test runs on SQLite and on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'triage.db'}"
    return request.getfixturevalue("postgres_db")
