"""Audit rows of refused objects, kept in memory while the database is away.

A refusal is answered at once whatever the database does (the sender must not wait
on it), but its ``instance.rejected`` audit row needs the database: when that write
fails the row waits here, marked ``deferred`` with the time of the refusal, and is
written, oldest first, by the next object the store finishes once the database is back.
Kept apart from ``triage_node.ingest.store`` because it has its own locking: one lock
for the rows, and one so that only one thread writes them at a time.
"""

from __future__ import annotations

import threading
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from triage_node.db import audit
from triage_node.db.session import transaction
from triage_node.logs import get_logger
from triage_node.timeutil import utcnow

__all__ = ["DEFERRED_AUDIT_LIMIT", "DeferredAudit"]

log = get_logger(__name__)

#: Refusals kept in memory while the database is away (then written, oldest first).
DEFERRED_AUDIT_LIMIT = 10_000


class DeferredAudit:
    """Refusal audit rows waiting for the database (at most `DEFERRED_AUDIT_LIMIT`)."""

    def __init__(self) -> None:
        self._rows: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self._rows)

    def defer(self, row: dict[str, Any]) -> None:
        """Keep ``row`` (keyword arguments of `triage_node.db.audit.record`) for later."""
        with self._lock:
            if len(self._rows) < DEFERRED_AUDIT_LIMIT:
                self._rows.append(
                    {**row, "deferred": True, "refused_at": utcnow().isoformat()}
                )

    def flush(self, session_factory: sessionmaker[Session]) -> None:
        """Write the refusals that could not be audited while the database was away."""
        if not self._flush_lock.acquire(blocking=False):
            return  # another thread is writing them
        try:
            with self._lock:
                rows = list(self._rows)
            if not rows:
                return
            try:
                with transaction(session_factory) as session:
                    for row in rows:
                        audit.record(session, **row)
            except SQLAlchemyError:
                return
            with self._lock:
                del self._rows[: len(rows)]
            log.info("deferred audit rows written", rows=len(rows))
        finally:
            self._flush_lock.release()
