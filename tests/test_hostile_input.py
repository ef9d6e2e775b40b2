"""Malformed DICOM (``tests/hostile_corpus.py``) against the store, a running node's
C-STORE SCP and its STOW-RS endpoint.

Each object must be answered with a Storage failure status (PS3.4 Table B.2-1; never
0xC211, pynetdicom's answer when a handler raises) or a STOW-RS failure (PS3.18
10.5.3: HTTP 4xx, or 409 with a Failed SOP Sequence item), must leave nothing in the
spool or the instance table, must be audited as ``instance.rejected``, and the node
process must keep running and keep storing valid objects afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import CTImageStorage, Verification
from sqlalchemy import func, select

from tests.hostile_corpus import HostileCase, build_corpus, dimse_file
from tests.ingest_support import ct_dataset, database_url, part10  # noqa: F401 - fixture
from tests.node_process import AET, NodeProcess
from tests.pipeline_helpers import multipart_related
from triage_node.config import load_settings
from triage_node.db import schema
from triage_node.db.models import AuditEvent, Instance
from triage_node.db.session import make_engine, make_sessionmaker
from triage_node.ingest.store import (
    CANNOT_UNDERSTAND,
    DATASET_DOES_NOT_MATCH_SOP_CLASS,
    INVALID_UID,
    InstanceStore,
)

#: Statuses the store gives malformed objects (PS3.4 Table B.2-1).
REFUSALS = {CANNOT_UNDERSTAND, INVALID_UID, DATASET_DOES_NOT_MATCH_SOP_CLASS}
CORPUS = build_corpus()
BOUNDARY = "hostile-boundary"
STOW_TYPE = f'multipart/related; type="application/dicom"; boundary="{BOUNDARY}"'


def _ids(cases: list[HostileCase]) -> list[str]:
    return [c.name for c in cases]


def _spool_files(data_dir: Path) -> list[Path]:
    spool = data_dir / "spool"
    return [p for p in spool.rglob("*") if p.is_file()] if spool.exists() else []


def _rejections(session_factory, source: str) -> list[AuditEvent]:  # type: ignore[no-untyped-def]
    with session_factory() as session:
        return list(session.scalars(
            select(AuditEvent).where(AuditEvent.action == "instance.rejected").order_by(AuditEvent.id)
        ).all())


def _instances(session_factory) -> int:  # type: ignore[no-untyped-def]
    with session_factory() as session:
        return session.scalar(select(func.count()).select_from(Instance))


def test_the_corpus_covers_what_the_issue_lists() -> None:
    names = " ".join(_ids(CORPUS))
    for needle in ("truncated", "wrong_vr", "absurd_length", "deep_sequences", "bogus_transfer_syntax",
                   "pixel_data_too_short", "path_traversal", "non_uid_characters", "declared_4gb"):
        assert needle in names


def test_the_store_refuses_every_case_and_audits_it(database_url: str, tmp_path: Path) -> None:  # noqa: F811
    settings = load_settings(data_dir=tmp_path, database_url=database_url, min_free_disk_mb=1)
    schema.upgrade(settings.effective_database_url)
    engine = make_engine(settings.effective_database_url)
    factory = make_sessionmaker(engine)
    try:
        store = InstanceStore(settings, factory)
        statuses = {}
        for case in build_corpus():
            outcome = store.store(case.data, calling_ae="HOSTILE", peer="127.0.0.1", source="stow")
            statuses[case.name] = outcome.status
            assert not outcome.stored, case.name
        assert {n: s for n, s in statuses.items() if s not in REFUSALS} == {}
        assert _instances(factory) == 0 and _spool_files(tmp_path) == []
        audited = _rejections(factory, "stow")
        assert len(audited) == len(CORPUS)
        assert [e.detail["status"] for e in audited] == [f"0x{statuses[c.name]:04X}" for c in CORPUS]
    finally:
        engine.dispose()


@pytest.fixture(scope="module", autouse=True)
def send_raw_bytes() -> Iterator[None]:
    """Let ``send_c_store(path)`` send the file's data set bytes as they are, undecoded."""
    before = pynetdicom_config.STORE_SEND_CHUNKED_DATASET
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    yield
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = before


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    with NodeProcess(tmp_path_factory.mktemp("hostile") / "data") as running:
        yield running


def _scu(contexts=((CTImageStorage, (ExplicitVRLittleEndian,)),)) -> AE:  # type: ignore[no-untyped-def]
    ae = AE(ae_title="HOSTILE_SCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    for abstract, syntaxes in contexts:
        ae.add_requested_context(abstract, list(syntaxes))
    ae.add_requested_context(Verification)
    return ae


def _valid_file(folder: Path) -> Path:
    path = folder / f"valid-{generate_uid()}.dcm"
    path.write_bytes(part10(ct_dataset(generate_uid(), generate_uid(), 0)))
    return path


DIMSE_CASES = [c for c in CORPUS if c.dimse]


def test_dimse_hostile_objects_get_failure_statuses_and_the_node_keeps_storing(
    node: NodeProcess, tmp_path: Path
) -> None:
    before_rejected = len(_rejections(node.session_factory, "dimse"))
    before_instances = _instances(node.session_factory)
    statuses: dict[str, int] = {}
    assoc = _scu().associate("127.0.0.1", node.dicom_port, ae_title=AET)
    try:
        for case in build_corpus():
            if not case.dimse:
                continue
            if not assoc.is_established:  # a peer may abort; reconnect and go on
                assoc = _scu().associate("127.0.0.1", node.dicom_port, ae_title=AET)
            response = assoc.send_c_store(dimse_file(case, tmp_path))
            assert response, f"{case.name}: no response (association {assoc.is_established})"
            statuses[case.name] = int(response.Status)
        # Same association, still serving: a valid object is stored.
        assert assoc.send_c_store(_valid_file(tmp_path)).Status == 0x0000
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        if assoc.is_established:
            assoc.release()
    assert {n: f"0x{s:04X}" for n, s in statuses.items() if s not in REFUSALS} == {}
    assert node.alive
    assert _instances(node.session_factory) == before_instances + 1
    rejected = _rejections(node.session_factory, "dimse")[before_rejected:]
    assert len(rejected) == len(DIMSE_CASES)
    assert all(e.actor.startswith("ae:HOSTILE_SCU@") and e.detail["source"] == "dimse" for e in rejected)


@pytest.mark.parametrize(("name", "transfer_syntax"), [
    ("bogus_transfer_syntax", "1.2.3.4.5.6.7"),
    ("big_endian_transfer_syntax", "1.2.840.10008.1.2.2"),
])
def test_unknown_transfer_syntax_is_refused_at_negotiation(
    node: NodeProcess, tmp_path: Path, name: str, transfer_syntax: str
) -> None:
    case = next(c for c in CORPUS if c.name == name)
    assert case.negotiation
    assoc = _scu(contexts=((CTImageStorage, (transfer_syntax,)),)).associate(
        "127.0.0.1", node.dicom_port, ae_title=AET)
    assert assoc.is_established  # Verification is accepted...
    try:
        accepted = [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == CTImageStorage]
        assert accepted == []  # ...the storage context with that syntax is not (PS3.8 9.3.3.2)
        path = tmp_path / f"{case.name}.dcm"
        path.write_bytes(case.data)
        with pytest.raises(ValueError, match="presentation context"):
            assoc.send_c_store(path)
    finally:
        assoc.release()
    assert node.alive


def _post(node: NodeProcess, token: str, body: bytes) -> httpx.Response:
    return httpx.post(node.url + "/dicomweb/studies", content=body, timeout=30,
                      headers={"Authorization": f"Bearer {token}", "Content-Type": STOW_TYPE,
                               "Accept": "application/dicom+json"})


def test_stow_hostile_parts_get_failures_and_are_audited(node: NodeProcess) -> None:
    token = node.token("sender", "hostile-stow")
    before_rejected = len(_rejections(node.session_factory, "stow"))
    before_instances = _instances(node.session_factory)
    reasons: dict[str, int] = {}
    for case in build_corpus():
        response = _post(node, token, multipart_related([case.data], boundary=BOUNDARY))
        assert 400 <= response.status_code < 500, (case.name, response.status_code, response.text[:300])
        body = response.json()
        if response.status_code == 409:  # PS3.18 10.5.3: every instance failed
            (failed,) = body["00081198"]["Value"]
            reasons[case.name] = failed["00081197"]["Value"][0]
            assert "00081199" not in body
    assert {n: r for n, r in reasons.items() if r not in REFUSALS} == {}
    assert node.alive
    # A valid part after all that is stored.
    valid = part10(ct_dataset(generate_uid(), generate_uid(), 0))
    assert _post(node, token, multipart_related([valid], boundary=BOUNDARY)).status_code == 200
    assert _instances(node.session_factory) == before_instances + 1
    rejected = _rejections(node.session_factory, "stow")[before_rejected:]
    stow_rejected = [e for e in rejected if e.detail.get("source") == "stow"]
    assert len(stow_rejected) == len(reasons)
    assert all(e.actor == "stow:hostile-stow" for e in stow_rejected)
    with node.session_factory() as session:
        requests = session.scalars(
            select(AuditEvent).where(AuditEvent.action == "stow.request",
                                     AuditEvent.actor.like("%hostile-stow%"))
        ).all()
    assert len(requests) == len(CORPUS) + 1
    assert sum(r.outcome == "error" for r in requests) == len(CORPUS)


def test_stow_bodies_that_are_not_multipart_get_4xx(node: NodeProcess) -> None:
    token = node.token("sender", "hostile-body")
    for body, content_type in [
        (CORPUS[0].data, "application/dicom"),
        (b"--" + BOUNDARY.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + b"\x00" * 64, STOW_TYPE),
        (b"\xff" * 10_000, STOW_TYPE),
        (b"", STOW_TYPE),
    ]:
        response = httpx.post(node.url + "/dicomweb/studies", content=body, timeout=30,
                              headers={"Authorization": f"Bearer {token}", "Content-Type": content_type})
        assert 400 <= response.status_code < 500, (content_type, response.status_code)
    assert node.alive


@pytest.mark.parametrize("payload", [
    b"",
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    bytes(range(256)) * 16,
    # A-ASSOCIATE-RQ (PS3.8 9.3.2) declaring a 4 GiB PDU, then a few bytes.
    b"\x01\x00\xff\xff\xff\xfe" + b"\x00" * 64,
    # P-DATA-TF before any association.
    b"\x04\x00\x00\x00\x00\x10" + b"\x00\x00\x00\x0c\x01\x03" + b"\x00" * 10,
], ids=["empty", "http", "noise", "associate_rq_4gb", "p_data_first"])
def test_garbage_on_the_dicom_port_does_not_stop_the_listener(node: NodeProcess, payload: bytes) -> None:
    import socket

    with socket.create_connection(("127.0.0.1", node.dicom_port), timeout=10) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        try:
            while sock.recv(65536):
                pass
        except OSError:
            pass
    assoc = _scu().associate("127.0.0.1", node.dicom_port, ae_title=AET)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    assert node.alive
