"""``/api/studies/{uid}/feedback`` and ``/api/feedback``: readers judge AI results.

Giving feedback needs the ``viewer`` role, the role of the people who read studies on
the worklist (a separate "reader" role would split the same people in two and add a
role every site must hand out). The export carries patient names and IDs only for
``admin`` tokens (see SECURITY.md).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from triage_node.api.auth import Principal, Role, require_role
from triage_node.api.deps import SessionDep
from triage_node.db.models import Study
from triage_node.worklist.feedback import (
    COMMENT_MAX,
    FeedbackError,
    FeedbackRow,
    Verdict,
    list_feedback,
    record_feedback,
    result_for,
    row_of,
    summarise,
    to_csv,
)

router = APIRouter(tags=["feedback"])
Viewer = Annotated[Principal, Depends(require_role("viewer"))]


class FeedbackIn(BaseModel):
    """A reader's judgement of one AI result."""

    model_config = ConfigDict(extra="forbid")

    verdict: Verdict = Field(description="agree, disagree, or comment (a remark only)")
    comment: str = Field("", max_length=COMMENT_MAX, description="Free text; no patient identifiers")
    job_id: int | None = Field(None, description="The job whose result is judged; default the current one")


class FeedbackOut(BaseModel):
    at: datetime
    reader: str
    study_uid: str
    job_id: int | None
    verdict: str
    comment: str
    model_version: str | None
    device_uid: str | None
    ai_positive: bool | None
    ai_positive_classes: list[str]
    accession_number: str | None
    patient_name: str | None = Field(None, description="admin tokens only")
    patient_id: str | None = Field(None, description="admin tokens only")


class FeedbackPage(BaseModel):
    summary: dict[str, Any] = Field(description="Counts; ppv and npv as judged by readers, per model version too")
    items: list[FeedbackOut]


def feedback_out(row: FeedbackRow, with_patient: bool) -> FeedbackOut:
    return FeedbackOut(
        at=row.at, reader=row.actor, study_uid=row.study_uid, job_id=row.job_id, verdict=row.verdict,
        comment=row.comment, model_version=row.model_version, device_uid=row.device_uid,
        ai_positive=row.ai_positive, ai_positive_classes=list(row.ai_positive_classes),
        accession_number=row.accession_number,
        patient_name=row.patient_name if with_patient else None,
        patient_id=row.patient_id if with_patient else None,
    )


def give_feedback(session: Any, study_uid: str, body: FeedbackIn, principal: Principal) -> FeedbackRow:
    """Record the feedback (shared by the API and the web page); HTTP errors for the caller."""
    result = result_for(session, study_uid, body.job_id)
    if result is None:
        raise HTTPException(404, "no AI result to judge for that study" + (" and job" if body.job_id else ""))
    try:
        event = record_feedback(session, study_uid, result, body.verdict, body.comment, actor=principal.actor)
    except FeedbackError as exc:
        raise HTTPException(422, str(exc)) from None
    session.commit()
    return row_of(event, session.get(Study, result.study_id))


@router.post("/api/studies/{study_uid}/feedback", response_model=FeedbackOut, status_code=201,
             summary="Agree, disagree or comment on a study's AI result")
def post_feedback(study_uid: str, body: FeedbackIn, session: SessionDep, principal: Viewer) -> FeedbackOut:
    """Stored as a ``result.feedback`` audit event under the token's name."""
    return feedback_out(give_feedback(session, study_uid, body, principal), principal.role is Role.admin)


def _rows(session: Any, since: datetime | None, until: datetime | None, study: str | None) -> list[FeedbackRow]:
    return list_feedback(session, since=since, until=until, study_uid=study or None)


@router.get("/api/feedback", response_model=FeedbackPage, summary="Readers' feedback and the PPV they judge")
def get_feedback(
    session: SessionDep,
    principal: Viewer,
    since: Annotated[datetime | None, Query(description="At or after (ISO 8601)")] = None,
    until: Annotated[datetime | None, Query(description="Before (ISO 8601)")] = None,
    study: Annotated[str | None, Query(description="StudyInstanceUID")] = None,
) -> FeedbackPage:
    rows = _rows(session, since, until, study)
    admin = principal.role is Role.admin
    return FeedbackPage(summary=summarise(rows), items=[feedback_out(r, admin) for r in rows])


@router.get("/api/feedback.csv", response_class=Response, summary="Readers' feedback as CSV (one row each)",
            responses={200: {"content": {"text/csv": {}}}})
def get_feedback_csv(
    session: SessionDep,
    principal: Viewer,
    since: Annotated[datetime | None, Query(description="At or after (ISO 8601)")] = None,
    until: Annotated[datetime | None, Query(description="Before (ISO 8601)")] = None,
) -> Response:
    """Columns: time_utc, study_uid, accession_number, verdict, comment, model_version,
    ai_positive, ai_positive_classes, job_id, reader, device_uid; patient_name and patient_id
    for admin tokens only."""
    rows = _rows(session, since, until, None)
    return csv_response(rows, principal.role is Role.admin)


def csv_response(rows: list[FeedbackRow], with_patient: bool) -> Response:
    summary = summarise(rows)
    ppv = "" if summary["ppv"] is None else str(summary["ppv"])
    return Response(to_csv(rows, with_patient=with_patient), media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": 'attachment; filename="feedback.csv"',
                             "X-Total-Count": str(len(rows)), "X-Reader-PPV": ppv})
