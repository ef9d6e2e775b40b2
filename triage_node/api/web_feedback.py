"""The web page's feedback: agree / disagree / comment on a result, and the feedback page.

Same store and rules as ``/api/.../feedback`` (`triage_node.api.feedback_api`), with the
login cookie instead of the bearer header. The cookie is SameSite=Strict, so another
site cannot post feedback in a reader's name.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, HTTPException, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from pydantic import ValidationError

from triage_node.api.auth import Role
from triage_node.api.deps import SessionDep
from triage_node.api.feedback_api import FeedbackIn, csv_response, feedback_out, give_feedback
from triage_node.api.web import TEMPLATES, WebUser
from triage_node.worklist.feedback import list_feedback, summarise

router = APIRouter(include_in_schema=False)


@router.post("/studies/{study_uid}/feedback")
def study_feedback(study_uid: str, request: Request, session: SessionDep, user: WebUser,
                   verdict: Annotated[str, Form()], comment: Annotated[str, Form()] = "",
                   job_id: Annotated[str, Form()] = "") -> Response:
    """From the study page's form (a redirect back) or a row's quick buttons (JSON)."""
    try:
        body = FeedbackIn(verdict=verdict, comment=comment, job_id=int(job_id) if job_id else None)
    except (ValidationError, ValueError):
        raise HTTPException(422, "verdict must be agree, disagree or comment") from None
    row = give_feedback(session, study_uid, body, user)
    if "application/json" in request.headers.get("accept", ""):
        return JSONResponse(feedback_out(row, with_patient=False).model_dump(mode="json"), status_code=201)
    return RedirectResponse(f"/studies/{study_uid}#feedback", status_code=303)


@router.get("/feedback", response_class=HTMLResponse)
def feedback_page(request: Request, session: SessionDep, user: WebUser) -> Response:
    """The readers' verdicts, newest first, and the PPV they give the model."""
    rows = list_feedback(session)
    return TEMPLATES.TemplateResponse(
        request, "feedback.html",
        {"rows": list(reversed(rows))[:500], "summary": summarise(rows), "user": user},
    )


@router.get("/feedback.csv")
def feedback_csv(session: SessionDep, user: WebUser) -> Response:
    return csv_response(list_feedback(session), user.role is Role.admin)
