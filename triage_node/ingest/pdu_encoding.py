"""What the acceptor writes: association PDUs, DIMSE responses and Part 10 file meta.

Kept apart from ``triage_node.ingest.upper_layer``, which reads PDUs from the socket
and assembles messages: everything here is a pure function from values to bytes, with
no socket and no state. The association PDUs (PS3.8 9.3) are encoded by pynetdicom; the
C-STORE/C-ECHO responses (PS3.7 9.3) and the file meta group (PS3.10 7.1) are encoded
directly, since they are on the path of every acknowledged object, and the tests check
them byte for byte against pynetdicom's and pydicom's own encoding.
"""

from __future__ import annotations

import struct

from pydicom.uid import UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_RELEASE_RP
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)

from triage_node.ingest.upper_layer import (
    C_STORE_RQ_FIELD,
    NO_DATASET,
    P_DATA,
    PDU_HEADER,
    PDV_HEADER,
    Message,
    Negotiated,
)

__all__ = [
    "abort_pdu",
    "accept_pdu",
    "part10",
    "part10_prefix",
    "reject_pdu",
    "release_rp_pdu",
    "response_pdus",
]

_US = struct.Struct("<H")


def accept_pdu(negotiated: Negotiated, max_pdu: int) -> bytes:
    """The encoded A-ASSOCIATE-AC (PS3.8 9.3.3)."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = UID("1.2.840.10008.3.1.1.1")
    primitive.calling_ae_title = negotiated.calling_ae or "ANY-SCU"
    primitive.called_ae_title = negotiated.called_ae or "ANY-SCP"
    primitive.result = 0x00
    primitive.result_source = 0x01
    primitive.presentation_context_definition_results_list = negotiated.results
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = max_pdu
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = PYNETDICOM_IMPLEMENTATION_VERSION
    primitive.user_information = [max_length, implementation, version, *negotiated.roles]
    pdu = A_ASSOCIATE_AC()
    pdu.from_primitive(primitive)
    return pdu.encode()


def reject_pdu(result: int, source: int, diagnostic: int) -> bytes:
    """The encoded A-ASSOCIATE-RJ (PS3.8 9.3.4)."""
    primitive = A_ASSOCIATE()
    primitive.result = result
    primitive.result_source = source
    primitive.diagnostic = diagnostic
    pdu = A_ASSOCIATE_RJ()
    pdu.from_primitive(primitive)
    return pdu.encode()


def abort_pdu(reason: int) -> bytes:
    """The encoded A-ABORT from the service provider (PS3.8 9.3.8)."""
    pdu = A_ABORT_RQ()
    pdu.source = 0x02
    pdu.reason_diagnostic = reason
    return pdu.encode()


def release_rp_pdu() -> bytes:
    return A_RELEASE_RP().encode()


def _ui(value: str) -> bytes:
    """A UI value padded with NUL to even length (PS3.5 6.2)."""
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _explicit(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    """One Explicit VR Little Endian element (PS3.5 7.1.2)."""
    if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT"):
        return struct.pack("<HH2s2xI", group, element, vr, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def _implicit(element: int, value: bytes) -> bytes:
    """One Implicit VR Little Endian element of the command group (PS3.7 6.3.1)."""
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


_IMPLEMENTATION_UID = _ui(str(PYNETDICOM_IMPLEMENTATION_UID))
_IMPLEMENTATION_VERSION = PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii")
if len(_IMPLEMENTATION_VERSION) % 2:
    _IMPLEMENTATION_VERSION += b" "


def part10(dataset: bytes, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """Preamble, file meta (PS3.10 7.1) and the data set bytes as received."""
    return part10_prefix(sop_class_uid, sop_instance_uid, transfer_syntax) + dataset


def part10_prefix(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """Preamble and file meta (PS3.10 7.1) of a received data set: what goes before it.

    The meta group is the one pydicom writes for ``pynetdicom.dsutils.create_file_meta``
    (byte for byte, see the tests), encoded here because it is a fixed handful of
    elements and pydicom takes a quarter of a millisecond per object for it.
    """
    elements = b"".join((
        _explicit(0x0002, 0x0001, b"OB", b"\x00\x01"),
        _explicit(0x0002, 0x0002, b"UI", _ui(sop_class_uid)),
        _explicit(0x0002, 0x0003, b"UI", _ui(sop_instance_uid)),
        _explicit(0x0002, 0x0010, b"UI", _ui(transfer_syntax)),
        _explicit(0x0002, 0x0012, b"UI", _IMPLEMENTATION_UID),
        _explicit(0x0002, 0x0013, b"SH", _IMPLEMENTATION_VERSION),
    ))
    group_length = _explicit(0x0002, 0x0000, b"UL", struct.pack("<I", len(elements)))
    return b"".join((b"\x00" * 128, b"DICM", group_length, elements))


C_STORE_RSP_FIELD, C_ECHO_RSP_FIELD = 0x8001, 0x8030


def response_pdus(message: Message, status: int, peer_max_pdu: int) -> bytes:
    """The encoded C-STORE-RSP or C-ECHO-RSP for ``message`` (PS3.7 9.3.1.2, 9.3.5.2).

    The same bytes as pynetdicom's ``C_STORE_RSP``/``C_ECHO_RSP`` messages (see the
    tests), encoded directly: a response is a handful of command elements, and this
    is on the path of every acknowledged object.
    """
    command = message.command
    is_store = int(command.CommandField) == C_STORE_RQ_FIELD
    elements = []
    sop_class = str(command.get("AffectedSOPClassUID", "") or "")
    if sop_class:
        elements.append(_implicit(0x0002, _ui(sop_class)))
    us = _US.pack
    elements.append(_implicit(0x0100, us(C_STORE_RSP_FIELD if is_store else C_ECHO_RSP_FIELD)))
    elements.append(_implicit(0x0120, us(int(command.MessageID))))
    elements.append(_implicit(0x0800, us(NO_DATASET)))
    elements.append(_implicit(0x0900, us(status)))
    sop_instance = str(command.get("AffectedSOPInstanceUID", "") or "") if is_store else ""
    if sop_instance:
        elements.append(_implicit(0x1000, _ui(sop_instance)))
    body = b"".join(elements)
    encoded = _implicit(0x0000, struct.pack("<I", len(body))) + body
    # One PDV per P-DATA-TF PDU, split to the peer's maximum PDU length (PS3.8 9.3.5.1).
    step = peer_max_pdu - 6 if peer_max_pdu else len(encoded)
    pdus = []
    for offset in range(0, len(encoded), step):
        fragment = encoded[offset : offset + step]
        control = 0x03 if offset + step >= len(encoded) else 0x01
        pdv = PDV_HEADER.pack(len(fragment) + 2, message.context_id, control) + fragment
        pdus.append(PDU_HEADER.pack(P_DATA, len(pdv)) + pdv)
    return b"".join(pdus)
