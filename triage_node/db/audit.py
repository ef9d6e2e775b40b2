"""Audit events: the one write path into the append-only ``audit_events`` table."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from triage_node.db.models import AuditEvent, utcnow

_INSERT = AuditEvent.__table__.insert()


def _row(
    action: str,
    *,
    actor: str,
    outcome: str = "ok",
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    job_id: int | None = None,
    **detail: Any,
) -> dict[str, Any]:
    return {
        "at": utcnow(),
        "action": action,
        "actor": actor,
        "outcome": outcome,
        "study_uid": study_uid,
        "series_uid": series_uid,
        "sop_uid": sop_uid,
        "job_id": job_id,
        "detail": detail,
    }


def record(session: Session, action: str, **fields: Any) -> AuditEvent:
    """Add an audit event to the session's transaction.

    ``fields``: ``actor`` (required) names who acted: ``ae:<calling AE>@<ip>``,
    ``token:<name>``, ``worker``, ``node``; ``outcome`` (default ``"ok"``),
    ``study_uid``, ``series_uid``, ``sop_uid``, ``job_id``; any other keyword goes to
    ``detail``, which must never hold patient identifiers.
    """
    event = AuditEvent(**_row(action, **fields))
    session.add(event)
    return event


def record_now(session: Session, action: str, **fields: Any) -> None:
    """The same row as `record`, written at once as one Core INSERT in the session's transaction.

    For the per-instance path of the listener, where the ORM unit of work costs more
    than the INSERT itself; nothing is returned, since no object is kept.
    """
    session.connection().execute(_INSERT, _row(action, **fields))
