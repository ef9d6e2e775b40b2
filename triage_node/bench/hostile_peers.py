"""The misbehaving peers of the hostile-peer benchmark (`triage_node.bench.hostile`).

Each opens one raw TCP connection to the node's DICOM port and does one thing a careless
or hostile peer does (PS3.8 upper layer written by hand, since a well-behaved library
cannot misbehave): an association request that never finishes, one sent a byte a second,
an endless stream of empty PDVs or of command-set fragments, or a deflated data set that
inflates past the node's object limit. `hostile_connection` reports how the node ended it.
"""

from __future__ import annotations

import socket
import struct
import threading
from pathlib import Path

__all__ = ["AET", "BOMB_BYTES", "HOST", "MAX_WATCH_S", "association_requests", "deflate_bomb", "hostile_connection"]

AET = "TRIAGE_NODE"
HOST = "127.0.0.1"
#: Longest the hostile phase is watched (the default request deadline is 30 s).
MAX_WATCH_S = 60.0
#: Inflated size of a deflate bomb: over the default max_object_mb (1024 MiB).
BOMB_BYTES = 1536 * 1024 * 1024
_STEP = 1024 * 1024


def _pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BxI", pdu_type, len(body)) + body


def _pdv(control: int, fragment: bytes) -> bytes:
    return struct.pack(">IBB", len(fragment) + 2, 1, control) + fragment


def association_requests() -> tuple[bytes, bytes]:
    """An A-ASSOCIATE-RQ for CT Image Storage (context 1; context 3 deflated), and a
    C-STORE-RQ command set."""
    from pydicom.dataset import Dataset
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid
    from pynetdicom import build_context
    from pynetdicom.dsutils import encode
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]  # pynetdicom defines these through globals()

    context = build_context(CTImageStorage, [ExplicitVRLittleEndian])
    context.context_id = 1
    deflated = build_context(CTImageStorage, [DeflatedExplicitVRLittleEndian])
    deflated.context_id = 3
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title, primitive.called_ae_title = "HOSTILE", AET
    primitive.presentation_context_definition_list = [context, deflated]
    length = MaximumLengthNotification()
    length.maximum_length_received = 16382
    primitive.user_information = [length]
    rq = A_ASSOCIATE_RQ()
    rq.from_primitive(primitive)
    command = Dataset()
    command.AffectedSOPClassUID = CTImageStorage
    command.CommandField, command.MessageID, command.Priority = 0x0001, 1, 0
    command.CommandDataSetType = 0x0000
    command.AffectedSOPInstanceUID = generate_uid()
    encoded = encode(command, True, True)
    if encoded is None:  # pynetdicom answers None for a data set it cannot encode
        raise ValueError("the C-STORE-RQ command set did not encode")
    return rq.encode(), encoded


def deflate_bomb(template: Path) -> tuple[bytes, bytes]:
    """(C-STORE-RQ command set, deflated data set) of a CT whose data set inflates to
    `BOMB_BYTES`: the header of ``template``, then that many zeros of Pixel Data.

    Built without holding the zeros: after a full flush the compressor starts from an
    empty window, so each MiB of zeros deflates to the same bytes, repeated.
    """
    import zlib

    from pydicom import dcmread
    from pydicom.dataset import Dataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    from pydicom.uid import generate_uid
    from pynetdicom.dsutils import encode

    ds = dcmread(template)
    del ds.PixelData
    ds.SOPInstanceUID = generate_uid()
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False  # as a deflated data set is before compression
    write_dataset(buffer, ds)
    header = buffer.getvalue() + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, BOMB_BYTES)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    head = deflater.compress(header) + deflater.flush(zlib.Z_FULL_FLUSH)
    block = deflater.compress(bytes(_STEP)) + deflater.flush(zlib.Z_FULL_FLUSH)
    data = head + block * (BOMB_BYTES // _STEP) + deflater.flush()
    command = Dataset()
    command.AffectedSOPClassUID = ds.SOPClassUID
    command.CommandField, command.MessageID, command.Priority = 0x0001, 1, 0
    command.CommandDataSetType = 0x0000
    command.AffectedSOPInstanceUID = ds.SOPInstanceUID
    encoded = encode(command, True, True)
    if encoded is None:  # pynetdicom answers None for a data set it cannot encode
        raise ValueError("the C-STORE-RQ command set did not encode")
    return encoded, data


def _send_bomb(sock: socket.socket, bomb: tuple[bytes, bytes], stop: threading.Event) -> None:
    command, data = bomb
    sock.sendall(_pdu(0x04, _pdv(0x03, command)))  # context 3: deflated
    fragment = 16 * 1024
    for start in range(0, len(data), fragment):
        if stop.is_set() or _replied(sock, 0.0):
            return
        last = start + fragment >= len(data)
        sock.sendall(_pdu(0x04, struct.pack(">IBB", min(fragment, len(data) - start) + 2, 3,
                                            0x02 if last else 0x00) + data[start:start + fragment]))


def hostile_connection(kind: str, port: int, source: str, rq: bytes, command: bytes, stop: threading.Event,
             bomb: tuple[bytes, bytes] | None = None) -> str:
    """One hostile connection of ``kind``; how it ended."""
    try:
        sock = socket.create_connection((HOST, port), timeout=MAX_WATCH_S, source_address=(source, 0))
    except OSError:
        return "connect failed"
    with sock:
        try:
            if kind == "idle":
                sock.sendall(struct.pack(">BxI", 0x01, 1024 * 1024 - 1) + b"\x00\x01")
            elif kind == "trickle":
                for byte in rq:
                    if stop.is_set():
                        break
                    sock.sendall(bytes([byte]))
                    if _replied(sock, 1.0):
                        break
            else:
                sock.sendall(rq)
                first = sock.recv(1)
                if first != b"\x02":
                    return _ENDINGS.get(first, "closed")
                sock.recv(65536)  # the rest of the A-ASSOCIATE-AC
                if kind == "deflate_bomb" and bomb is not None:
                    _send_bomb(sock, bomb, stop)
                    return _ending(sock)
                if kind == "empty_pdvs":
                    sock.sendall(_pdu(0x04, _pdv(0x03, command)))
                    flood = _pdu(0x04, _pdv(0x00, b"") * 4096)
                else:
                    flood = _pdu(0x04, _pdv(0x01, b"\x00" * 16 * 1024))
                while not stop.is_set() and not _replied(sock, 0.0):
                    sock.sendall(flood)
        except OSError:
            pass
        return _ending(sock)


def _replied(sock: socket.socket, wait: float) -> bool:
    import select

    return bool(select.select([sock], [], [], wait)[0])


#: What the first byte the node sent back says (PDU types, PS3.8 Table 9-1).
_ENDINGS = {b"\x03": "rejected", b"\x07": "aborted"}


def _ending(sock: socket.socket) -> str:
    """rejected (A-ASSOCIATE-RJ), aborted (A-ABORT) or closed, from what the node sent."""
    sock.settimeout(MAX_WATCH_S)
    try:
        return _ENDINGS.get(sock.recv(1), "closed")
    except OSError:
        return "closed"
