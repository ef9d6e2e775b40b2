"""Connections refused when accepted (over a cap): told, audited and closed in one thread.

A connection over ``max_associations`` or ``max_associations_per_source``
(`triage_node.ingest.admission.Admission.enter`) gets no thread and no PDU buffer.
It waits here, with the others, until its first bytes arrive (the A-ASSOCIATE-RQ
being sent) or `LINGER_S` passes. Then it is sent an A-ASSOCIATE-RJ (transient,
local limit exceeded; PS3.8 9.3.4) without the request being read, and closed once
the peer closes or the time is up. What it sends meanwhile is read into one shared
scratch buffer and dropped, so that closing does not reset the connection before
the peer has read the rejection.

(Sending the rejection at once, at accept, was the first design: pynetdicom as a
requestor then often saw the connection close before it finished sending its own
request, and reported an abort instead of the rejection.)
"""

from __future__ import annotations

import queue
import selectors
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from triage_node.ingest.admission import ASSOCIATE_RJ_LOCAL_LIMIT, audit_rejection
from triage_node.ingest.pdu_encoding import reject_pdu
from triage_node.logs import get_logger

__all__ = ["RefusedConnections"]

log = get_logger(__name__)


@dataclass
class _Refused:
    sock: socket.socket
    peer: str
    deadline: float
    told: bool = False


class RefusedConnections:
    """The refused connections of one listener, and the thread that ends them.

    Parameters
    ----------
    session_factory
        For the ``association.rejected`` audit rows.
    send_reject : bool
        False on a TLS listener, where a plain A-ASSOCIATE-RJ would mean nothing: the
        connection is only closed.
    """

    #: Longest a refused connection is kept.
    LINGER_S = 2.0
    #: Refused connections kept (and as many queued); past that one is closed at
    #: once, and only counted in the log.
    MAX_PENDING = 256

    def __init__(self, session_factory: Any, send_reject: bool = True) -> None:
        self.session_factory = session_factory
        self.send_reject = send_reject
        self._queue: queue.Queue[tuple[socket.socket, str, str]] = queue.Queue(self.MAX_PENDING)
        self._selector = selectors.DefaultSelector()
        self._scratch = bytearray(64 * 1024)
        self._dropped = 0
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dicom-refusals", daemon=True)
        self._thread.start()

    def refuse(self, sock: socket.socket, peer: str, why: str) -> None:
        """Hand over a connection just accepted (called in the accepting thread; never blocks)."""
        try:
            self._queue.put_nowait((sock, peer, why))
        except queue.Full:
            sock.close()
            with self._lock:
                self._dropped += 1

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=5)
        for key in list(self._selector.get_map().values()):
            self._end(key.data)
        while not self._queue.empty():
            self._queue.get_nowait()[0].close()
        self._selector.close()

    def _run(self) -> None:
        while not self._stopped.is_set():
            self._take_new()
            for key, _ in self._selector.select(timeout=0.05):
                self._readable(key.data)
            now = time.monotonic()
            for key in list(self._selector.get_map().values()):
                if key.data.deadline <= now:
                    self._tell(key.data)
                    self._end(key.data)
            with self._lock:
                dropped, self._dropped = self._dropped, 0
            if dropped:
                log.warning("refused connections closed without an audit row", count=dropped)

    def _take_new(self) -> None:
        while len(self._selector.get_map()) < self.MAX_PENDING:
            try:
                sock, peer, why = self._queue.get_nowait()
            except queue.Empty:
                return
            refused = _Refused(sock, peer, time.monotonic() + self.LINGER_S)
            try:
                sock.setblocking(False)
                self._selector.register(sock, selectors.EVENT_READ, refused)
            except (OSError, ValueError):
                sock.close()
            log.warning("association rejected", reason=why, peer=peer, when="accepted")
            result, source, diagnostic = ASSOCIATE_RJ_LOCAL_LIMIT
            audit_rejection(self.session_factory, "?", peer, why,
                            result=result, source=source, diagnostic=diagnostic)

    def _readable(self, refused: _Refused) -> None:
        self._tell(refused)  # the request has begun: the rejection answers it
        try:
            n = refused.sock.recv_into(self._scratch)
        except BlockingIOError:
            return
        except OSError:
            n = 0
        if n == 0:
            self._end(refused)  # the peer closed (it read the rejection, or gave up)

    def _tell(self, refused: _Refused) -> None:
        if refused.told:
            return
        refused.told = True
        try:
            if self.send_reject:
                refused.sock.send(reject_pdu(*ASSOCIATE_RJ_LOCAL_LIMIT))
            refused.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # gone already; _end closes it

    def _end(self, refused: _Refused) -> None:
        try:
            self._selector.unregister(refused.sock)
        except (KeyError, ValueError):
            pass
        refused.sock.close()
