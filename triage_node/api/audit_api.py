"""``/api/audit``: the audit trail, filtered, as JSON or CSV (for auditors)."""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Response
from pydantic import BaseModel

from triage_node.api.auth import require_role
from triage_node.api.deps import SessionDep
from triage_node.worklist.audit_trail import AUDIT_CSV_COLUMNS, AuditFilter, audit_rows, list_audit

router = APIRouter(tags=["audit"])


class AuditEventOut(BaseModel):
    id: int
    at: datetime
    actor: str
    action: str
    outcome: str
    study_uid: str | None
    series_uid: str | None
    sop_uid: str | None
    job_id: int | None
    detail: dict[str, Any]


class AuditPage(BaseModel):
    total: int
    limit: int
    offset: int
    items: list[AuditEventOut]


def audit_filter(
    since: Annotated[datetime | None, Query(description="At or after (ISO 8601)")] = None,
    until: Annotated[datetime | None, Query(description="Before (ISO 8601)")] = None,
    study: Annotated[str | None, Query(description="StudyInstanceUID")] = None,
    action: Annotated[str | None, Query(description="Exact, or a prefix ending in *")] = None,
    actor: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 200,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> AuditFilter:
    return AuditFilter(
        since=since, until=until, study_uid=study or None, action=action or None,
        actor=actor or None, limit=limit, offset=offset,
    )


def to_csv(rows: list[dict[str, Any]]) -> str:
    """CSV with a header row; ``detail`` as compact JSON."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(AUDIT_CSV_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "detail": json.dumps(row["detail"], sort_keys=True, default=str)})
    return out.getvalue()


@router.get(
    "/api/audit",
    response_model=AuditPage,
    responses={200: {"content": {"text/csv": {}}}},
    summary="Audit events (JSON, or CSV with format=csv)",
)
def get_audit(
    session: SessionDep,
    flt: Annotated[AuditFilter, Depends(audit_filter)],
    _principal: Annotated[Any, Depends(require_role("viewer"))],
    format: Literal["json", "csv"] = "json",  # noqa: A002 - the query parameter's name
) -> Any:
    """Filters: time range, study, action (``worklist.*`` for a prefix), actor."""
    events, total = list_audit(session, flt)
    rows = audit_rows(events)
    if format == "csv":
        return Response(
            to_csv(rows),
            media_type="text/csv; charset=utf-8",
            headers={
                "Content-Disposition": 'attachment; filename="audit.csv"',
                "X-Total-Count": str(total),
            },
        )
    return AuditPage(total=total, limit=flt.limit, offset=flt.offset,
                     items=[AuditEventOut(**r) for r in rows])
