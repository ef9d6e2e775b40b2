"""Property-based fuzzing (hypothesis) of the three doors: InstanceStore, a running
node's C-STORE SCP and its STOW-RS endpoint.

A valid CT slice is mutated in its data set (bytes flipped, cut, inserted or deleted,
element lengths overwritten with absurd values); the File Meta Information is left
intact so the same object can be sent over DIMSE (the receiver rebuilds the meta from
the request) and over STOW-RS. The properties:

- the answer is success or one of the store's failure statuses (PS3.4 Table B.2-1),
  never pynetdicom's 0xC211 (a handler that raised) nor an HTTP 5xx;
- a success means the exact bytes are in the spool and the instance is in the database;
- the node process is still running afterwards.

The CI run is short (``TRIAGE_FUZZ_EXAMPLES``, default 60 per door, derandomised);
``scripts/fuzz.sh`` runs thousands of random examples.
"""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import select

from tests.hostile_corpus import base_slice
from tests.node_process import AET, NodeProcess
from tests.pipeline_helpers import multipart_related
from triage_node.config import load_settings
from triage_node.db import schema
from triage_node.db.models import Instance
from triage_node.db.session import make_engine, make_sessionmaker
from triage_node.ingest.store import (
    CANNOT_UNDERSTAND,
    DATASET_DOES_NOT_MATCH_SOP_CLASS,
    INVALID_UID,
    SUCCESS,
    InstanceStore,
)

EXAMPLES = int(os.environ.get("TRIAGE_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, database=None, derandomize=EXAMPLES <= 100,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
ANSWERS = {SUCCESS, CANNOT_UNDERSTAND, INVALID_UID, DATASET_DOES_NOT_MATCH_SOP_CLASS}
BASE = base_slice(size=16)
#: The header part of the data set (everything before Pixel Data), where mutations bite.
HEADER_END = BASE.body.rfind(b"\xe0\x7f\x10\x00")
ABSURD = [0, 1, 3, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFE, 0xFFFFFFFF]
BOUNDARY = "fuzz-boundary"
STOW_TYPE = f'multipart/related; type="application/dicom"; boundary="{BOUNDARY}"'

_position = st.integers(0, HEADER_END + 12)
_mutation = st.one_of(
    st.tuples(st.just("flip"), _position, st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, len(BASE.body)), st.just(0)),
    st.tuples(st.just("insert"), _position, st.binary(min_size=1, max_size=48)),
    st.tuples(st.just("delete"), _position, st.integers(1, 32)),
    st.tuples(st.just("length16"), _position, st.sampled_from(ABSURD)),
    st.tuples(st.just("length32"), _position, st.sampled_from(ABSURD)),
)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A Part 10 file: BASE's file meta and a mutated data set."""
    body = bytearray(BASE.body)
    for op, at, arg in draw(st.lists(_mutation, min_size=1, max_size=4)):
        at = min(at, len(body))
        if op == "flip" and at < len(body):
            body[at] ^= arg
        elif op == "cut":
            del body[at:]
        elif op == "insert":
            body[at:at] = arg
        elif op == "delete":
            del body[at : at + arg]
        elif op == "length16" and at + 2 <= len(body):
            body[at : at + 2] = struct.pack("<H", arg & 0xFFFF)
        elif op == "length32" and at + 4 <= len(body):
            body[at : at + 4] = struct.pack("<I", arg)
    return BASE.with_body(bytes(body))


def _stored(session_factory, sop_uid: str | None, path: Path | None, data: bytes) -> bool:  # type: ignore[no-untyped-def]
    with session_factory() as session:
        row = session.scalars(select(Instance).where(Instance.sop_uid == sop_uid)).first()
    return row is not None and path is not None and path.read_bytes() == data


@pytest.fixture(scope="module")
def store_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[InstanceStore, object]]:
    folder = tmp_path_factory.mktemp("fuzz-store")
    cfg = load_settings(data_dir=folder, min_free_disk_mb=1)
    schema.upgrade(cfg.effective_database_url)
    engine = make_engine(cfg.effective_database_url)
    factory = make_sessionmaker(engine)
    yield InstanceStore(cfg, factory), factory
    engine.dispose()


@FUZZ
@given(data=mutated())
def test_fuzz_the_store(store_env, data: bytes) -> None:  # type: ignore[no-untyped-def]
    store, factory = store_env
    outcome = store.store(data, calling_ae="FUZZ", peer="127.0.0.1", source="stow")
    assert outcome.status in ANSWERS, f"0x{outcome.status:04X} {outcome.reason}"
    if outcome.status == SUCCESS and not outcome.duplicate:
        assert _stored(factory, outcome.sop_uid, outcome.path, data)


@pytest.fixture(scope="module", autouse=True)
def send_raw_bytes() -> Iterator[None]:
    """Let ``send_c_store(path)`` send the file's data set bytes as they are, undecoded."""
    before = pynetdicom_config.STORE_SEND_CHUNKED_DATASET
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    yield
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = before


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    with NodeProcess(tmp_path_factory.mktemp("fuzz-node") / "data") as running:
        running.fuzz_dir = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp()))
        yield running


class _Association:
    """One association reused across examples, re-opened when the node ends it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.ae = AE(ae_title="FUZZ_SCU")
        self.ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = 20
        self.assoc = None

    def send(self, path: Path):  # type: ignore[no-untyped-def]
        if self.assoc is None or not self.assoc.is_established:
            self.assoc = self.ae.associate("127.0.0.1", self.port, ae_title=AET)
            assert self.assoc.is_established
        return self.assoc.send_c_store(path)

    def release(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()


@pytest.fixture(scope="module")
def association(node: NodeProcess) -> Iterator[_Association]:
    assoc = _Association(node.dicom_port)
    yield assoc
    assoc.release()


@FUZZ
@given(data=mutated())
def test_fuzz_c_store(node: NodeProcess, association: _Association, data: bytes) -> None:
    path = node.fuzz_dir / "object.dcm"
    path.write_bytes(data)
    response = association.send(path)
    assert response, "no C-STORE response"
    status = int(response.Status)
    assert status in ANSWERS, f"status 0x{status:04X}"
    assert node.alive


@pytest.fixture(scope="module")
def sender_token(node: NodeProcess) -> str:
    return node.token("sender", "fuzz")


@FUZZ
@given(data=mutated())
def test_fuzz_stow_rs(node: NodeProcess, sender_token: str, data: bytes) -> None:
    response = httpx.post(
        node.url + "/dicomweb/studies", content=multipart_related([data], boundary=BOUNDARY), timeout=30,
        headers={"Authorization": f"Bearer {sender_token}", "Content-Type": STOW_TYPE},
    )
    assert response.status_code in (200, 409), (response.status_code, response.text[:300])
    if response.status_code == 409:
        (failed,) = response.json()["00081198"]["Value"]
        assert failed["00081197"]["Value"][0] in ANSWERS - {SUCCESS}
    assert node.alive


def test_node_survived_the_fuzzing(node: NodeProcess) -> None:
    assert node.alive, node.log_text()[-2000:]
    assert "Traceback" not in node.log_text(), node.log_text()[-4000:]
