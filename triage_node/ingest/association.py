"""One storage association, in the thread that accepted its connection (PS3.8 9.1).

The connection was counted against the caps when it was accepted
(`triage_node.ingest.admission.Admission.enter`); its slot is given back when it ends.
Deadlines are overall, not per read: the TLS handshake and the whole A-ASSOCIATE-RQ
within ``request_timeout_s`` of the accept, each later PDU within ``pdu_timeout_s`` of
its first byte; a peer that trickles bytes is aborted when they pass.

Admission (A-ASSOCIATE-RJ with its reason and an audit row), then the data phase:
each C-STORE data set goes to the store fragment by fragment as it arrives
(``InstanceStore.begin``), is finished once complete (``InstanceStore.finish``), and
its status goes back as the C-STORE-RSP before the next PDU is read; C-ECHO is
answered; A-RELEASE-RQ gets A-RELEASE-RP; anything unexpected gets an A-ABORT.
However the association ends, the series it stored are reported once (the
completeness fast path).
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
from pydicom.dataset import Dataset
from pynetdicom.presentation import PresentationContext

from triage_node.ingest import pdu_encoding as pdus
from triage_node.ingest import upper_layer as ul
from triage_node.ingest.admission import Admission, audit_association
from triage_node.ingest.header import CANNOT_UNDERSTAND, SUCCESS
from triage_node.ingest.incoming import IncomingObject
from triage_node.ingest.store import InstanceStore
from triage_node.logs import get_logger

__all__ = [
    "ASSOCIATION_REQUEST_TIMEOUT_S", "IDLE_TIMEOUT_S", "PDU_TIMEOUT_S", "Listener", "StorageAssociation",
]

log = get_logger(__name__)

#: ARTIM: how long a new connection may take to send its A-ASSOCIATE-RQ (PS3.8 9.1.5);
#: ``settings.association_request_timeout_s``.
ASSOCIATION_REQUEST_TIMEOUT_S = 30.0
#: How long one PDU may take from its header to its last byte; ``settings.pdu_timeout_s``.
PDU_TIMEOUT_S = 30.0
#: An established association silent for this long is aborted.
IDLE_TIMEOUT_S = 60.0


def _unsupported(command_field: int) -> ul.Abort:
    """The A-ABORT for a DIMSE command other than C-STORE and C-ECHO."""
    return ul.Abort(ul.ABORT_INVALID_PARAMETER, f"DIMSE command 0x{command_field:04X} is not supported")


@dataclass
class Listener:
    """What every association of one listener shares."""

    store: InstanceStore
    admission: Admission
    contexts: list[PresentationContext]
    max_pdu: int
    max_object_bytes: int
    ssl_context: ssl.SSLContext | None = None
    nodelay: bool = True
    request_timeout_s: float = ASSOCIATION_REQUEST_TIMEOUT_S
    pdu_timeout_s: float = PDU_TIMEOUT_S
    association_finished: Callable[[list[str]], object] | None = None
    _open: set[StorageAssociation] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def serve(self, sock: socket.socket, peer: str) -> None:
        """Run one association to its end (called in the connection's own thread)."""
        association = StorageAssociation(sock, peer, self)
        with self._lock:
            self._open.add(association)
        try:
            association.run()
        finally:
            with self._lock:
                self._open.discard(association)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no association is open (True), or ``timeout`` seconds (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._open:
                    return True
            time.sleep(0.02)
        return False

    def disconnect_all(self) -> None:
        """Shut down every open connection (at stop): each ends as a lost connection.

        An object whose response had not gone out is stored or not, never half: the
        sender sends it again, and a duplicate is idempotent.
        """
        with self._lock:
            open_now = list(self._open)
        for association in open_now:
            association.disconnect()


@dataclass(eq=False)
class StorageAssociation:
    """A connection from accept to close.

    ``run`` never raises: every way an association can end is logged, and the
    connection is closed.
    """

    sock: socket.socket
    peer: str
    listener: Listener
    calling_ae: str = "?"
    series: set[str] = field(default_factory=set)

    def run(self) -> None:
        with structlog.contextvars.bound_contextvars(peer=self.peer):
            ending = "closed"
            try:
                ending = self._run()
            except ul.Abort as abort:
                log.warning("association aborted by the node", reason=str(abort))
                # Audited before the peer hears of it, as a rejection is.
                self._audit_abort(str(abort))
                self._send(pdus.abort_pdu(abort.reason))
                ending = "aborted by the node"
            except ul.PeerClosed as closed:
                ending = f"connection lost ({closed})"
            except Exception:  # noqa: BLE001 - one association never takes the listener down
                log.exception("association failed")
                self._send(pdus.abort_pdu(0x00))
                ending = "failed"
            finally:
                self._close()
                self.listener.admission.leave(self.peer)
                self._report(ending)

    def _run(self) -> str:
        limit = self.listener.request_timeout_s
        deadline = time.monotonic() + limit
        if self.listener.nodelay:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.listener.ssl_context is not None:
            # CPython's handshake takes the socket timeout as its overall deadline.
            self.sock.settimeout(limit)
            try:
                self.sock = self.listener.ssl_context.wrap_socket(self.sock, server_side=True)
            except TimeoutError:
                why = f"TLS handshake not complete within {limit:g} s"
                log.warning("association aborted by the node", reason=why)
                self._audit_abort(why)
                return "TLS handshake timed out"
            except (OSError, ValueError) as exc:
                log.warning("TLS handshake failed", error=str(exc))
                return "TLS handshake failed"
        try:
            pdu_type, body, header = ul.read_pdu(self.sock, ul.ASSOCIATE_RQ_READ_CAP, deadline=deadline)
        except (ul.PeerSilent, ul.PeerTooSlow):
            raise ul.PeerTooSlow(f"A-ASSOCIATE-RQ not complete within {limit:g} s") from None
        if pdu_type != ul.ASSOCIATE_RQ:
            raise ul.Abort(ul.ABORT_UNEXPECTED_PDU, f"PDU type 0x{pdu_type:02X} before A-ASSOCIATE-RQ")
        negotiated = ul.negotiate(header + bytes(body), self.listener.contexts)
        del body
        self.calling_ae = negotiated.calling_ae
        with structlog.contextvars.bound_contextvars(calling_ae=self.calling_ae):
            reject = self.listener.admission.check(
                negotiated.calling_ae, negotiated.called_ae, self.peer, negotiated.peer_max_pdu
            )
            if reject is not None:
                self._send(pdus.reject_pdu(*reject))
                return "rejected"
            self._sendall(pdus.accept_pdu(negotiated, self.listener.max_pdu))
            log.debug("association accepted", contexts=len(negotiated.contexts))
            return self._data_phase(negotiated)

    def _data_phase(self, negotiated: ul.Negotiated) -> str:
        assembler = ul.MessageAssembler(
            negotiated.contexts, self.listener.max_object_bytes,
            open_dataset=lambda context_id, command: self._open_dataset(negotiated, context_id, command),
        )
        try:
            while True:
                try:
                    pdu_type, body, _ = ul.read_pdu(
                        self.sock, deadline=time.monotonic() + IDLE_TIMEOUT_S,
                        pdu_seconds=self.listener.pdu_timeout_s, prealloc=self.listener.max_pdu,
                    )
                except ul.PeerSilent:
                    raise ul.Abort(ul.ABORT_REASON_NOT_SPECIFIED, f"no PDU for {IDLE_TIMEOUT_S:g} s") from None
                if pdu_type == ul.P_DATA:
                    for message in assembler.feed(body):
                        status = self._serve(message, negotiated)
                        self._sendall(pdus.response_pdus(message, status, negotiated.peer_max_pdu))
                    del body  # the fragments the sink kept hold it, not this loop
                elif pdu_type == ul.RELEASE_RQ:
                    self._sendall(pdus.release_rp_pdu())
                    return "released"
                elif pdu_type == ul.ABORT:
                    return "aborted by the peer"
                else:
                    raise ul.Abort(ul.ABORT_UNEXPECTED_PDU, f"unexpected PDU type 0x{pdu_type:02X}")
        finally:
            assembler.close()  # an object cut short leaves no temporary file

    def _open_dataset(
        self, negotiated: ul.Negotiated, context_id: int, command: Dataset
    ) -> IncomingObject:
        """The store's object for a C-STORE data set: written to the spool as it arrives."""
        field_ = int(command.get("CommandField", 0))
        if field_ != ul.C_STORE_RQ_FIELD:
            raise _unsupported(field_)
        prefix = pdus.part10_prefix(
            str(command.get("AffectedSOPClassUID", "") or ""),
            str(command.get("AffectedSOPInstanceUID", "") or ""),
            str(negotiated.contexts[context_id].transfer_syntax[0]),
        )
        incoming = self.listener.store.begin(hash_from=len(prefix))
        incoming.write(prefix)
        return incoming

    def _serve(self, message: ul.Message, negotiated: ul.Negotiated) -> int:
        field_ = int(message.command.get("CommandField", 0))
        if field_ == ul.C_ECHO_RQ_FIELD:
            log.debug("C-ECHO")
            return SUCCESS
        if field_ != ul.C_STORE_RQ_FIELD:
            raise _unsupported(field_)
        if message.dataset is None:
            raise ul.Abort(ul.ABORT_INVALID_PARAMETER, "C-STORE-RQ without a data set")
        context = negotiated.contexts[message.context_id]
        sop_instance = str(message.command.get("AffectedSOPInstanceUID", "") or "")
        try:
            outcome = self.listener.store.finish(
                message.dataset,
                calling_ae=self.calling_ae,
                peer=self.peer,
                source="dimse",
                expected_sop_class=str(context.abstract_syntax),
                expected_sop_instance=sop_instance or None,
            )
        except Exception:  # noqa: BLE001 - a failure status, and the association goes on
            log.exception("C-STORE failed unexpectedly")
            return CANNOT_UNDERSTAND
        if outcome.stored and outcome.series_uid:
            self.series.add(outcome.series_uid)
        return outcome.status

    def _audit_abort(self, why: str) -> None:
        """Audit row ``association.aborted`` (objects acknowledged before it stay stored)."""
        audit_association(
            self.listener.store.session_factory, "association.aborted", self.calling_ae,
            self.peer, why[:200], stored_series=len(self.series),
        )

    def _sendall(self, data: bytes) -> None:
        """Send within ``pdu_timeout_s`` overall (a peer that stops reading is cut too)."""
        self.sock.settimeout(self.listener.pdu_timeout_s)
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise ul.PeerClosed(str(exc) or type(exc).__name__) from None

    def _send(self, data: bytes) -> None:
        try:
            self._sendall(data)
        except ul.PeerClosed:
            pass  # the peer is gone; nothing left to tell it

    def disconnect(self) -> None:
        """Shut the connection down in both directions (a blocked read returns at once)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _close(self) -> None:
        self.disconnect()
        self.sock.close()

    def _report(self, ending: str) -> None:
        """Tell completeness which series arrived, however the association ended."""
        callback = self.listener.association_finished
        if not self.series:
            log.debug("association ended", ending=ending, calling_ae=self.calling_ae, peer=self.peer)
            return
        log.info("association finished", ending=ending, series=len(self.series),
                 calling_ae=self.calling_ae, peer=self.peer)
        if callback is None:
            return
        try:
            callback(sorted(self.series))
        except Exception:  # noqa: BLE001 - the objects are stored; only log
            log.exception("association_finished failed")
