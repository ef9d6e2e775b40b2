"""Deflated Explicit VR Little Endian objects (PS3.5 A.5), inflated once and within a bound.

A deflated data set can grow a thousandfold: 1 MiB of deflated zeros is 1 GiB. pydicom
inflates a whole data set in one ``zlib.decompress`` call, and did so on every read of
the file, so the node inflates it itself, before anything else reads it:

1. counting only, 1 MiB of output at a time (``zlib.decompressobj`` with
   ``max_length``): a bomb is refused once it passes the object size limit
   (``max_object_mb``, the limit every other object has), having cost at most that
   much CPU and 1 MiB of memory;
2. then into memory, once it is known to fit, and only while the inflated bytes held
   by all connections together stay within `InflationBudget`: a peer that sends objects
   inflating to just under the size limit gets 0xA700 (try again later) instead of a
   gigabyte of memory per connection.

The object is then kept as Explicit VR Little Endian: the file meta's
TransferSyntaxUID (0002,0010) is rewritten and the data set bytes are exactly the
inflated stream, since a deflated data set is its Explicit VR Little Endian encoding
compressed (PS3.5 A.5). Nothing is re-encoded; the header checks, the completeness
step, the worker and WADO-RS all read it without inflating it again, and an object sent
deflated hashes the same as the same object sent uncompressed. Deflate saved bytes on
the wire only; the store records the transfer syntax as received in the audit row.
"""

from __future__ import annotations

import struct
import threading
import zlib
from collections.abc import Callable
from io import BytesIO

from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

__all__ = [
    "DeflateBusy",
    "DeflateCorrupt",
    "DeflateError",
    "DeflateTooLarge",
    "InflationBudget",
    "inflate_part10",
    "is_deflated",
    "meta_sop_uids",
]

#: Output produced per ``decompress`` call: what one step may allocate.
STEP = 1 << 20
#: Deflated bytes given to one ``decompress`` call.
INPUT_STEP = 1 << 16
_DEFLATED = str(DeflatedExplicitVRLittleEndian).encode()
_SOP_CLASS_TAG, _SOP_INSTANCE_TAG = 0x00020002, 0x00020003
_TRANSFER_SYNTAX_TAG = 0x00020010
_GROUP_LENGTH_TAG = 0x00020000
_PREAMBLE = 128 + 4


class DeflateError(ValueError):
    """A deflated object that the node will not store."""


class DeflateTooLarge(DeflateError):
    """The data set inflates past the object size limit."""


class DeflateCorrupt(DeflateError):
    """The deflated stream is not valid (``zlib.error``), or it ends early."""


class DeflateBusy(DeflateError):
    """The inflated object does not fit in what `InflationBudget` has left just now."""


class InflationBudget:
    """Inflated bytes held in memory at once by every connection of the process.

    A deflated object costs a thousandth of its inflated size on the wire, so without a
    shared bound a handful of peers could each make the node hold ``max_object_mb``.
    One object is always let in when nothing else is held, so any object within the
    size limit can be stored on an idle node.
    """

    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self._used = 0
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        return self._used

    def take(self, size: int) -> bool:
        """Reserve ``size`` bytes; False (nothing reserved) when they do not fit now."""
        with self._lock:
            if self._used and self._used + size > self.limit:
                return False
            self._used += size
            return True

    def give_back(self, size: int) -> None:
        with self._lock:
            self._used = max(0, self._used - size)


_LONG_VRS = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                       b"UR", b"UT", b"UV"))


def _meta_elements(data: bytes) -> tuple[list[tuple[int, int, int]], int] | None:
    """The file meta elements as (tag, start, end) and where the data set starts.

    File meta elements are Explicit VR Little Endian (PS3.10 7.1): tag, VR, then a
    2-byte length, or 2 reserved bytes and a 4-byte length for the VRs of PS3.5 Table
    7.1-1. A handful of unpacks per object; None when the elements are not encoded that
    way (then `_pydicom_meta` decides), ``([], 0)`` when the object has no preamble.
    """
    if data[128:132] != b"DICM":
        return [], 0
    elements: list[tuple[int, int, int]] = []
    position = _PREAMBLE
    while position + 8 <= len(data):
        group, element = struct.unpack_from("<HH", data, position)
        if group != 0x0002:
            break
        vr = data[position + 4 : position + 6]
        if not (vr.isalpha() and vr.isupper()):
            return None
        if vr in _LONG_VRS:
            if position + 12 > len(data):
                return None
            end = position + 12 + struct.unpack_from("<I", data, position + 8)[0]
        else:
            end = position + 8 + struct.unpack_from("<H", data, position + 6)[0]
        elements.append((group << 16 | element, position, end))
        position = end
    return elements, min(position, len(data))


def _pydicom_meta_syntax(data: bytes) -> str | None:
    """TransferSyntaxUID as pydicom's own file meta reader sees it (it also reads a meta
    group encoded in Implicit VR), so that whatever pydicom would inflate is found here.
    (The public ``read_file_meta_info`` takes a path only.)"""
    from pydicom.errors import InvalidDicomError
    from pydicom.filereader import _read_file_meta_info, read_preamble

    fp = BytesIO(data)
    try:
        read_preamble(fp, False)
        syntax = _read_file_meta_info(fp).get("TransferSyntaxUID")
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError,
            NotImplementedError, AttributeError, IndexError, struct.error, OverflowError):
        return None  # not a Part 10 file: the header check refuses it
    return str(syntax).rstrip("\x00 ") if syntax else None


def is_deflated(data: bytes) -> bool:
    """True when the file meta announces Deflated Explicit VR Little Endian."""
    walked = _meta_elements(data)
    if walked is None:
        return _pydicom_meta_syntax(data) == DeflatedExplicitVRLittleEndian
    for tag, start, end in walked[0]:
        if tag == _TRANSFER_SYNTAX_TAG:
            return data[start + 8 : end].rstrip(b"\x00 ") == _DEFLATED
    return False


def meta_sop_uids(data: bytes) -> tuple[str | None, str | None]:
    """(MediaStorageSOPClassUID, MediaStorageSOPInstanceUID) from the file meta alone."""
    walked = _meta_elements(data)
    found: dict[int, str] = {}
    for tag, start, end in walked[0] if walked else []:
        if tag in (_SOP_CLASS_TAG, _SOP_INSTANCE_TAG):
            found[tag] = data[start + 8 : end].rstrip(b"\x00 ").decode("ascii", "replace")
    return found.get(_SOP_CLASS_TAG) or None, found.get(_SOP_INSTANCE_TAG) or None


def _inflate(deflated: memoryview, limit: int, keep: list[bytes] | None) -> int:
    """Inflate ``deflated`` (raw deflate, no zlib header: PS3.5 A.5) in bounded steps.

    Returns the inflated size; the output is appended to ``keep`` when it is given.

    Raises
    ------
    DeflateTooLarge
        As soon as more than ``limit`` bytes came out.
    DeflateCorrupt
        On ``zlib.error`` or when the stream ends before its last block.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    try:
        # Input in small slices too: what a step leaves unread is copied (unconsumed_tail).
        for start in range(0, len(deflated), INPUT_STEP):
            pending: bytes | memoryview = deflated[start : start + INPUT_STEP]
            while True:
                out = inflater.decompress(pending, STEP)
                total += len(out)
                if total > limit:
                    raise DeflateTooLarge(f"more than {limit} bytes")
                if keep is not None and out:
                    keep.append(out)
                if inflater.eof:
                    break
                pending = inflater.unconsumed_tail
                # A full step may leave output buffered: ask again until one is not full.
                if not pending and len(out) < STEP:
                    break
            if inflater.eof:
                break  # what follows the last block (a pad byte) is not data
    except zlib.error as exc:
        raise DeflateCorrupt(f"deflated data set cannot be inflated: {exc}") from None
    if not inflater.eof:
        raise DeflateCorrupt("deflated data set ends before its last block")
    return total


def _explicit_meta(data: bytes, elements: list[tuple[int, int, int]]) -> bytes:
    """The file meta with TransferSyntaxUID set to Explicit VR Little Endian and
    FileMetaInformationGroupLength (0002,0000) recomputed; the other elements as sent."""
    kept: list[bytes] = []
    for tag, start, end in elements:
        if tag == _TRANSFER_SYNTAX_TAG:
            value = str(ExplicitVRLittleEndian).encode() + b"\x00"  # even length (PS3.5 6.2)
            kept.append(struct.pack("<HH2sH", 0x0002, 0x0010, b"UI", len(value)) + value)
        elif tag != _GROUP_LENGTH_TAG:
            kept.append(data[start:end])
    body = b"".join(kept)
    return struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body)) + body


def inflate_part10(data: bytes, limit: int, reserve: Callable[[int], bool] | None = None) -> bytes:
    """A deflated Part 10 object as Explicit VR Little Endian, at most ``limit`` bytes.

    Parameters
    ----------
    data : bytes
        The object as received (preamble, file meta, deflated data set).
    limit : int
        Largest object the node takes, in bytes (``max_object_mb``): the whole object,
        file meta included, once inflated.
    reserve : callable, optional
        Called with the inflated size between the counting and the keeping pass
        (`InflationBudget.take`); False stops before anything is kept.

    Returns
    -------
    bytes
        Preamble, the file meta naming Explicit VR Little Endian, and the inflated data set.

    Raises
    ------
    DeflateTooLarge, DeflateCorrupt, DeflateBusy
    """
    walked = _meta_elements(data)
    if walked is None or not walked[0]:
        raise DeflateCorrupt("file meta is not Explicit VR Little Endian (PS3.10 7.1)")
    elements, end = walked
    meta = _explicit_meta(data, elements)
    room = limit - _PREAMBLE - len(meta)
    deflated = memoryview(data)[end:]
    # First count (bounded memory), then keep: a bomb never holds more than one step.
    try:
        size = _PREAMBLE + len(meta) + _inflate(deflated, room, None)
    except DeflateTooLarge:
        raise DeflateTooLarge(f"the object inflates to more than {limit / 2**20:g} MiB") from None
    if reserve is not None and not reserve(size):
        raise DeflateBusy(f"{size / 2**20:.0f} MiB inflated would exceed the inflation budget now")
    chunks: list[bytes] = [data[:_PREAMBLE], meta]
    _inflate(deflated, room, chunks)
    return b"".join(chunks)
