"""The listener's upper layer against pynetdicom's own encoders and decoders (PS3.7, PS3.8, PS3.10)."""

from __future__ import annotations

import socket
import struct
from io import BytesIO

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEGLosslessSV1
from pynetdicom import build_context
from pynetdicom.dimse_messages import C_ECHO_RSP, C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import create_file_meta, encode, encode_file_meta
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, P_DATA_TF
from pynetdicom.sop_class import Verification

from tests.ingest_support import associate_rq, pdv
from triage_node.ingest import pdu_encoding as pdus
from triage_node.ingest import upper_layer as ul

SOP_INSTANCES = ["1.2.3", "1.2.34", "1.2.826.0.1.3680043.8.498.12345678901234567890123456789012345"]


def _command(**values: object) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ul.decode(BytesIO(encode(ds, True, True)), True, True)


def _pynetdicom_response(message: ul.Message, status: int, max_pdu: int) -> bytes:
    command = message.command
    if command.CommandField == ul.C_STORE_RQ_FIELD:
        primitive = C_STORE()
        primitive.AffectedSOPInstanceUID = command.get("AffectedSOPInstanceUID")
        response = C_STORE_RSP()
    else:
        primitive = C_ECHO()
        response = C_ECHO_RSP()
    primitive.MessageIDBeingRespondedTo = command.MessageID
    primitive.AffectedSOPClassUID = command.get("AffectedSOPClassUID")
    primitive.Status = status
    response.primitive_to_message(primitive)
    out = b""
    for p_data in response.encode_msg(message.context_id, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(p_data)
        out += pdu.encode()
    return out


@pytest.mark.parametrize("sop_instance", SOP_INSTANCES)
@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xA900, 0xC000])
@pytest.mark.parametrize("max_pdu", [0, 16382, 64])
def test_c_store_response_is_pynetdicoms_encoding(sop_instance: str, status: int, max_pdu: int) -> None:
    command = _command(CommandField=0x0001, MessageID=7, AffectedSOPClassUID=CTImageStorage,
                       AffectedSOPInstanceUID=sop_instance, Priority=0, CommandDataSetType=0x0000)
    message = ul.Message(3, command, b"")
    assert pdus.response_pdus(message, status, max_pdu) == _pynetdicom_response(message, status, max_pdu)


def test_c_echo_response_is_pynetdicoms_encoding() -> None:
    command = _command(CommandField=0x0030, MessageID=65535, AffectedSOPClassUID=Verification,
                       CommandDataSetType=0x0101)
    message = ul.Message(1, command, None)
    assert pdus.response_pdus(message, 0, 16382) == _pynetdicom_response(message, 0, 16382)


@pytest.mark.parametrize("sop_instance", SOP_INSTANCES)
@pytest.mark.parametrize("transfer_syntax", [ExplicitVRLittleEndian, JPEGLosslessSV1])
def test_file_meta_is_pydicoms_encoding(sop_instance: str, transfer_syntax: str) -> None:
    expected_meta = encode_file_meta(create_file_meta(
        sop_class_uid=CTImageStorage, sop_instance_uid=sop_instance, transfer_syntax=transfer_syntax))
    data = pdus.part10(b"DATASET", CTImageStorage, sop_instance, transfer_syntax)
    assert data == b"\x00" * 128 + b"DICM" + expected_meta + b"DATASET"


def test_part10_reads_back_with_pydicom() -> None:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.PatientID = CTImageStorage, "1.2.3", "X"
    ds.set_original_encoding(False, True)
    raw = encode(ds, False, True)
    read = dcmread(BytesIO(pdus.part10(raw, CTImageStorage, "1.2.3", ExplicitVRLittleEndian)))
    assert read.file_meta.MediaStorageSOPInstanceUID == "1.2.3"
    assert read.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert read.PatientID == "X"


def test_negotiation_accepts_supported_contexts_and_refuses_the_rest() -> None:
    ct = build_context(CTImageStorage, [JPEGLosslessSV1, ExplicitVRLittleEndian])
    ct.context_id = 1
    other = build_context("1.2.3.4.5", [ExplicitVRLittleEndian])
    other.context_id = 3
    supported = [build_context(CTImageStorage, [ExplicitVRLittleEndian])]
    negotiated = ul.negotiate(associate_rq([ct, other], max_pdu=32768), supported)
    assert (negotiated.calling_ae, negotiated.called_ae, negotiated.peer_max_pdu) == (
        "MODALITY", "TRIAGE_NODE", 32768)
    assert list(negotiated.contexts) == [1]
    assert negotiated.contexts[1].transfer_syntax[0] == ExplicitVRLittleEndian
    ac = A_ASSOCIATE_AC()
    ac.decode(pdus.accept_pdu(negotiated, 1 << 20))
    results = {cx.context_id: cx.result for cx in ac.to_primitive().presentation_context_definition_results_list}
    assert results == {1: 0x00, 3: 0x03}  # 3: abstract syntax not supported


def test_reject_pdu_carries_the_reason() -> None:
    rj = A_ASSOCIATE_RJ()
    rj.decode(pdus.reject_pdu(0x01, 0x01, 0x07))
    assert (rj.result, rj.source, rj.reason_diagnostic) == (0x01, 0x01, 0x07)


def test_assembler_joins_fragments_across_pdus() -> None:
    contexts = {1: build_context(CTImageStorage)}
    command = encode(_command(CommandField=1, MessageID=1, AffectedSOPClassUID=CTImageStorage,
                              AffectedSOPInstanceUID="1.2.3", Priority=0, CommandDataSetType=0), True, True)
    assembler = ul.MessageAssembler(contexts, 1 << 20)
    first = bytearray(pdv(1, 0x01, command[:10]) + pdv(1, 0x03, command[10:]) + pdv(1, 0x00, b"AB"))
    assert list(assembler.feed(first)) == []
    [message] = list(assembler.feed(bytearray(pdv(1, 0x00, b"CD") + pdv(1, 0x02, b"EF"))))
    assert message.dataset == b"ABCDEF" and message.context_id == 1
    assert message.command.AffectedSOPInstanceUID == "1.2.3"


@pytest.mark.parametrize("body, why", [
    (pdv(9, 0x03, b"x" * 8), "not accepted"),
    (pdv(1, 0x02, b"data"), "before its command set"),
    (b"\x00\x00\x00\x40\x01\x03", "outside the PDU"),
    (b"\x00\x00", "truncated"),
])
def test_assembler_aborts_on_malformed_pdvs(body: bytes, why: str) -> None:
    assembler = ul.MessageAssembler({1: build_context(CTImageStorage)}, 1 << 20)
    with pytest.raises(ul.Abort, match=why):
        list(assembler.feed(bytearray(body)))


def test_read_pdu_caps_the_length_and_rejects_unknown_types() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"\x01\x00\xff\xff\xff\xfe")
        with pytest.raises(ul.Abort, match="cap"):
            ul.read_pdu(b)
        a.sendall(b"\x09\x00\x00\x00\x00\x00")
        with pytest.raises(ul.Abort, match="unrecognised"):
            ul.read_pdu(b)
        a.close()
        with pytest.raises(ul.PeerClosed):
            ul.read_pdu(b)


def test_assembler_aborts_a_data_set_over_the_cap_and_resets_between_messages() -> None:
    contexts = {1: build_context(CTImageStorage)}
    command = encode(_command(CommandField=1, MessageID=1, AffectedSOPClassUID=CTImageStorage,
                              AffectedSOPInstanceUID="1.2.3", Priority=0, CommandDataSetType=0), True, True)
    assembler = ul.MessageAssembler(contexts, max_dataset_bytes=6)
    [ok] = list(assembler.feed(bytearray(pdv(1, 0x03, command) + pdv(1, 0x02, b"ABCDEF"))))
    assert ok.dataset == b"ABCDEF"
    with pytest.raises(ul.Abort, match="larger than"):
        list(assembler.feed(bytearray(pdv(1, 0x03, command) + pdv(1, 0x00, b"ABCD")
                                      + pdv(1, 0x02, b"EFG"))))


def test_read_pdu_buffer_follows_the_bytes_that_arrived_not_the_declared_length() -> None:
    import tracemalloc

    a, b = socket.socketpair()
    with a, b:
        a.sendall(struct.pack(">BxI", 0x04, 16 * 1024 * 1024 - 1) + b"x" * 1000)
        a.shutdown(socket.SHUT_WR)
        tracemalloc.start()
        try:
            with pytest.raises(ul.PeerClosed):
                ul.read_pdu(b, prealloc=1 << 20)  # declared over ``prealloc``: grown
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < 2 * ul.GROW_STEP


def test_read_pdu_deadlines_are_overall_not_per_recv() -> None:
    import threading
    import time

    a, b = socket.socketpair()
    with a, b:
        with pytest.raises(ul.PeerSilent):
            ul.read_pdu(b, deadline=time.monotonic() + 0.2)
        a.sendall(struct.pack(">BxI", 0x04, 100))

        def trickle() -> None:
            for _ in range(20):
                try:
                    a.sendall(b"x")
                except OSError:
                    return
                time.sleep(0.05)

        sender = threading.Thread(target=trickle)
        sender.start()
        started = time.monotonic()
        with pytest.raises(ul.PeerTooSlow, match="not complete in time"):
            ul.read_pdu(b, deadline=time.monotonic() + 10, pdu_seconds=0.3)
        assert time.monotonic() - started < 0.6
        sender.join()


def _store_command() -> bytes:
    return encode(_command(CommandField=1, MessageID=1, AffectedSOPClassUID=CTImageStorage,
                           AffectedSOPInstanceUID="1.2.3", Priority=0, CommandDataSetType=0), True, True)


def test_assembler_counts_empty_pdvs_and_keeps_none() -> None:
    written: list[int] = []

    class Sink:
        def write(self, fragment: memoryview) -> None:
            written.append(len(fragment))

        def result(self) -> bytes:
            return b""

        def discard(self) -> None:
            pass

    assembler = ul.MessageAssembler({1: build_context(CTImageStorage)}, 64 * 1024,
                                    open_dataset=lambda _cx, _command: Sink())
    assert assembler.max_pdvs == ul.MIN_PDVS_PER_MESSAGE + 16
    list(assembler.feed(bytearray(pdv(1, 0x03, _store_command()) + pdv(1, 0x00, b"AB"))))
    with pytest.raises(ul.Abort, match="PDVs in one message"):
        list(assembler.feed(bytearray(pdv(1, 0x00, b"") * 1000)))
    assert written == [2]


def test_assembler_bounds_the_command_set_and_refuses_an_empty_p_data() -> None:
    assembler = ul.MessageAssembler({1: build_context(CTImageStorage)}, 1 << 30)
    with pytest.raises(ul.Abort, match="command set over"):
        for _ in range(10):
            list(assembler.feed(bytearray(pdv(1, 0x01, b"\x00" * 16 * 1024))))
    with pytest.raises(ul.Abort, match="command set over"):
        list(ul.MessageAssembler({1: build_context(CTImageStorage)}, 1 << 30).feed(
            bytearray(pdv(1, 0x01, b"") * (ul.MAX_COMMAND_PDVS + 1))))
    with pytest.raises(ul.Abort, match="without a PDV"):
        list(assembler.feed(bytearray()))
