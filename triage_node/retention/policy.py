"""What may be kept how long, and how full the disk is.

The policy comes from the ``retention_*`` settings; disk use is measured either against
the file system that holds the spool or, when ``retention_disk_quota_mb`` is set,
against that quota (the bytes of received images recorded in ``instances``).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from triage_node.config import Settings
from triage_node.db.models import Instance

MIB = 2**20


@dataclass(frozen=True)
class Policy:
    """Ages in days (0: never by age) and disk watermarks in percent."""

    instances_days: int
    results_days: int
    outbox_days: int
    undelivered_days: int
    audit_days: int
    disk_high_percent: float
    disk_low_percent: float
    quota_bytes: int
    batch_studies: int

    def __post_init__(self) -> None:
        if not 0 < self.disk_low_percent < self.disk_high_percent <= 100:
            raise ValueError("disk_low_percent must be above 0 and below disk_high_percent (at most 100)")
        if self.audit_days and (self.instances_days == 0 or self.audit_days < self.instances_days):
            raise ValueError("audit_days must be 0 (forever) or at least instances_days")

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        return cls(
            instances_days=settings.retention_instances_days,
            results_days=settings.retention_results_days,
            outbox_days=settings.retention_outbox_days,
            undelivered_days=settings.retention_undelivered_days,
            audit_days=settings.retention_audit_days,
            disk_high_percent=settings.retention_disk_high_percent,
            disk_low_percent=settings.retention_disk_low_percent,
            quota_bytes=settings.retention_disk_quota_mb * MIB,
            batch_studies=settings.retention_batch_studies,
        )

    @staticmethod
    def cutoff(now: datetime, days: int) -> datetime | None:
        """``now`` less ``days``; None when ``days`` is 0 (never by age)."""
        return now - timedelta(days=days) if days else None


@dataclass(frozen=True)
class DiskUse:
    """Bytes used of bytes available, on the spool's file system or within the quota."""

    used_bytes: int
    total_bytes: int
    basis: str  # "quota" | "filesystem"

    @property
    def percent(self) -> float:
        return 100.0 * self.used_bytes / self.total_bytes if self.total_bytes else 0.0

    def bytes_above(self, percent: float) -> int:
        """How many bytes must go for use to fall to ``percent``."""
        return max(0, self.used_bytes - int(self.total_bytes * percent / 100.0))

    def as_dict(self) -> dict[str, object]:
        return {"basis": self.basis, "used_bytes": self.used_bytes, "total_bytes": self.total_bytes,
                "percent": round(self.percent, 2)}


def spool_bytes(session: Session) -> int:
    """Bytes of every stored instance (what the quota counts)."""
    return int(session.scalar(select(func.coalesce(func.sum(Instance.size_bytes), 0))) or 0)


def existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def disk_use(settings: Settings, session: Session) -> DiskUse:
    """Disk use that the watermarks are compared with."""
    quota = settings.retention_disk_quota_mb * MIB
    if quota:
        return DiskUse(spool_bytes(session), quota, "quota")
    usage = shutil.disk_usage(existing_parent(settings.spool_dir))
    return DiskUse(usage.used, usage.total, "filesystem")
