"""Audit events: the one write path into the append-only ``audit_events`` table."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from triage_node.db.models import AuditEvent


def record(
    session: Session,
    action: str,
    *,
    actor: str,
    outcome: str = "ok",
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    job_id: int | None = None,
    **detail: Any,
) -> AuditEvent:
    """Add an audit event to the session's transaction.

    ``actor`` names who acted: ``ae:<calling AE>@<ip>``, ``token:<name>``, ``worker``,
    ``node``. ``detail`` must never hold patient identifiers.
    """
    event = AuditEvent(
        action=action,
        actor=actor,
        outcome=outcome,
        study_uid=study_uid,
        series_uid=series_uid,
        sop_uid=sop_uid,
        job_id=job_id,
        detail=detail,
    )
    session.add(event)
    return event
