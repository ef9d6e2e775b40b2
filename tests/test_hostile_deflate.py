"""Deflate bombs and corrupt deflated objects (Deflated Explicit VR Little Endian, PS3.5
A.5) against `triage_node.ingest.inflate` and a running node's C-STORE SCP and STOW-RS.

A bomb (about 2.3 MiB that inflates to 2.25 GiB, past the default ``max_object_mb`` of
1024) is refused with 0xA702 / HTTP 413 while the node's resident memory stays bounded;
a corrupt one is refused with 0xC000 / a Failed SOP item; both are audited as
``instance.rejected`` and leave nothing in the spool or the instance table, and the node
keeps storing. A valid deflated object is stored once, inflated, as Explicit VR Little
Endian, so that no later read inflates it again.
"""

from __future__ import annotations

import struct
import tracemalloc
import zlib
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import func, select

from tests.ingest_support import ct_dataset, database_url, part10  # noqa: F401 - fixture
from tests.node_process import AET, NodeProcess
from tests.pipeline_helpers import multipart_related
from triage_node.db.models import AuditEvent, Instance
from triage_node.ingest.header import CANNOT_UNDERSTAND, OBJECT_TOO_LARGE, OUT_OF_RESOURCES, dataset_offset_from_bytes
from triage_node.ingest.inflate import (
    DeflateBusy,
    DeflateCorrupt,
    DeflateTooLarge,
    InflationBudget,
    inflate_part10,
    is_deflated,
)

STEP = 1 << 20
#: Pixel Data declared and deflated: 2.25 GiB of zeros.
BOMB_PIXEL_BYTES = 0x9000_0000
#: Growth of the node's peak resident memory allowed while it refuses a bomb.
RSS_GROWTH_LIMIT_MB = 300
BOUNDARY = "deflate-boundary"
STOW_TYPE = f'multipart/related; type="application/dicom"; boundary="{BOUNDARY}"'


def _split(data: bytes) -> tuple[bytes, bytes]:
    """(preamble and file meta, data set) of a Part 10 object."""
    offset = dataset_offset_from_bytes(data)
    return data[:offset], data[offset:]


def deflated_ct(**kwargs: object) -> bytes:
    """A valid CT object in Deflated Explicit VR Little Endian (pydicom's encoder)."""
    return part10(ct_dataset(generate_uid(), generate_uid(), 0, **kwargs), DeflatedExplicitVRLittleEndian)


def deflate_bomb(pixel_bytes: int = BOMB_PIXEL_BYTES) -> bytes:
    """A Part 10 object whose deflated data set is a CT header, then Pixel Data (OW) of
    ``pixel_bytes`` zeros: about 1 KiB per MiB inflated.

    Built without holding the zeros: after a full flush the compressor starts from an
    empty window, so each MiB of zeros deflates to the same bytes, repeated.
    """
    ds = ct_dataset(generate_uid(), generate_uid(), 0)
    prefix, _ = _split(part10(ds, DeflatedExplicitVRLittleEndian))
    del ds.PixelData
    # Explicit VR Little Endian, as a deflated data set is before compression (PS3.5 A.5).
    header = _split(part10(ds))[1] + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, pixel_bytes)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    head = deflater.compress(header) + deflater.flush(zlib.Z_FULL_FLUSH)
    block = deflater.compress(bytes(STEP)) + deflater.flush(zlib.Z_FULL_FLUSH)
    steps, rest = divmod(pixel_bytes, STEP)
    tail = deflater.compress(bytes(rest)) + deflater.flush()
    return prefix + head + block * steps + tail


def corrupt_deflated() -> bytes:
    """A deflated object whose stream starts with a block of the reserved type (zlib.error)."""
    prefix, _ = _split(deflated_ct())
    return prefix + b"\xff" * 64


def truncated_deflated() -> bytes:
    data = deflated_ct(size=128)
    return data[: dataset_offset_from_bytes(data) + 400]


# -- the module ------------------------------------------------------------------------
def test_a_bomb_is_refused_before_it_holds_more_than_a_step_of_memory() -> None:
    bomb = deflate_bomb()
    assert is_deflated(bomb) and len(bomb) < 3 * 2**20
    tracemalloc.start()
    try:
        with pytest.raises(DeflateTooLarge, match="more than 1024 MiB"):
            inflate_part10(bomb, 1024 * 2**20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * STEP


@pytest.mark.parametrize("data", [corrupt_deflated(), truncated_deflated()], ids=["corrupt", "truncated"])
def test_a_broken_deflate_stream_is_corrupt(data: bytes) -> None:
    with pytest.raises(DeflateCorrupt):
        inflate_part10(data, 2**30)


def test_a_valid_deflated_object_becomes_explicit_vr_little_endian_with_the_same_data_set() -> None:
    data = deflated_ct(size=64)
    inflated = inflate_part10(data, 2**30)
    sent, kept = dcmread(BytesIO(data)), dcmread(BytesIO(inflated))
    assert kept.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian and not is_deflated(inflated)
    assert kept == sent and np.array_equal(kept.pixel_array, sent.pixel_array)
    assert kept.file_meta.MediaStorageSOPInstanceUID == sent.file_meta.MediaStorageSOPInstanceUID
    # The data set is the inflated stream as it was, not re-encoded.
    assert _split(inflated)[1] == zlib.decompress(_split(data)[1], -zlib.MAX_WBITS)
    with pytest.raises(DeflateTooLarge):
        inflate_part10(data, len(inflated) - 1)


def test_the_inflation_budget_lets_one_object_in_alone_and_refuses_what_does_not_fit_beside_it() -> None:
    budget = InflationBudget(100)
    assert budget.take(500)  # alone: any object within the size limit
    assert not budget.take(1) and budget.used == 500
    budget.give_back(500)
    assert budget.take(60) and budget.take(40) and not budget.take(1)
    with pytest.raises(DeflateBusy):
        inflate_part10(deflated_ct(size=64), 2**30, reserve=lambda size: False)


def test_objects_inflating_near_the_limit_on_many_connections_get_out_of_resources(
    database_url: str, tmp_path: Path,  # noqa: F811
) -> None:
    """Each near-limit object costs a megabyte on the wire and the limit in memory: while
    the budget is held, the next one is refused with 0xA700 (try again), audited, nothing
    kept; once the budget is free it is stored."""
    from tests.test_ingest_store import Env

    env = Env(database_url, tmp_path / "data", inflation_budget_mb=1)
    try:
        held = env.store.inflation
        assert held.take(512 * 1024)  # another connection's object, still being stored
        data = deflated_ct(size=512)  # inflates to about 0.5 MiB: no longer fits beside it
        refused = env.put(data)
        assert refused.status == OUT_OF_RESOURCES and "inflation budget" in refused.reason
        assert env.instances() == [] and env.spooled() == []
        assert env.audit("instance.rejected")
        held.give_back(512 * 1024)
        assert env.put(data).status == 0x0000
        assert held.used == 0  # given back once the object was stored
    finally:
        env.engine.dispose()


# -- a running node --------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def send_raw_bytes() -> Iterator[None]:
    """Let ``send_c_store(path)`` send the file's data set bytes as they are."""
    before = pynetdicom_config.STORE_SEND_CHUNKED_DATASET
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    yield
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = before


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    with NodeProcess(tmp_path_factory.mktemp("deflate") / "data") as running:
        yield running


def _memory_kb(node: NodeProcess, field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of the node process, in KiB (proc(5))."""
    assert node.process is not None
    for line in Path(f"/proc/{node.process.pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} missing")


def _instances(node: NodeProcess) -> int:
    with node.session_factory() as session:
        return session.scalar(select(func.count()).select_from(Instance))


def _rejections(node: NodeProcess) -> list[AuditEvent]:
    with node.session_factory() as session:
        return list(session.scalars(
            select(AuditEvent).where(AuditEvent.action == "instance.rejected").order_by(AuditEvent.id)
        ).all())


def _spool_files(node: NodeProcess) -> list[Path]:
    return [p for p in node.settings.spool_dir.rglob("*") if p.is_file()]


def _c_store(node: NodeProcess, data: bytes, folder: Path) -> int:
    path = folder / f"{generate_uid()}.dcm"
    path.write_bytes(data)
    ae = AE(ae_title="DEFLATE_SCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    for syntax in (DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian):  # one context each
        ae.add_requested_context(CTImageStorage, [syntax])
    assoc = ae.associate("127.0.0.1", node.dicom_port, ae_title=AET)
    assert assoc.is_established
    try:
        response = assoc.send_c_store(path)
        assert response, "no C-STORE response"
        return int(response.Status)
    finally:
        assoc.release()


def _stow(node: NodeProcess, token: str, data: bytes) -> httpx.Response:
    return httpx.post(node.url + "/dicomweb/studies", content=multipart_related([data], boundary=BOUNDARY),
                      timeout=60, headers={"Authorization": f"Bearer {token}", "Content-Type": STOW_TYPE,
                                           "Accept": "application/dicom+json"})


def _assert_refused_and_clean(node: NodeProcess, instances_before: int, rejected_before: int,
                              status: int, source: str) -> AuditEvent:
    assert node.alive
    assert _instances(node) == instances_before
    assert [p for p in _spool_files(node) if p.suffix == ".tmp"] == []
    [event] = _rejections(node)[rejected_before:]
    assert event.detail["status"] == f"0x{status:04X}" and event.detail["source"] == source
    return event


@pytest.mark.parametrize("door", ["dimse", "stow"])
def test_a_deflate_bomb_is_refused_with_bounded_memory_and_the_node_goes_on(
    node: NodeProcess, tmp_path: Path, door: str
) -> None:
    bomb = deflate_bomb()
    token = node.token("sender", f"deflate-{door}")
    instances, rejected = _instances(node), len(_rejections(node))
    rss_before = _memory_kb(node, "VmRSS")
    if door == "dimse":
        assert _c_store(node, bomb, tmp_path) == OBJECT_TOO_LARGE
    else:
        response = _stow(node, token, bomb)
        assert response.status_code == 413, response.text
        assert "max_object_mb" in response.json()["detail"]
    growth_mb = (_memory_kb(node, "VmHWM") - rss_before) / 1024
    print(f"deflate bomb by {door}: peak RSS {growth_mb:+.0f} MiB")
    assert growth_mb < RSS_GROWTH_LIMIT_MB, f"peak RSS grew by {growth_mb:.0f} MiB"
    event = _assert_refused_and_clean(node, instances, rejected, OBJECT_TOO_LARGE, door)
    assert "inflates to more than 1024 MiB" in event.detail["reason"], event.detail
    assert f"0x{OBJECT_TOO_LARGE:04X}" in node.log_text()
    # Still storing, by the same door.
    valid = part10(ct_dataset(generate_uid(), generate_uid(), 0))
    if door == "dimse":
        assert _c_store(node, valid, tmp_path) == 0x0000
    else:
        assert _stow(node, token, valid).status_code == 200
    assert _instances(node) == instances + 1


@pytest.mark.parametrize("door", ["dimse", "stow"])
@pytest.mark.parametrize("broken", [corrupt_deflated, truncated_deflated], ids=["corrupt", "truncated"])
def test_a_corrupt_deflated_object_is_refused_with_a_reason_and_audited(
    node: NodeProcess, tmp_path: Path, door: str, broken: object
) -> None:
    data = broken()  # type: ignore[operator]
    instances, rejected = _instances(node), len(_rejections(node))
    if door == "dimse":
        assert _c_store(node, data, tmp_path) == CANNOT_UNDERSTAND
    else:
        response = _stow(node, node.token("sender", "deflate-corrupt"), data)
        assert response.status_code == 409, response.text
        [failed] = response.json()["00081198"]["Value"]
        assert failed["00081197"]["Value"] == [CANNOT_UNDERSTAND]
    event = _assert_refused_and_clean(node, instances, rejected, CANNOT_UNDERSTAND, door)
    assert event.detail["reason"].startswith("deflated data set")


@pytest.mark.parametrize("door", ["dimse", "stow"])
def test_a_valid_deflated_object_is_stored_inflated_and_read_without_inflating(
    node: NodeProcess, tmp_path: Path, door: str
) -> None:
    data = deflated_ct(size=64)
    sent = dcmread(BytesIO(data))
    if door == "dimse":
        assert _c_store(node, data, tmp_path) == 0x0000
    else:
        assert _stow(node, node.token("sender", "deflate-valid"), data).status_code == 200
    with node.session_factory() as session:
        row = session.scalars(select(Instance).where(Instance.sop_uid == sent.SOPInstanceUID)).one()
        [event] = session.scalars(select(AuditEvent).where(
            AuditEvent.action == "instance.stored", AuditEvent.sop_uid == sent.SOPInstanceUID)).all()
    assert row.transfer_syntax == ExplicitVRLittleEndian
    assert event.detail["received_transfer_syntax"] == DeflatedExplicitVRLittleEndian
    stored = Path(row.path).read_bytes()
    assert not is_deflated(stored)
    kept = dcmread(BytesIO(stored))
    assert kept.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert np.array_equal(kept.pixel_array, sent.pixel_array)
    assert row.size_bytes == len(stored)
