"""An object written, hashed and its header read while it arrives (`triage_node.ingest.incoming`)."""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, generate_uid

from tests.ingest_support import ct_dataset, part10
from triage_node.ingest.header import (
    CANNOT_UNDERSTAND,
    OUT_OF_RESOURCES,
    _Refused,
    dataset_offset_from_bytes,
    parse_header,
    read_header,
    read_header_from_prefix,
)
from triage_node.ingest.incoming import EARLY_PARSE_BYTES, IncomingObject
from triage_node.ingest.spool import Spool


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2) as executor:
        yield executor


def _ct(transfer_syntax: str | None = None, **kwargs: object) -> bytes:
    ds = ct_dataset(generate_uid(), generate_uid(), 0, **kwargs)
    return part10(ds, transfer_syntax) if transfer_syntax else part10(ds)


def _receive(spool: Spool, pool: ThreadPoolExecutor, data: bytes, chunk: int) -> IncomingObject:
    incoming = IncomingObject(spool, pool, hash_from=dataset_offset_from_bytes(data))
    for start in range(0, len(data), chunk):
        incoming.write(memoryview(data)[start : start + chunk])
    return incoming


def _incoming_files(spool: Spool) -> list[Path]:
    return list(spool.incoming.iterdir())


@pytest.mark.parametrize("transfer_syntax", [None, ImplicitVRLittleEndian, RLELossless,
                                             DeflatedExplicitVRLittleEndian])
@pytest.mark.parametrize("chunk", [1_000, EARLY_PARSE_BYTES, 1 << 20])
def test_fragments_give_the_file_digest_and_header_of_the_whole_object(
    tmp_path: Path, pool: ThreadPoolExecutor, transfer_syntax: str | None, chunk: int
) -> None:
    data = _ct(transfer_syntax, size=128)
    spool = Spool(tmp_path)
    incoming = _receive(spool, pool, data, chunk)
    assert incoming.size == len(data)
    header, whole = incoming.header(), parse_header(data)
    assert (header.study_uid, header.series_uid, header.sop_uid, header.transfer_syntax) == (
        whole.study_uid, whole.series_uid, whole.sop_uid, whole.transfer_syntax)
    assert header.ds == whole.ds and header.dataset_offset == whole.dataset_offset
    assert incoming.digest(header.dataset_offset) == hashlib.sha256(data[whole.dataset_offset :]).hexdigest()
    assert incoming.sync().read_bytes() == data
    assert incoming.data() == data


def test_the_prefix_read_stands_for_the_whole_only_once_it_reached_pixel_data() -> None:
    data = _ct(size=128)
    whole = read_header(data)
    early = read_header_from_prefix(data[:EARLY_PARSE_BYTES])
    assert early is not None
    assert early.stopped_at == whole.stopped_at and early.ds == whole.ds
    # Cut before Pixel Data, or inside its element header: judged on the whole object.
    assert read_header_from_prefix(data[: whole.stopped_at]) is None
    assert read_header_from_prefix(data[: whole.stopped_at + 6]) is None
    assert read_header_from_prefix(b"\x00" * EARLY_PARSE_BYTES) is None
    deflated = _ct(DeflatedExplicitVRLittleEndian, size=128)
    assert read_header_from_prefix(deflated[:EARLY_PARSE_BYTES]) is None


def test_a_header_longer_than_the_early_read_is_parsed_once_complete(
    tmp_path: Path, pool: ThreadPoolExecutor
) -> None:
    ds = ct_dataset(generate_uid(), generate_uid(), 0, size=64)
    ds.add_new(0x00091010, "OB", b"\x01" * (3 * EARLY_PARSE_BYTES))  # a long private element
    ds.private_block(0x0009, "TRIAGE TEST", create=True)
    data = part10(ds)
    assert read_header_from_prefix(data[:EARLY_PARSE_BYTES]) is None
    incoming = _receive(Spool(tmp_path), pool, data, 4_000)
    assert incoming.header().sop_uid == ds.SOPInstanceUID


def test_a_truncated_object_is_refused_even_when_its_header_arrived_whole(
    tmp_path: Path, pool: ThreadPoolExecutor
) -> None:
    data = _ct(size=128)[:-100]
    incoming = _receive(Spool(tmp_path), pool, data, 4_000)
    with pytest.raises(_Refused) as refused:
        incoming.header()
    assert (refused.value.status, refused.value.reason) == (CANNOT_UNDERSTAND, "pixel data is truncated")


def test_a_failed_write_is_kept_as_out_of_resources_and_leaves_no_file(
    tmp_path: Path, pool: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path)
    real_write, calls = os.write, []

    def full_disk(fd: int, data: object) -> int:
        calls.append(fd)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_disk)
    incoming = _receive(spool, pool, _ct(size=128), 4_000)
    assert incoming.refused is not None and incoming.refused.status == OUT_OF_RESOURCES
    assert "No space left" in incoming.refused.reason
    assert _incoming_files(spool) == []


def test_discard_removes_the_temporary_file(tmp_path: Path, pool: ThreadPoolExecutor) -> None:
    spool = Spool(tmp_path)
    incoming = _receive(spool, pool, _ct(size=128)[:20_000], 4_000)
    assert len(_incoming_files(spool)) == 1  # written as it arrives
    incoming.discard()
    assert _incoming_files(spool) == []


def test_an_already_refused_object_writes_nothing(tmp_path: Path, pool: ThreadPoolExecutor) -> None:
    spool = Spool(tmp_path)
    refusal = _Refused(CANNOT_UNDERSTAND, "refused before the first byte")
    incoming = IncomingObject(spool, pool, hash_from=0, refused=refusal)
    incoming.write(b"x" * 100)
    assert incoming.refused is refusal and _incoming_files(spool) == []
