"""Hostile peers at the DICOM Upper Layer against a running node (issue 17, findings 1 and 3).

Each test speaks raw PDUs over sockets to a real ``triage-node serve``: connections that
declare large PDUs and go quiet, more connections than the caps allow, peers that trickle
a byte at a time, a maximum PDU length too small to answer within, floods of empty PDVs
and command sets without end. The defined outcome each time: the node refuses or aborts
(PS3.8 9.3.4, 9.3.8), says why in its log and in an audit row, keeps its memory, and
still stores a valid object from a normal sender while (or right after) it happens.

Deadlines are made short for the tests (3 s); the sources are distinct loopback
addresses (127.0.0.x) so that the per-source cap can be shown apart from the global one.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, build_context
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import CTImageStorage, Verification
from sqlalchemy import select

from tests.ingest_support import associate_rq, ct_dataset, p_data, pdv
from tests.node_process import AET, NodeProcess
from triage_node.db.models import AuditEvent
from triage_node.ingest.admission import ASSOCIATE_RJ_LOCAL_LIMIT, ASSOCIATE_RJ_NO_REASON
from triage_node.ingest.upper_layer import MAX_COMMAND_BYTES

DEADLINE_S = 3
PER_SOURCE = 10
ASSOCIATE_AC, ASSOCIATE_RJ, ABORT = 0x02, 0x03, 0x07


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    env = {
        "TRIAGE_MAX_ASSOCIATIONS": "60",
        "TRIAGE_MAX_ASSOCIATIONS_PER_SOURCE": str(PER_SOURCE),
        "TRIAGE_ASSOCIATION_REQUEST_TIMEOUT_S": str(DEADLINE_S),
        "TRIAGE_PDU_TIMEOUT_S": str(DEADLINE_S),
        "TRIAGE_MAX_OBJECT_MB": "16",
    }
    with NodeProcess(tmp_path_factory.mktemp("hostile-network") / "data", env=env) as running:
        yield running


def _context() -> object:
    context = build_context(CTImageStorage, [ExplicitVRLittleEndian])
    context.context_id = 1
    return context


def _connect(node: NodeProcess, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", node.dicom_port), timeout=15,
                                    source_address=(source, 0))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """The next PDU (type, body); (0, b"") when the node closed the connection."""
    header = b""
    while len(header) < 6:
        chunk = sock.recv(6 - len(header))
        if not chunk:
            return 0, b""
        header += chunk
    pdu_type, length = struct.unpack(">BxI", header)
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            break
        body += chunk
    return pdu_type, body


def _associate(node: NodeProcess, source: str = "127.0.0.1", max_pdu: int = 16382) -> socket.socket:
    sock = _connect(node, source)
    sock.sendall(associate_rq([_context()], max_pdu=max_pdu))
    assert _read_pdu(sock)[0] == ASSOCIATE_AC
    return sock


def _ended_with_abort(sock: socket.socket) -> bool:
    """True when the node sent an A-ABORT and closed (whatever came before it)."""
    try:
        while True:
            pdu_type, _ = _read_pdu(sock)
            if pdu_type in (ABORT, 0):
                return pdu_type == ABORT
    except (ConnectionResetError, TimeoutError):
        return False


def _c_store_command(ds: Dataset) -> bytes:
    command = Dataset()
    command.AffectedSOPClassUID = ds.SOPClassUID
    command.CommandField = 0x0001
    command.MessageID = 1
    command.Priority = 0
    command.CommandDataSetType = 0x0000
    command.AffectedSOPInstanceUID = ds.SOPInstanceUID
    return encode(command, True, True)


def _store_one(node: NodeProcess) -> int:
    """C-STORE one valid slice from a normal pynetdicom sender; its status."""
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.dicom_port, ae_title=AET)
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(ct_dataset(generate_uid(), generate_uid(), 0)).Status)
    finally:
        assoc.release()


def _audit(node: NodeProcess, action: str, needle: str) -> list[AuditEvent]:
    with node.session_factory() as session:
        rows = session.scalars(select(AuditEvent).where(AuditEvent.action == action)).all()
    return [row for row in rows if needle in str(row.detail.get("reason", ""))]


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _wait_for(check: Callable[[], object], timeout: float = 15.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def _still_storing(node: NodeProcess) -> None:
    assert node.alive
    assert _store_one(node) == 0x0000


def test_idle_peers_declaring_large_pdus_cost_little_memory_and_are_cut_at_the_deadline(
    node: NodeProcess,
) -> None:
    """20 peers start an A-ASSOCIATE-RQ of 1 MiB, 20 admitted ones a P-DATA-TF of 16 MiB;
    each sends a few bytes and goes quiet. Before, each cost its declared length."""
    _store_one(node)  # warm: the first store's imports and pools are not the peers' cost
    before = _rss_kib(node.process.pid)
    peers = []
    for i in range(40):
        source = f"127.0.0.{2 + i % 4}"
        if i < 20:
            sock = _connect(node, source)
            sock.sendall(struct.pack(">BxI", 0x01, 1024 * 1024 - 1) + b"\x00\x01")
        else:
            sock = _associate(node, source)
            sock.sendall(struct.pack(">BxI", 0x04, 16 * 1024 * 1024 - 6) + b"\x00\x00")
        peers.append(sock)
    time.sleep(0.5)
    grown_mib = (_rss_kib(node.process.pid) - before) / 1024
    started = time.monotonic()
    assert _store_one(node) == 0x0000  # a normal sender meanwhile
    assert grown_mib < 40, f"node RSS grew {grown_mib:.0f} MiB for 40 idle peers"
    for sock in peers:
        with sock:
            assert _ended_with_abort(sock)
    assert time.monotonic() - started < DEADLINE_S + 5
    assert _audit(node, "association.aborted", "A-ASSOCIATE-RQ not complete within")
    assert _audit(node, "association.aborted", "not complete in time")
    _still_storing(node)


def test_connections_over_the_per_source_cap_are_rejected_before_their_request_is_read(
    node: NodeProcess,
) -> None:
    held = [_connect(node, "127.0.0.9") for _ in range(PER_SOURCE)]
    try:
        time.sleep(0.3)  # all ten accepted (and counted) before the eleventh
        extra = _connect(node, "127.0.0.9")
        with extra:
            extra.sendall(associate_rq([_context()]))
            pdu_type, body = _read_pdu(extra)
        assert pdu_type == ASSOCIATE_RJ and tuple(body[1:4]) == ASSOCIATE_RJ_LOCAL_LIMIT
        # Another address is not held back by this one.
        assert _store_one(node) == 0x0000
    finally:
        for sock in held:
            sock.close()
    [row] = _wait_for(lambda: _audit(node, "association.rejected", "from this address"))
    assert row.actor.endswith("@127.0.0.9") and row.outcome == "failed"
    assert "too many associations open from this address" in node.log_text()
    _still_storing(node)


def test_a_peer_trickling_bytes_is_cut_when_the_deadline_passes(node: NodeProcess) -> None:
    """One byte every 0.3 s, of the A-ASSOCIATE-RQ and of a P-DATA-TF: each is aborted
    at the overall deadline (before, each recv restarted the timeout)."""
    outcomes: dict[str, tuple[bool, float]] = {}

    def trickle(name: str, sock: socket.socket, data: bytes) -> None:
        started = time.monotonic()
        with sock:
            try:
                for byte in data:
                    sock.sendall(bytes([byte]))
                    time.sleep(0.3)
            except OSError:
                pass  # cut: what the node sent is still there to read
            outcomes[name] = (_ended_with_abort(sock), time.monotonic() - started)

    command = _c_store_command(ct_dataset(generate_uid(), generate_uid(), 0))
    threads = [
        threading.Thread(target=trickle, args=("request", _connect(node), associate_rq([_context()]))),
        threading.Thread(target=trickle, args=("pdu", _associate(node), p_data(pdv(1, 0x03, command)))),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for name, (aborted, seconds) in outcomes.items():
        assert aborted, name
        assert DEADLINE_S - 0.5 < seconds < DEADLINE_S + 3, (name, seconds)
    assert len(outcomes) == 2
    assert _audit(node, "association.aborted", f"A-ASSOCIATE-RQ not complete within {DEADLINE_S} s")
    assert _audit(node, "association.aborted", "PDU of")
    _still_storing(node)


@pytest.mark.parametrize("max_pdu", [1, 6, 16, 1023])
def test_an_absurdly_small_max_pdu_length_is_rejected(node: NodeProcess, max_pdu: int) -> None:
    """Before, a peer max of 6 or less hung the response (or raised): now A-ASSOCIATE-RJ."""
    with _connect(node) as sock:
        sock.sendall(associate_rq([_context()], max_pdu=max_pdu))
        pdu_type, body = _read_pdu(sock)
    assert pdu_type == ASSOCIATE_RJ and tuple(body[1:4]) == ASSOCIATE_RJ_NO_REASON
    assert _wait_for(lambda: _audit(node, "association.rejected", f"maximum PDU length {max_pdu} "))
    _still_storing(node)


def test_no_max_pdu_length_means_unlimited_and_is_accepted(node: NodeProcess) -> None:
    with _associate(node, max_pdu=0) as sock:  # PS3.8 D.1: 0, no limit
        sock.sendall(bytes.fromhex("050000000004") + b"\x00" * 4)  # A-RELEASE-RQ
        assert _read_pdu(sock)[0] == 0x06


def test_a_flood_of_empty_pdvs_is_aborted(node: NodeProcess) -> None:
    """Millions of empty PDVs once reached 1.27 GB; each now counts against the object
    size limit (16 MiB here: 64 + 4096 PDVs per message), and none is kept."""
    before = _rss_kib(node.process.pid)
    ds = ct_dataset(generate_uid(), generate_uid(), 0)
    with _associate(node) as sock:
        sock.sendall(p_data(pdv(1, 0x03, _c_store_command(ds))))
        empty = p_data(*[pdv(1, 0x00, b"")] * 2000)
        try:
            for _ in range(100):  # 200,000 empty PDVs at most
                sock.sendall(empty)
        except OSError:
            pass  # aborted and closed while we were still sending
        assert _ended_with_abort(sock)
    assert _wait_for(lambda: _audit(node, "association.aborted", "PDVs in one message"))
    assert (_rss_kib(node.process.pid) - before) / 1024 < 40
    _still_storing(node)


def test_a_command_set_without_end_is_aborted(node: NodeProcess) -> None:
    """Command fragments without a last one once grew without bound (+500 MB)."""
    fragment = pdv(1, 0x01, b"\x00" * 16 * 1024)
    with _associate(node) as sock:
        try:
            for _ in range(256):  # 4 MiB of command set
                sock.sendall(p_data(fragment))
        except OSError:
            pass
        assert _ended_with_abort(sock)
    assert _wait_for(lambda: _audit(node, "association.aborted", f"command set over {MAX_COMMAND_BYTES}"))
    _still_storing(node)
