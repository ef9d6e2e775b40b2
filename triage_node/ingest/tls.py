"""DICOM TLS for the listener (PS3.15 Annex B.1, The Basic TLS Secure Transport Connection Profile)."""

from __future__ import annotations

import ssl

from triage_node.config import Settings

__all__ = ["server_ssl_context"]


def server_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """Build the server-side TLS context from ``tls_cert``/``tls_key``/``tls_ca``.

    Returns None when TLS is not configured. With ``tls_ca`` set, a client
    certificate signed by that CA is required (``CERT_REQUIRED``); TLS 1.2 is the
    minimum (PS3.15 B.9, BCP 195).
    """
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile=str(settings.tls_cert), keyfile=str(settings.tls_key))
    if settings.tls_ca is not None:
        context.load_verify_locations(cafile=str(settings.tls_ca))
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.verify_mode = ssl.CERT_NONE
    return context
