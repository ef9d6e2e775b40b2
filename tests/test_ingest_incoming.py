"""An object written to the spool and hashed while it arrives (`triage_node.ingest.incoming`)."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

from tests.ingest_support import ct_dataset, part10
from triage_node.ingest.header import (
    CANNOT_UNDERSTAND,
    OUT_OF_RESOURCES,
    Refused,
    dataset_offset_from_bytes,
    parse_header,
)
from triage_node.ingest.incoming import IncomingObject, dataset_digest
from triage_node.ingest.inflate import inflate_part10
from triage_node.ingest.spool import Spool


def _ct(transfer_syntax: str | None = None, **kwargs: object) -> bytes:
    ds = ct_dataset(generate_uid(), generate_uid(), 0, **kwargs)
    return part10(ds, transfer_syntax) if transfer_syntax else part10(ds)


def _receive(spool: Spool, data: bytes, chunk: int) -> IncomingObject:
    incoming = IncomingObject(spool, hash_from=dataset_offset_from_bytes(data))
    for start in range(0, len(data), chunk):
        incoming.write(memoryview(data)[start : start + chunk])
    return incoming


def _incoming_files(spool: Spool) -> list[Path]:
    return list(spool.incoming.iterdir())


@pytest.mark.parametrize("transfer_syntax", [None, ImplicitVRLittleEndian, RLELossless,
                                             DeflatedExplicitVRLittleEndian])
@pytest.mark.parametrize("chunk", [1_000, 16_384, 1 << 20])
def test_fragments_give_the_file_digest_and_header_of_the_whole_object(
    tmp_path: Path, transfer_syntax: str | None, chunk: int
) -> None:
    data = _ct(transfer_syntax, size=128)
    spool = Spool(tmp_path)
    incoming = _receive(spool, data, chunk)
    assert incoming.size == len(data)
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        # Kept inflated, as Explicit VR Little Endian, in memory and in the file.
        assert incoming.inflate(2**30)
        data = inflate_part10(data, 2**30)
        assert parse_header(data).transfer_syntax == ExplicitVRLittleEndian
    else:
        assert not incoming.inflate(2**30)
    header, whole = incoming.header(), parse_header(data)
    assert (header.study_uid, header.series_uid, header.sop_uid, header.transfer_syntax) == (
        whole.study_uid, whole.series_uid, whole.sop_uid, whole.transfer_syntax)
    assert header.ds == whole.ds and header.dataset_offset == whole.dataset_offset
    assert dataset_digest(incoming.data(), header.dataset_offset) == hashlib.sha256(
        data[whole.dataset_offset :]
    ).hexdigest()
    assert incoming.sync().read_bytes() == data
    assert incoming.data() == data


def test_a_truncated_object_is_refused(
    tmp_path: Path
) -> None:
    data = _ct(size=128)[:-100]
    incoming = _receive(Spool(tmp_path), data, 4_000)
    with pytest.raises(Refused) as refused:
        incoming.header()
    assert (refused.value.status, refused.value.reason) == (CANNOT_UNDERSTAND, "pixel data is truncated")


def test_a_failed_write_is_kept_as_out_of_resources_and_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path)
    real_write, calls = os.write, []

    def full_disk(fd: int, data: object) -> int:
        calls.append(fd)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_disk)
    incoming = _receive(spool, _ct(size=128), 4_000)
    assert incoming.refused is not None and incoming.refused.status == OUT_OF_RESOURCES
    assert "No space left" in incoming.refused.reason
    assert _incoming_files(spool) == []


def test_discard_removes_the_temporary_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    incoming = _receive(spool, _ct(size=128)[:20_000], 4_000)
    assert len(_incoming_files(spool)) == 1  # written as it arrives
    incoming.discard()
    assert _incoming_files(spool) == []


def test_an_already_refused_object_writes_nothing(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    refusal = Refused(CANNOT_UNDERSTAND, "refused before the first byte")
    incoming = IncomingObject(spool, hash_from=0, refused=refusal)
    incoming.write(b"x" * 100)
    assert incoming.refused is refusal and _incoming_files(spool) == []


def test_the_digest_starts_at_the_quick_look_or_at_the_offset_given(tmp_path: Path) -> None:
    data = _ct(size=64)
    incoming = IncomingObject(Spool(tmp_path), hash_from=0)  # as for bytes without a readable meta
    incoming.write(data)
    offset = incoming.header().dataset_offset
    assert offset > 0
    assert dataset_digest(incoming.data(), incoming.hash_from) == hashlib.sha256(data).hexdigest()
    assert dataset_digest(incoming.data(), offset) == hashlib.sha256(data[offset:]).hexdigest()
    incoming.discard()
