"""The storage SCP: the node's DICOM listener, configured from Settings (PS3.4 Annex A and B).

Accepts C-ECHO, and C-STORE for every storage SOP class pynetdicom knows (or only
CT Image Storage and Enhanced CT Image Storage when
``settings.unknown_storage_class`` is ``reject``), in the uncompressed, deflated,
JPEG Lossless, JPEG 2000 and RLE transfer syntaxes. Objects are stored as received;
pixel data is never decoded on this side. Each connection runs in its own thread
(`triage_node.ingest.association`); pynetdicom encodes and negotiates, the data phase
is ours (why: `triage_node.ingest.upper_layer`).
"""

from __future__ import annotations

import socketserver
import threading
from collections.abc import Callable
from typing import Any

from pynetdicom import AllStoragePresentationContexts, build_context
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import CTImageStorage, EnhancedCTImageStorage, Verification  # type: ignore[attr-defined]  # pynetdicom defines these through globals()

from triage_node.config import Settings
from triage_node.ingest.access import AccessPolicy
from triage_node.ingest.admission import Admission
from triage_node.ingest.association import Listener
from triage_node.ingest.refusals import RefusedConnections
from triage_node.ingest.store import InstanceStore
from triage_node.ingest.tls import server_ssl_context
from triage_node.ingest.transfer_syntaxes import ACCEPTED_TRANSFER_SYNTAXES, COMPRESSED_TRANSFER_SYNTAXES
from triage_node.logs import get_logger
from triage_node.setting_types import UnknownStorageClassPolicy

__all__ = ["TRIAGED_SOP_CLASSES", "StorageSCP", "storage_contexts"]

log = get_logger(__name__)

#: Storage classes that are triaged (the others are stored, or refused by setting).
TRIAGED_SOP_CLASSES = (str(CTImageStorage), str(EnhancedCTImageStorage))

#: Largest P-DATA PDU the SCP accepts. Large PDUs mean fewer PDUs per 512x512 slice
#: (storescu sends up to what the acceptor allows); measured in docs/BENCHMARKS.md.
MAX_PDU_SIZE = 1_048_576


def storage_contexts(policy: UnknownStorageClassPolicy) -> list[PresentationContext]:
    """Supported presentation contexts: Verification plus the storage classes."""
    if policy is UnknownStorageClassPolicy.reject:
        abstract = list(TRIAGED_SOP_CLASSES)
    else:
        abstract = [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]
    contexts = [build_context(Verification)]
    contexts.extend(build_context(uid, list(ACCEPTED_TRANSFER_SYNTAXES)) for uid in abstract)
    return contexts


class _Server(socketserver.ThreadingTCPServer):
    """One thread per connection, and only for those under the caps.

    ``verify_request`` runs in the accepting thread, before a thread or a buffer
    exists for the connection: over a cap, it is handed to `RefusedConnections`.
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], handler: type, admission: Admission,
                 refusals: RefusedConnections) -> None:
        super().__init__(address, handler)
        self.admission = admission
        self.refusals = refusals

    def verify_request(self, request: Any, client_address: Any) -> bool:
        peer = str(client_address[0])
        why = self.admission.enter(peer)
        if why is None:
            return True
        self.refusals.refuse(request, peer, why)
        return False

    def shutdown_request(self, request: Any) -> None:
        pass  # each connection is closed by its association or by the refusals

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread: the slot and the socket are given back here
            self.admission.leave(str(client_address[0]))
            request.close()
            raise


class StorageSCP:
    """The node's DICOM listener.

    Parameters
    ----------
    settings : Settings
        ``ae_title``, ``dicom_host``, ``dicom_port``, ``allowed_callers``, the caps
        (``max_associations``, ``max_associations_per_source``, ``max_object_mb``), the
        deadlines (``association_request_timeout_s``, ``pdu_timeout_s``),
        ``unknown_storage_class`` and the TLS files are used.
    store : InstanceStore
        Where received objects go.
    association_finished : callable, optional
        Called with the list of SeriesInstanceUIDs stored on an association when it
        is released or aborted, or its connection is lost
        (``CompletenessTracker.association_finished``).
    nodelay : bool
        Set TCP_NODELAY on accepted sockets (on by default; off only to measure it).
    """

    def __init__(
        self,
        settings: Settings,
        store: InstanceStore,
        association_finished: Callable[[list[str]], object] | None = None,
        nodelay: bool = True,
    ) -> None:
        self.settings = settings
        self.store = store
        self.admission = Admission(
            AccessPolicy(settings.allowed_callers), settings.ae_title, store, settings.max_associations,
            settings.max_associations_per_source,
        )
        self.listener = Listener(
            store=store,
            admission=self.admission,
            contexts=storage_contexts(settings.unknown_storage_class),
            max_pdu=MAX_PDU_SIZE,
            max_object_bytes=settings.max_object_mb * 2**20,
            nodelay=nodelay,
            request_timeout_s=settings.association_request_timeout_s,
            pdu_timeout_s=settings.pdu_timeout_s,
            association_finished=association_finished,
        )
        self.server: _Server | None = None
        self.refusals: RefusedConnections | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (useful when the settings asked for port 0)."""
        if self.server is None:
            raise RuntimeError("the SCP is not running")
        return int(self.server.server_address[1])

    def start(self) -> StorageSCP:
        """Bind and serve in background threads (one per association)."""
        self.listener.ssl_context = server_ssl_context(self.settings)
        listener = self.listener

        class _Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                listener.serve(self.request, str(self.client_address[0]))

        self.refusals = RefusedConnections(
            self.store.session_factory, send_reject=listener.ssl_context is None
        )
        self.server = _Server(
            (self.settings.dicom_host, self.settings.dicom_port), _Handler, self.admission, self.refusals
        )
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="dicom-listener", daemon=True
        )
        self._thread.start()
        tls = listener.ssl_context is not None
        log.info(
            "transfer syntaxes",
            accepted=[t.name for t in ACCEPTED_TRANSFER_SYNTAXES],
            no_decoder=[
                t.name for t in COMPRESSED_TRANSFER_SYNTAXES if t not in ACCEPTED_TRANSFER_SYNTAXES
            ],
        )
        log.info(
            "DICOM listener started",
            ae_title=self.settings.ae_title,
            host=self.settings.dicom_host,
            port=self.port,
            tls=tls,
            client_certificates=tls and self.settings.tls_ca is not None,
        )
        return self

    def stop(self) -> None:
        """Stop accepting, close the listening socket and disconnect open associations."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        if self.refusals is not None:
            self.refusals.stop()
            self.refusals = None
        self.listener.disconnect_all()
        # An object being stored when its connection went is finished (stored, or
        # not at all) before the caller closes the database.
        if not self.listener.wait_idle(timeout=10.0):
            log.warning("associations still open after stop")
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> StorageSCP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
