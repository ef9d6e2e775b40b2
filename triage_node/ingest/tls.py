"""DICOM TLS for the listener (PS3.15 Annex B.1, The Basic TLS Secure Transport Connection Profile)."""

from __future__ import annotations

import socket
import ssl
from typing import Any

from triage_node.config import Settings

__all__ = ["HANDSHAKE_TIMEOUT_S", "server_ssl_context"]

#: pynetdicom performs the server-side TLS handshake in its accept loop; a peer that
#: connects and never speaks would hold that loop, so the handshake gets a deadline.
HANDSHAKE_TIMEOUT_S = 10.0


class _ServerContext(ssl.SSLContext):
    """An SSLContext whose server-side handshakes time out instead of blocking the accept loop."""

    handshake_timeout: float = HANDSHAKE_TIMEOUT_S

    def wrap_socket(self, sock: socket.socket, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        previous = sock.gettimeout()
        sock.settimeout(self.handshake_timeout)
        try:
            wrapped = super().wrap_socket(sock, *args, **kwargs)
        except (OSError, ValueError):
            sock.close()
            raise
        wrapped.settimeout(previous)
        return wrapped


def server_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """Build the server-side TLS context from ``tls_cert``/``tls_key``/``tls_ca``.

    Returns None when TLS is not configured. With ``tls_ca`` set, a client
    certificate signed by that CA is required (``CERT_REQUIRED``); TLS 1.2 is the
    minimum (PS3.15 B.9, BCP 195).
    """
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = _ServerContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION
    context.load_cert_chain(certfile=str(settings.tls_cert), keyfile=str(settings.tls_key))
    if settings.tls_ca is not None:
        context.load_verify_locations(cafile=str(settings.tls_ca))
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.verify_mode = ssl.CERT_NONE
    return context
