"""An object while it arrives: its bytes go to the spool at once.

A C-STORE data set comes in fragments (PDVs). Waiting for the last one before
writing would put the write between the last byte and the response.
`IncomingObject` instead writes each fragment to a temporary file in the spool's
``.incoming`` folder as it comes. What is left when the object is complete is the
fsync and the SHA-256 (both in the store's I/O pool, in parallel, since neither
holds the GIL), the header checks and the commit
(`triage_node.ingest.store.InstanceStore.finish`).

(Hashing each fragment as it came was the first design: it put about 0.3 ms per
512 KiB slice on the receiving thread, which on a 2-core machine is the slower
side of the transfer, instead of on a core that is idle while the header is parsed.)

(Reading the header from the first fragments while the pixels were still on the
wire was tried twice, in the I/O pool and in the receiving thread: on a 2-core
machine it only moved the parse from beside the fsync, where a core is free, to
beside the receive, where none is; no gain in A/B runs of ``triage-node bench
ingest``. Starting the writeback of each fragment as it arrived, so that less was
left for the fsync, made it slower.)

Nothing here decides the outcome: a failed write or the watermark is kept as the
refusal that ``finish`` answers, so the association reads the rest of the message
and the sender gets a status, not a broken connection.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

from triage_node.ingest.header import (
    CANNOT_UNDERSTAND,
    OBJECT_TOO_LARGE,
    OUT_OF_RESOURCES,
    Header,
    Refused,
    dataset_offset_from_bytes,
    parse_header,
)
from triage_node.ingest.inflate import (
    DeflateBusy,
    DeflateCorrupt,
    DeflateTooLarge,
    InflationBudget,
    inflate_part10,
    is_deflated,
)
from triage_node.ingest.spool import Spool, write_all

__all__ = ["IncomingObject", "dataset_digest"]


def dataset_digest(data: bytes, offset: int) -> str:
    """SHA-256 (hex) of ``data`` from ``offset``: the data set of a Part 10 object.

    hashlib lets go of the GIL for data this size, so the store runs this in its I/O
    pool, on the bytes it holds, while the receiving thread parses the header.
    """
    return hashlib.sha256(memoryview(data)[offset:]).hexdigest()


class IncomingObject:
    """One Part 10 object being received, written to a temporary file as it comes.

    Parameters
    ----------
    spool : Spool
        Where the temporary file is made.
    hash_from : int
        Where the data set is expected to start (after the file meta), before the
        header is parsed: the digest covers the data set only, so the same object from
        two senders hashes the same. The store checks it against the parsed header.
    refused : Refused, optional
        Already refused (the free-disk watermark): nothing is written.
    """

    def __init__(self, spool: Spool, *, hash_from: int, refused: Refused | None = None) -> None:
        self._spool = spool
        self.hash_from = hash_from
        self._chunks: list[bytes | memoryview] = []
        self._size = 0
        self.refused = refused
        self._fd: int | None = None
        self._temp: Path | None = None
        self._budget: InflationBudget | None = None
        self._reserved = 0
        if refused is None:
            try:
                self._fd, self._temp = spool.open_temp()
            except OSError as exc:
                self._fail(exc)

    @property
    def size(self) -> int:
        return self._size

    def write(self, chunk: bytes | memoryview) -> None:
        """Append the next bytes of the object (to the file and memory)."""
        if self.refused is not None:
            return  # nothing more is kept: the object gets the refusal at the end
        self._size += len(chunk)
        self._chunks.append(chunk)
        try:
            assert self._fd is not None
            write_all(self._fd, chunk)
        except OSError as exc:
            self._fail(exc)

    def data(self) -> bytes:
        """The whole object as received (preamble, file meta, data set).

        The first call joins the fragments; make it before other threads read them.
        """
        if len(self._chunks) != 1 or not isinstance(self._chunks[0], bytes):
            self._chunks = [b"".join(self._chunks)]
        return self._chunks[0]  # type: ignore[return-value]

    def inflate(self, limit: int, budget: InflationBudget | None = None) -> bool:
        """Keep a deflated object as Explicit VR Little Endian (`triage_node.ingest.inflate`).

        The inflated object replaces the received bytes in memory and in the temporary
        file, and `hash_from` moves to its data set. Call before `data` is shared with
        another thread. Returns False (and changes nothing) when it is not deflated.

        Raises
        ------
        Refused
            0xA702 when it inflates past ``limit`` bytes, 0xC000 when the deflated
            stream is corrupt, 0xA700 when the spool write fails or the inflated bytes
            do not fit in ``budget`` now (held until `discard`).
        """
        data = self.data()
        if not is_deflated(data):
            return False

        def reserve(size: int) -> bool:
            if budget is None:
                return True
            if not budget.take(size):
                return False
            self._budget, self._reserved = budget, size
            return True

        try:
            inflated = inflate_part10(data, limit, reserve)
        except DeflateBusy as exc:
            raise Refused(OUT_OF_RESOURCES, f"{exc}: try again later") from None
        except DeflateTooLarge as exc:
            raise Refused(OBJECT_TOO_LARGE, f"{exc} (max_object_mb)") from None
        except DeflateCorrupt as exc:
            raise Refused(CANNOT_UNDERSTAND, str(exc)) from None
        self._chunks, self._size = [inflated], len(inflated)
        self.hash_from = dataset_offset_from_bytes(inflated)
        try:
            assert self._fd is not None
            os.ftruncate(self._fd, 0)
            os.lseek(self._fd, 0, os.SEEK_SET)
            write_all(self._fd, inflated)
        except OSError as exc:
            self._fail(exc)
            raise self.refused from None  # type: ignore[misc]
        return True

    def sync(self, started: threading.Event | None = None) -> Path:
        """fsync the temporary file (in the I/O pool); OSError closes and deletes it.

        ``started`` is set just before the fsync, so that the caller can hand over the
        GIL until the disk has the request. The file stays open until `discard`.
        """
        if started is not None:
            started.set()  # first, so that no failure below can leave the caller waiting
        assert self._fd is not None and self._temp is not None
        try:
            return self._spool.fsync_temp(self._fd, self._temp)
        except BaseException:
            self._fd = None  # closed by fsync_temp
            raise

    def header(self) -> Header:
        """The parsed and checked header; raises `Refused` as `parse_header` does."""
        return parse_header(self.data())

    def discard(self) -> None:
        """Drop the object (the association ended inside it, or it was refused)."""
        if self._fd is not None:
            self._spool.close_temp(self._fd)
            self._fd = None
        if self._temp is not None:
            self._spool.discard(self._temp)  # gone already once published: a no-op
        self._chunks = []
        if self._budget is not None:
            self._budget.give_back(self._reserved)
            self._budget, self._reserved = None, 0

    def result(self) -> IncomingObject:
        """The complete object, for the DIMSE message that carried it."""
        return self

    def _fail(self, exc: OSError) -> None:
        self.refused = Refused(OUT_OF_RESOURCES, f"spool write failed: {exc.strerror}")
        self.discard()
