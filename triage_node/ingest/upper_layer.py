"""The acceptor side of the DICOM Upper Layer (PS3.8) for one association.

pynetdicom encodes and decodes the PDUs, the presentation-context negotiation and
the DIMSE command sets; this module only moves them over a blocking socket, reading
PDUs and assembling the messages they carry (what the acceptor writes back is
encoded in ``triage_node.ingest.pdu_encoding``). Why not
pynetdicom's own ``Association``: its reactor threads poll queues with 1 ms sleeps
and hand each PDU through several queues, which on a 2-core box caps a C-STORE
receiver that writes nothing at about half of DCMTK ``storescp``
(``docs/BENCHMARKS.md``), before any durable write. Here the association's own
thread reads a PDU and hands each data-set fragment to its sink at once (the store
writes it to the spool as it comes); a complete C-STORE goes straight to the store
and back as a response, with no queue or sleep in between.

Everything that is not the data phase of a storage association (TLS, admission,
which contexts are supported) stays with the caller (``triage_node.ingest.scp``).
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any, Protocol

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom.dsutils import decode
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import MaximumLengthNotification, SCP_SCU_RoleSelectionNegotiation
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

__all__ = [
    "ABORT_INVALID_PARAMETER",
    "ABORT_UNEXPECTED_PDU",
    "ABORT_UNRECOGNISED_PDU",
    "Abort",
    "DatasetSink",
    "Message",
    "MessageAssembler",
    "Negotiated",
    "PeerClosed",
    "PeerSilent",
    "PeerTooSlow",
    "negotiate",
    "read_pdu",
]

# PDU types, PS3.8 Table 9-1.
ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA, RELEASE_RQ, RELEASE_RP, ABORT = 0x04, 0x05, 0x06, 0x07
_KNOWN_PDU_TYPES = {ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA, RELEASE_RQ, RELEASE_RP, ABORT}

# A-ABORT reasons from the service provider (source 0x02), PS3.8 Table 9-26.
ABORT_REASON_NOT_SPECIFIED = 0x00
ABORT_UNRECOGNISED_PDU = 0x01
ABORT_UNEXPECTED_PDU = 0x02
ABORT_INVALID_PARAMETER = 0x06

#: Largest PDU read from a peer. Ours is announced as ``max_pdu``; a peer may send
#: less, never more, but a generous cap still turns a 4 GiB length field into an
#: A-ABORT instead of an allocation.
PDU_READ_CAP = 16 * 1024 * 1024
#: Largest A-ASSOCIATE-RQ read: 128 presentation contexts with 20 transfer syntaxes
#: each are under 200 KiB.
ASSOCIATE_RQ_READ_CAP = 1024 * 1024
#: A PDU buffer starts at most this large and doubles as bytes arrive, so that a
#: peer that declares 16 MiB and sends nothing costs nothing.
GROW_STEP = 64 * 1024

#: Command sets are a few hundred bytes (PS3.7 Annex E); the cap bounds a peer that
#: sends command fragments without end.
MAX_COMMAND_BYTES = 64 * 1024
MAX_COMMAND_PDVS = 64
#: A message may have one PDV per this many bytes of the object size limit (plus
#: `MIN_PDVS_PER_MESSAGE`): each PDV costs memory however short it is, so empty or
#: one-byte fragments must not be free. Senders fill their PDUs (16 KiB and up).
PDV_BYTES_PER_FRAGMENT = 4096
MIN_PDVS_PER_MESSAGE = 64

# DIMSE command fields, PS3.7 Annex E.
C_STORE_RQ_FIELD, C_ECHO_RQ_FIELD = 0x0001, 0x0030
NO_DATASET = 0x0101

PDU_HEADER = struct.Struct(">BxI")
PDV_HEADER = struct.Struct(">IBB")


class PeerClosed(Exception):
    """The peer closed the connection (or it failed) between or inside PDUs."""


class PeerSilent(PeerClosed):
    """No PDU (not even its whole 6-byte header) arrived in the time allowed."""


class Abort(Exception):
    """The association must end with an A-ABORT (service provider) with this reason."""

    def __init__(self, reason: int, why: str) -> None:
        super().__init__(why)
        self.reason = reason


class PeerTooSlow(Abort):
    """A PDU began but was not complete by its deadline (a peer trickling bytes)."""

    def __init__(self, why: str) -> None:
        super().__init__(ABORT_REASON_NOT_SPECIFIED, why)


class _Late(Exception):
    """The deadline passed with ``got`` bytes of the read received."""

    def __init__(self, got: int) -> None:
        self.got = got


def _recv_exactly(
    sock: socket.socket, size: int, deadline: float | None = None, prealloc: int = GROW_STEP
) -> bytearray:
    """``size`` bytes by ``deadline`` (monotonic; None: the socket's own timeout per recv).

    ``size`` up to ``prealloc`` is allocated at once; a larger one starts at
    `GROW_STEP` and doubles as the bytes come, so its buffer follows what arrived,
    never only what the peer declared.
    """
    buffer = bytearray(size if size <= prealloc else min(size, GROW_STEP))
    got = 0
    while got < size:
        if got == len(buffer):
            buffer.extend(bytes(min(size, max(2 * got, GROW_STEP)) - got))
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Late(got)
            sock.settimeout(remaining)
        try:
            # A fresh view per call: the bytearray cannot grow while one is held.
            n = sock.recv_into(memoryview(buffer)[got:], len(buffer) - got)
        except TimeoutError:
            raise _Late(got) from None
        except OSError as exc:
            raise PeerClosed(str(exc) or type(exc).__name__) from None
        if n == 0:
            raise PeerClosed("connection closed by the peer")
        got += n
    return buffer


def read_pdu(
    sock: socket.socket,
    cap: int = PDU_READ_CAP,
    *,
    deadline: float | None = None,
    pdu_seconds: float | None = None,
    prealloc: int = GROW_STEP,
) -> tuple[int, bytearray, bytes]:
    """Read one PDU: (type, body, the 6-byte header).

    Parameters
    ----------
    deadline : float, optional
        ``time.monotonic()`` by which the header must be in, else `PeerSilent`; also
        the body's deadline unless ``pdu_seconds`` is given. None: only the socket's
        timeout, per recv.
    pdu_seconds : float, optional
        Time for the body once the header is in, else `PeerTooSlow` (overall, not per
        recv: a peer trickling a byte a second is cut).
    prealloc : int
        A body up to this long is allocated before its bytes arrive (after admission:
        the maximum PDU length the node announced); a longer one grows as they come.
    """
    try:
        header = bytes(_recv_exactly(sock, 6, deadline))
    except _Late as late:
        raise PeerSilent(f"no complete PDU header in time ({late.got} of 6 bytes)") from None
    pdu_type, length = PDU_HEADER.unpack(header)
    if pdu_type not in _KNOWN_PDU_TYPES:
        raise Abort(ABORT_UNRECOGNISED_PDU, f"unrecognised PDU type 0x{pdu_type:02X}")
    if length > cap:
        raise Abort(ABORT_INVALID_PARAMETER, f"PDU of {length} bytes is over the {cap}-byte cap")
    body_deadline = deadline if pdu_seconds is None else time.monotonic() + pdu_seconds
    try:
        return pdu_type, _recv_exactly(sock, length, body_deadline, prealloc), header
    except _Late as late:
        raise PeerTooSlow(
            f"PDU of {length} bytes not complete in time ({late.got} bytes received)"
        ) from None


@dataclass
class Negotiated:
    """The outcome of A-ASSOCIATE-RQ negotiation, and what the data phase needs of it."""

    calling_ae: str
    called_ae: str
    peer_max_pdu: int
    #: Accepted presentation contexts by id.
    contexts: dict[int, PresentationContext]
    results: list[PresentationContext]
    roles: list[SCP_SCU_RoleSelectionNegotiation] = field(default_factory=list)


def negotiate(rq_bytes: bytes, supported: Sequence[PresentationContext]) -> Negotiated:
    """Decode an A-ASSOCIATE-RQ and negotiate its presentation contexts (PS3.8 9.3.2, PS3.7 D.3.3)."""
    pdu = A_ASSOCIATE_RQ()
    try:
        pdu.decode(rq_bytes)
        primitive = pdu.to_primitive()
    except Exception as exc:  # noqa: BLE001 - any malformed request is an abort
        raise Abort(ABORT_INVALID_PARAMETER, f"malformed A-ASSOCIATE-RQ: {exc}") from None
    peer_max = 0
    rq_roles: dict[UID, tuple[bool | None, bool | None]] = {}
    for item in primitive.user_information:
        if isinstance(item, MaximumLengthNotification):
            peer_max = int(item.maximum_length_received or 0)
        elif isinstance(item, SCP_SCU_RoleSelectionNegotiation) and item.sop_class_uid:
            rq_roles[item.sop_class_uid] = (item.scu_role, item.scp_role)
    results, roles = negotiate_as_acceptor(
        primitive.presentation_context_definition_list, list(supported), rq_roles or None
    )
    return Negotiated(
        calling_ae=str(primitive.calling_ae_title).strip(),
        called_ae=str(primitive.called_ae_title).strip(),
        peer_max_pdu=peer_max,
        contexts={int(cx.context_id): cx for cx in results if cx.result == 0x00},  # type: ignore[arg-type]
        results=results,
        roles=roles,
    )


class DatasetSink(Protocol):
    """Where the fragments of one data set go as they arrive."""

    def write(self, fragment: memoryview) -> None: ...

    def result(self) -> Any:
        """The complete data set, as `Message.dataset` carries it."""

    def discard(self) -> None:
        """The message will not complete (the association ended inside it)."""


class _Joined:
    """The default sink: the fragments, joined into bytes once the last one is in."""

    def __init__(self) -> None:
        self._parts: list[memoryview] = []

    def write(self, fragment: memoryview) -> None:
        self._parts.append(fragment)

    def result(self) -> bytes:
        return b"".join(self._parts)

    def discard(self) -> None:
        self._parts = []


@dataclass
class Message:
    """One complete DIMSE request: its context, decoded command set and data set.

    ``dataset`` is what the data set's sink made of it: the raw bytes by default, or
    whatever ``open_dataset`` returned (the store's object being received).
    """

    context_id: int
    command: Dataset
    dataset: Any


#: Opens the sink of a data set: (presentation context id, decoded command set) -> sink.
OpenDataset = Callable[[int, Dataset], DatasetSink]


class MessageAssembler:
    """Reassembles DIMSE messages from the PDVs of P-DATA-TF PDUs (PS3.8 9.3.5, Annex E).

    The data set is never decoded here: each fragment goes, as it came off the wire,
    to the sink that ``open_dataset`` gives for its message (by default the fragments
    are joined into bytes when the last one arrives). Call `close` when the
    association ends, so that a message cut short is discarded.

    Bounded per message: the data set by ``max_dataset_bytes``, the command set by
    `MAX_COMMAND_BYTES` and `MAX_COMMAND_PDVS`, the number of PDVs by one per
    `PDV_BYTES_PER_FRAGMENT` of ``max_dataset_bytes``; empty data fragments are
    counted, not kept. Past a bound the association is aborted (`Abort`).
    """

    def __init__(
        self, contexts: dict[int, PresentationContext], max_dataset_bytes: int,
        open_dataset: OpenDataset | None = None,
    ) -> None:
        self.contexts = contexts
        self.max_dataset_bytes = max_dataset_bytes
        self._open_dataset = open_dataset or (lambda _context_id, _command: _Joined())
        self.max_pdvs = MIN_PDVS_PER_MESSAGE + max_dataset_bytes // PDV_BYTES_PER_FRAGMENT
        self._command: list[bytes] = []
        self._command_size = 0
        self._pdvs = 0
        self._sink: DatasetSink | None = None
        self._size = 0
        self._context_id: int | None = None
        self._header: Dataset | None = None

    def feed(self, body: bytearray) -> Iterator[Message]:
        if not body:
            raise Abort(ABORT_INVALID_PARAMETER, "P-DATA-TF without a PDV item")  # PS3.8 9.3.5
        view = memoryview(body)
        offset = 0
        while offset < len(view):
            if len(view) - offset < 6:
                raise Abort(ABORT_INVALID_PARAMETER, "truncated PDV item")
            length, context_id, control = PDV_HEADER.unpack_from(view, offset)
            if length < 2 or offset + 4 + length > len(view):
                raise Abort(ABORT_INVALID_PARAMETER, "PDV item length outside the PDU")
            if context_id not in self.contexts:
                raise Abort(ABORT_INVALID_PARAMETER, f"PDV on presentation context {context_id}, not accepted")
            if self._context_id is not None and context_id != self._context_id:
                raise Abort(ABORT_INVALID_PARAMETER, "PDV on another context in the middle of a message")
            self._context_id = context_id
            fragment = view[offset + 6 : offset + 4 + length]
            offset += 4 + length
            message = self._fragment(context_id, control, fragment)
            if message is not None:
                yield message

    def close(self) -> None:
        """Discard a message still being assembled (the association is over)."""
        if self._sink is not None:
            self._sink.discard()
        self._reset()

    def _reset(self) -> None:
        """Ready for the next message's command set."""
        self._header, self._context_id, self._sink, self._size = None, None, None, 0
        self._command, self._command_size, self._pdvs = [], 0, 0

    def _fragment(self, context_id: int, control: int, fragment: memoryview) -> Message | None:
        is_command, is_last = bool(control & 0x01), bool(control & 0x02)
        self._pdvs += 1
        if self._pdvs > self.max_pdvs:
            raise Abort(ABORT_INVALID_PARAMETER, f"more than {self.max_pdvs} PDVs in one message")
        if is_command:
            if self._header is not None:
                raise Abort(ABORT_INVALID_PARAMETER, "command fragment inside a data set")
            self._command_size += len(fragment)
            if self._command_size > MAX_COMMAND_BYTES or len(self._command) >= MAX_COMMAND_PDVS:
                raise Abort(
                    ABORT_INVALID_PARAMETER,
                    f"command set over {MAX_COMMAND_BYTES} bytes or {MAX_COMMAND_PDVS} fragments",
                )
            self._command.append(bytes(fragment))
            if not is_last:
                return None
            try:
                self._header = decode(BytesIO(b"".join(self._command)), True, True)
            except Exception as exc:  # noqa: BLE001 - undecodable command set
                raise Abort(ABORT_INVALID_PARAMETER, f"undecodable command set: {exc}") from None
            self._command, self._command_size = [], 0
            if int(self._header.get("CommandDataSetType", NO_DATASET)) == NO_DATASET:
                return self._complete(None)
            return None
        if self._header is None:
            raise Abort(ABORT_INVALID_PARAMETER, "data set fragment before its command set")
        self._size += len(fragment)
        if self._size > self.max_dataset_bytes:
            # A bound per association, checked as the bytes come (PS3.8 allows the
            # provider to abort; there is no C-STORE status for "too large").
            raise Abort(
                ABORT_INVALID_PARAMETER,
                f"data set larger than {self.max_dataset_bytes // 2**20} MiB (max_object_mb)",
            )
        if self._sink is None:
            self._sink = self._open_dataset(context_id, self._header)
        if fragment:  # an empty one is counted above, never kept
            self._sink.write(fragment)
        return self._complete(self._sink.result()) if is_last else None

    def _complete(self, dataset: Any) -> Message:
        assert self._header is not None and self._context_id is not None
        message = Message(self._context_id, self._header, dataset)
        self._reset()
        return message
