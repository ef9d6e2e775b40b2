"""When the node stops accepting images: free disk on the spool, and the retention quota.

Below ``min_free_disk_mb`` free on the spool, or with the stored images filling
``retention_disk_quota_mb`` (when set), every new object is refused with Out of Resources
(0xA700 / HTTP 503) before anything is written, and the listener refuses new associations
(`triage_node.ingest.admission`). Retention (`triage_node.retention`) frees space again.
"""

from __future__ import annotations

import time

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from triage_node.config import Settings
from triage_node.ingest.instance_rows import stored_bytes
from triage_node.ingest.spool import Spool

__all__ = ["QUOTA_REFRESH_S", "DiskWatermark"]

#: Seconds the stored-bytes figure of the quota watermark is reused.
QUOTA_REFRESH_S = 1.0


class DiskWatermark:
    """The spool's free-space watermark and the stored-images quota, checked per association and per object."""

    def __init__(self, spool: Spool, session_factory: sessionmaker[Session]) -> None:
        self.spool = spool
        self.session_factory = session_factory
        self._quota_used, self._quota_checked_at = 0, -QUOTA_REFRESH_S

    def below(self, settings: Settings) -> bool:
        """True when the spool's free space is below ``settings.min_free_disk_mb``, or the
        stored images fill ``retention_disk_quota_mb`` (when set). The store passes its
        settings at each check, so a changed limit applies at once."""
        if self.spool.free_mb() < settings.min_free_disk_mb:
            return True
        return bool(settings.retention_disk_quota_mb) and self._quota_full(settings.retention_disk_quota_mb)

    def reason(self, settings: Settings) -> str:
        if self.spool.free_mb() < settings.min_free_disk_mb:
            return f"free disk below {settings.min_free_disk_mb} MiB on the spool"
        return f"stored images fill retention_disk_quota_mb ({settings.retention_disk_quota_mb} MiB)"

    def _quota_full(self, quota_mb: int) -> bool:
        # The sum over instances is read at most every QUOTA_REFRESH_S: the watermark is
        # checked per association and per object, and the listener, STOW-RS and
        # retention change the figure from different processes.
        now = time.monotonic()
        if now - self._quota_checked_at >= QUOTA_REFRESH_S:
            try:
                with self.session_factory() as session:
                    used = stored_bytes(session)
            except SQLAlchemyError:
                return False  # the database being away is answered when the row is written
            self._quota_used, self._quota_checked_at = int(used or 0), now
        return self._quota_used >= quota_mb * 2**20
