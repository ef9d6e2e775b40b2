"""Webhooks: a signed JSON POST on positive findings and on failures.

Each request carries

``X-Triage-Event``
    the event name (``ich.positive``, ``job.failed``);
``X-Triage-Timestamp``
    seconds since the epoch when the request was signed;
``X-Triage-Signature``
    ``sha256=<hex>``, the HMAC-SHA256 of ``<timestamp>.<raw body>`` keyed with
    ``settings.secret_key`` (the timestamp is signed so a receiver can refuse replays).

Receivers check with `verify_signature`. Connection errors, timeouts, 429 and 5xx are
retried with exponential backoff (``settings.webhook_attempts`` tries); other 4xx are
final. Payloads never carry patient names, IDs or accession numbers, only UIDs.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from triage_node.config import Settings
from triage_node.logs import get_logger

log = get_logger(__name__)

SIGNATURE_HEADER = "X-Triage-Signature"
TIMESTAMP_HEADER = "X-Triage-Timestamp"
EVENT_HEADER = "X-Triage-Event"
#: Seconds between tries: base * 2**n, capped.
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0
REQUEST_TIMEOUT_S = 10.0


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>`` HMAC-SHA256 of ``timestamp + "." + body``."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify_signature(
    secret: str, timestamp: str, body: bytes, signature: str, *, max_age_s: float | None = 300.0
) -> bool:
    """True when ``signature`` matches and the timestamp is at most ``max_age_s`` old."""
    if max_age_s is not None:
        try:
            if abs(time.time() - float(timestamp)) > max_age_s:
                return False
        except ValueError:
            return False
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


@dataclass(frozen=True)
class WebhookOutcome:
    """What happened to one event at one URL."""

    url: str
    delivered: bool
    attempts: int
    status_code: int | None
    error: str | None


def _retryable(status: int) -> bool:
    return status == 429 or status >= 500


def post_event(
    url: str,
    event: str,
    payload: Mapping[str, Any],
    secret: str,
    *,
    attempts: int = 4,
    timeout: float = REQUEST_TIMEOUT_S,
    sleep: Callable[[float], None] = time.sleep,
    client: httpx.Client | None = None,
) -> WebhookOutcome:
    """POST one signed event to ``url``, retrying transient failures.

    Parameters
    ----------
    url : str
        Receiver URL.
    event : str
        Event name, also in the body as ``event``.
    payload : mapping
        JSON-serialisable body fields (no patient identifiers).
    secret : str
        HMAC key (``settings.secret_key``).
    attempts : int
        Tries in all, at least 1.
    """
    body = json.dumps({"event": event, **payload}, sort_keys=True, default=str).encode()
    own_client = client is None
    client = client or httpx.Client(timeout=timeout)
    status: int | None = None
    error: str | None = None
    try:
        for attempt in range(1, max(1, attempts) + 1):
            timestamp = str(int(time.time()))
            headers = {
                "Content-Type": "application/json",
                EVENT_HEADER: event,
                TIMESTAMP_HEADER: timestamp,
                SIGNATURE_HEADER: sign(secret, timestamp, body),
            }
            try:
                response = client.post(url, content=body, headers=headers)
                status, error = response.status_code, None
                if response.is_success:
                    log.info("webhook.delivered", url=url, event_name=event, attempt=attempt)
                    return WebhookOutcome(url, True, attempt, status, None)
                error = f"HTTP {status}"
                if not _retryable(status):
                    break
            except httpx.HTTPError as exc:
                status, error = None, f"{type(exc).__name__}: {exc}"
            log.warning("webhook.retry", url=url, event_name=event, attempt=attempt, error=error)
            if attempt < attempts:
                sleep(min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (attempt - 1)))
        log.error("webhook.failed", url=url, event_name=event, error=error)
        return WebhookOutcome(url, False, attempt, status, error)
    finally:
        if own_client:
            client.close()


def send_event(
    settings: Settings,
    event: str,
    payload: Mapping[str, Any],
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> list[WebhookOutcome]:
    """Send one event to every URL in ``settings.webhook_urls``."""
    if not settings.webhook_urls:
        return []
    secret = settings.require_secret()
    return [
        post_event(url, event, payload, secret, attempts=settings.webhook_attempts, sleep=sleep)
        for url in settings.webhook_urls
    ]
