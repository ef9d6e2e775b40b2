"""The outbox's retry policy and the tally of one delivery pass.

`DeliveryPolicy` holds what decides when a row is tried again and when it is given up
(from Settings), and the node's own AE title and TLS identity; `DeliveryReport` counts
what one ``deliver_due`` call did. Kept apart from ``worker.pipeline.delivery``, which
claims, sends and records rows: these are plain values, built and checked without a
database or a peer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from triage_node.config import Settings

__all__ = ["DeliveryPolicy", "DeliveryReport"]


@dataclass(frozen=True)
class DeliveryPolicy:
    """Retry policy (from Settings) and the node's own AE title and TLS identity."""

    max_attempts: int = 8
    refused_max_attempts: int = 2
    backoff_base_s: float = 5.0
    backoff_cap_s: float = 600.0
    batch_size: int = 64
    calling_ae: str = "TRIAGE_NODE"
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> DeliveryPolicy:
        return cls(
            max_attempts=settings.delivery_max_attempts,
            refused_max_attempts=settings.delivery_refused_max_attempts,
            backoff_base_s=settings.delivery_backoff_base_s,
            backoff_cap_s=settings.delivery_backoff_cap_s,
            batch_size=settings.delivery_batch_size,
            calling_ae=settings.ae_title,
            tls_cert=settings.tls_cert,
            tls_key=settings.tls_key,
        )

    def backoff(self, attempts: int) -> timedelta:
        """Delay before the next try after ``attempts`` failed tries (exponential, capped)."""
        seconds = self.backoff_base_s * (2 ** max(0, attempts - 1))
        return timedelta(seconds=min(self.backoff_cap_s, seconds))


@dataclass
class DeliveryReport:
    """What one ``deliver_due`` call did, in numbers of outbox rows."""

    sent: int = 0
    retrying: int = 0
    refused: int = 0
    dead: int = 0
    unknown_destination: int = 0
    by_destination: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def attempted(self) -> int:
        return self.sent + self.retrying + self.refused + self.dead

    def as_dict(self) -> dict[str, object]:
        return {
            "sent": self.sent,
            "retrying": self.retrying,
            "refused": self.refused,
            "dead": self.dead,
            "unknown_destination": self.unknown_destination,
            "by_destination": self.by_destination,
        }
