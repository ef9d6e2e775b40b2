"""Read side of the audit trail: ``GET /api/audit``, the web page's audit view and
``triage-node audit``.

Kept apart from ``triage_node.worklist.queries``: the audit trail is filtered by time,
study, action and actor and exported as CSV/JSON, with nothing of the worklist's
ordering.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from triage_node.db.models import AuditEvent
from triage_node.timeutil import as_utc

__all__ = ["AUDIT_CSV_COLUMNS", "AuditFilter", "audit_rows", "audit_select", "list_audit"]


@dataclass(frozen=True)
class AuditFilter:
    """Filters of ``GET /api/audit`` and ``triage-node audit``."""

    since: datetime | None = None
    until: datetime | None = None
    study_uid: str | None = None
    action: str | None = None
    actor: str | None = None
    limit: int = 200
    offset: int = 0


def audit_select(flt: AuditFilter) -> Select[Any]:
    """Audit events matching ``flt``, oldest first. ``action`` ending in ``*`` is a prefix."""
    stmt = select(AuditEvent)
    if flt.since is not None:
        stmt = stmt.where(AuditEvent.at >= flt.since)
    if flt.until is not None:
        stmt = stmt.where(AuditEvent.at < flt.until)
    if flt.study_uid:
        stmt = stmt.where(AuditEvent.study_uid == flt.study_uid)
    if flt.action:
        if flt.action.endswith("*"):
            stmt = stmt.where(AuditEvent.action.startswith(flt.action[:-1], autoescape=True))
        else:
            stmt = stmt.where(AuditEvent.action == flt.action)
    if flt.actor:
        stmt = stmt.where(AuditEvent.actor == flt.actor)
    return stmt.order_by(AuditEvent.at, AuditEvent.id)


def list_audit(session: Session, flt: AuditFilter) -> tuple[list[AuditEvent], int]:
    """One page of audit events and the total count matching the filter."""
    stmt = audit_select(flt)
    total = session.scalar(select(func.count()).select_from(stmt.order_by(None).subquery())) or 0
    events = list(session.scalars(stmt.limit(flt.limit).offset(flt.offset)))
    return events, int(total)


AUDIT_CSV_COLUMNS = (
    "id", "at", "actor", "action", "outcome", "study_uid", "series_uid", "sop_uid", "job_id", "detail",
)


def audit_rows(events: list[AuditEvent]) -> list[dict[str, Any]]:
    """Audit events as plain dicts (CSV/JSON export), timestamps in ISO 8601 UTC."""
    return [
        {
            "id": e.id,
            "at": as_utc(e.at).isoformat(),
            "actor": e.actor,
            "action": e.action,
            "outcome": e.outcome,
            "study_uid": e.study_uid,
            "series_uid": e.series_uid,
            "sop_uid": e.sop_uid,
            "job_id": e.job_id,
            "detail": e.detail or {},
        }
        for e in events
    ]
