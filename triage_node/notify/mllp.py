"""MLLP client: one HL7 message, one ACK, over TCP or TLS.

Framing is MLLP (HL7 v2 transport, appendix C): ``<VT> message <FS><CR>``, done by
python-hl7's asyncio streams (``hl7.mllp``). One connection per message: a RIS interface
engine expects nothing more, and a connection left open would outlive a worker's task.

`send` sorts the answer into three outcomes, which the outbox acts on:

- ``accepted``: ``MSA-1`` is ``AA`` (or ``CA``) for our MSH-10.
- ``refused``: ``AE``/``AR`` (or ``CE``/``CR``); the RIS read the message and said no, with
  the error text from MSA-3 or ERR. Sending the same message again will not change that.
- ``unreachable``: no connection, TLS failure, no ACK within ``hl7_timeout_s``, or a reply
  that is not an ACK to this message. The message may or may not have arrived; it is sent
  again with the same MSH-10, so a RIS can tell a repeat (at-least-once delivery).
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from hl7.mllp import InvalidBlockError, open_hl7_connection

from triage_node.config import Settings
from triage_node.notify.hl7 import Ack, HL7Error, parse_ack

ENCODING = "utf-8"  # MSH-18 "UNICODE UTF-8"
#: Largest ACK read; a reply beyond this is not an ACK.
MAX_REPLY_BYTES = 1 << 20


def tls_context(ca: Path | None, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """Client context: the RIS's certificate checked against ``ca`` (or the system's CAs)
    and its host name; the node's own certificate presented when given (mutual TLS)."""
    ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    return ctx


@dataclass(frozen=True)
class Endpoint:
    """Where and how to reach the RIS."""

    host: str
    port: int
    timeout_s: float = 10.0
    ssl_context: ssl.SSLContext | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Endpoint:
        if not settings.hl7_host:
            raise ValueError("hl7_host is not set")
        ctx = None
        if settings.hl7_tls:
            ctx = tls_context(settings.hl7_tls_ca, settings.tls_cert, settings.tls_key)
        return cls(settings.hl7_host, settings.hl7_port, settings.hl7_timeout_s, ctx)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}{' (TLS)' if self.ssl_context else ''}"


async def _exchange(endpoint: Endpoint, message: str) -> str:
    reader, writer = await open_hl7_connection(
        endpoint.host, endpoint.port, encoding=ENCODING, limit=MAX_REPLY_BYTES,
        ssl=endpoint.ssl_context, server_hostname=endpoint.host if endpoint.ssl_context else None,
    )
    try:
        writer.writeblock(message.encode(ENCODING))
        await writer.drain()
        block = await reader.readblock()
    finally:
        writer.close()
        try:  # a peer that never answers TLS close_notify must not hold us past the deadline
            await asyncio.wait_for(writer.wait_closed(), 1.0)
        except (OSError, TimeoutError, ssl.SSLError):
            pass
    return block.decode(ENCODING, errors="replace")


def exchange(endpoint: Endpoint, message: str) -> str:
    """Send one message and return the reply's text within ``endpoint.timeout_s`` in all.

    Raises `OSError` (refused connection, TLS failure, `TimeoutError`) or `HL7Error` (the
    peer closed, or sent something that is not an MLLP block). Runs its own event loop:
    call it from synchronous code (a Celery task, a thread of FastAPI's pool, the CLI).
    """

    async def bounded() -> str:
        return await asyncio.wait_for(_exchange(endpoint, message), endpoint.timeout_s)

    try:
        return asyncio.run(bounded())
    except asyncio.IncompleteReadError:
        raise HL7Error("connection closed before an ACK arrived") from None
    except (InvalidBlockError, ValueError) as exc:
        raise HL7Error(f"reply is not an MLLP block: {exc}") from None


Outcome = Literal["accepted", "refused", "unreachable"]


@dataclass(frozen=True)
class SendResult:
    """What became of one message."""

    outcome: Outcome
    ack: Ack | None
    detail: str

    @property
    def ack_code(self) -> str | None:
        return self.ack.code if self.ack else None


def send(endpoint: Endpoint, message: str, control_id: str) -> SendResult:
    """Send ``message`` (whose MSH-10 is ``control_id``) and sort the answer (module doc)."""
    try:
        reply = exchange(endpoint, message)
    except TimeoutError:
        return SendResult("unreachable", None, f"no ACK within {endpoint.timeout_s:g} s")
    except (OSError, HL7Error) as exc:
        return SendResult("unreachable", None, f"{type(exc).__name__}: {exc}"[:500])
    try:
        ack = parse_ack(reply, control_id)
    except HL7Error as exc:
        return SendResult("unreachable", None, f"not an ACK to this message: {exc}"[:500])
    if ack.accepted:
        return SendResult("accepted", ack, ack.code)
    return SendResult("refused", ack, f"{ack.code}: {ack.text}" if ack.text else ack.code)
