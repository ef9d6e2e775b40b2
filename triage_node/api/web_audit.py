"""The web page's audit trail: the filtered audit page and its CSV download.

Same filters and rows as ``GET /api/audit`` (`triage_node.api.audit_api`), with the
login cookie instead of the bearer header. Kept apart from ``triage_node.api.web``
(worklist and study pages), as the feedback pages are (`triage_node.api.web_feedback`):
it shares only the templates and the login dependency.
"""

from __future__ import annotations

from datetime import UTC, datetime
from urllib.parse import urlencode

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import HTMLResponse

from triage_node.api.audit_api import to_csv
from triage_node.api.deps import SessionDep
from triage_node.api.web import TEMPLATES, WebUser
from triage_node.worklist.audit_trail import AuditFilter, audit_rows, list_audit

router = APIRouter(include_in_schema=False)


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise HTTPException(422, f"not an ISO 8601 time: {value!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _audit_filter(since: str | None, until: str | None, study: str | None, action: str | None,
                  actor: str | None, limit: int) -> AuditFilter:
    return AuditFilter(since=_parse_time(since), until=_parse_time(until), study_uid=study or None,
                       action=action or None, actor=actor or None, limit=limit)


@router.get("/audit", response_class=HTMLResponse)
def audit_page(request: Request, session: SessionDep, user: WebUser, since: str | None = None,
               until: str | None = None, study: str | None = None, action: str | None = None,
               actor: str | None = None) -> Response:
    flt = _audit_filter(since, until, study, action, actor, 500)
    events, total = list_audit(session, flt)
    query = urlencode({k: v for k, v in request.query_params.items() if v})
    return TEMPLATES.TemplateResponse(
        request,
        "audit.html",
        {"rows": audit_rows(events), "total": total, "filters": dict(request.query_params),
         "csv_url": "/audit.csv" + (f"?{query}" if query else ""), "user": user},
    )


@router.get("/audit.csv")
def audit_csv(session: SessionDep, _user: WebUser, since: str | None = None, until: str | None = None,
              study: str | None = None, action: str | None = None, actor: str | None = None) -> Response:
    events, _ = list_audit(session, _audit_filter(since, until, study, action, actor, 100000))
    return Response(to_csv(audit_rows(events)), media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": 'attachment; filename="audit.csv"'})
