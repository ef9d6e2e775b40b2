"""``/api/worklist``: the ordered reading list, and changes to one entry.

Dependencies (settings, a session per request) come from `triage_node.api.deps`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, BackgroundTasks, Depends, HTTPException, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from triage_node import CLASSES
from triage_node.api.auth import Principal, Role, require_role
from triage_node.api.deps import SessionDep, SettingsDep
from triage_node.db import audit
from triage_node.db.models import PriorityClass, WorklistEntry, WorklistStatus
from triage_node.worklist.priority import set_manual_priority, set_status
from triage_node.worklist.priority_rules import PriorityError
from triage_node.worklist.queries import (
    FINDINGS,
    SORT_KEYS,
    WorklistFilter,
    WorklistRow,
    list_worklist,
    worklist_row,
)

SortKey = Literal[SORT_KEYS]  # type: ignore[valid-type]
Finding = Literal[FINDINGS]  # type: ignore[valid-type]

router = APIRouter(tags=["worklist"])


# -- shared helpers -----------------------------------------------------------------
def actor_of(principal: Principal) -> str:
    """Audit actor for the authenticated caller: ``token:<name>``."""
    return principal.actor


# -- schemas ------------------------------------------------------------------------
class WorklistItem(BaseModel):
    """One study on the reading list."""

    model_config = ConfigDict(extra="forbid")

    id: int = Field(description="Worklist entry id (for PATCH)")
    study_uid: str
    patient_name: str | None
    patient_id: str | None
    accession_number: str | None
    study_description: str | None
    modality: str | None
    received_at: datetime
    waiting_seconds: float = Field(description="Time since the study's first object arrived")
    status: WorklistStatus
    priority_class: PriorityClass
    manual_priority_class: PriorityClass | None
    score: float = Field(description="Weighted class probability (without ageing)")
    effective_score: float = Field(description="Score plus ageing, the order within a class")
    positive: bool | None = Field(description="AI result; null while no result exists")
    positive_classes: list[str]
    probabilities: dict[str, float]
    model_version: str | None
    thumbnail_url: str | None = Field(description="PNG of the first overlay, if any")
    study_url: str


class WorklistPage(BaseModel):
    total: int
    limit: int
    offset: int
    items: list[WorklistItem]


class WorklistPatch(BaseModel):
    """Changes to one entry; fields left out are not changed."""

    model_config = ConfigDict(extra="forbid")

    status: WorklistStatus | None = None
    manual_priority_class: PriorityClass | None = Field(
        None, description="Class a person sets (admin); with clear_manual_priority to remove it"
    )
    clear_manual_priority: bool = False
    reason: str = Field("", max_length=500, description="Why (kept in the audit trail)")


def item_from_row(row: WorklistRow) -> WorklistItem:
    study, entry, result = row.study, row.entry, row.result
    probs = {c: float(p) for c, p in ((result.study_probabilities or {}).items() if result else [])}
    positive_classes = (
        [c for c in CLASSES[1:] if (result.decisions or {}).get(c)] if result is not None else []
    )
    thumb = None
    if result is not None and result.overlay_sop_uids:
        thumb = f"/api/studies/{study.study_uid}/objects/{result.overlay_sop_uids[0]}.png?size=160"
    return WorklistItem(
        id=entry.id,
        study_uid=study.study_uid,
        patient_name=study.patient_name,
        patient_id=study.patient_id,
        accession_number=study.accession_number,
        study_description=study.study_description,
        modality=study.modality,
        received_at=study.received_at,
        waiting_seconds=round(row.waiting_seconds, 1),
        status=WorklistStatus(entry.status),
        priority_class=PriorityClass(entry.priority_class),
        manual_priority_class=(
            PriorityClass(entry.manual_priority_class) if entry.manual_priority_class else None
        ),
        score=entry.score,
        effective_score=round(row.effective_score, 6),
        positive=None if result is None else bool(result.positive),
        positive_classes=positive_classes,
        probabilities=probs,
        model_version=result.model_version if result else None,
        thumbnail_url=thumb,
        study_url=f"/api/studies/{study.study_uid}",
    )


def worklist_filter(
    status: Annotated[list[WorklistStatus] | None, Query(description="Repeatable")] = None,
    priority_class: Annotated[list[PriorityClass] | None, Query(description="Repeatable")] = None,
    since: Annotated[datetime | None, Query(description="Received at or after (ISO 8601)")] = None,
    until: Annotated[datetime | None, Query(description="Received before (ISO 8601)")] = None,
    modality: str | None = None,
    q: Annotated[str | None, Query(max_length=200,
                                   description="Patient name, PatientID or accession (words, in order)")] = None,
    finding: Annotated[Finding | None, Query(description="AI finding: any, a subtype, negative or pending")] = None,
    sort: Annotated[SortKey, Query(description="Column to sort by; the priority order breaks ties")] = "priority",
    order: Literal["asc", "desc"] = "asc",
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> WorklistFilter:
    return WorklistFilter(
        status=tuple(s.value for s in status or ()),
        priority_class=tuple(p.value for p in priority_class or ()),
        since=since,
        until=until,
        modality=modality or None,
        search=q or None,
        finding=finding,
        sort=sort,
        descending=order == "desc",
        limit=limit,
        offset=offset,
    )


# -- routes -------------------------------------------------------------------------
@router.get("/api/worklist", response_model=WorklistPage, summary="The ordered reading list")
def get_worklist(
    settings: SettingsDep,
    session: SessionDep,
    flt: Annotated[WorklistFilter, Depends(worklist_filter)],
    _principal: Annotated[Any, Depends(require_role("viewer"))],
) -> WorklistPage:
    """Studies by priority class (STAT-AI, STAT-order, routine), then score plus ageing."""
    rows, total = list_worklist(session, settings, flt)
    return WorklistPage(
        total=total, limit=flt.limit, offset=flt.offset, items=[item_from_row(r) for r in rows]
    )


@router.patch("/api/worklist/{entry_id}", response_model=WorklistItem, summary="Change status or priority")
def patch_worklist(
    entry_id: int,
    request: Request,
    patch: WorklistPatch,
    settings: SettingsDep,
    session: SessionDep,
    principal: Annotated[Principal, Depends(require_role("viewer"))],
    background: BackgroundTasks,
) -> WorklistItem:
    """Status (``new``/``reading``/``done``) needs viewer; a manual priority needs admin.

    Every change is audited with the token's name and the reason given; a change of
    class is sent to the RIS (HL7, when ``hl7_host`` is set) after the response.
    """
    entry = session.get(WorklistEntry, entry_id)
    if entry is None:
        raise HTTPException(404, f"no worklist entry {entry_id}")
    touches_priority = patch.manual_priority_class is not None or patch.clear_manual_priority
    if touches_priority and principal.role is not Role.admin:
        audit.record(session, "auth.forbidden", actor=principal.actor, outcome="denied",
                     path=f"/api/worklist/{entry_id}", method="PATCH", role=principal.role.value,
                     required=["admin"], what="manual priority")
        session.commit()
        raise HTTPException(403, "setting a priority needs the admin role")
    actor = actor_of(principal)
    class_before = entry.priority_class
    try:
        if patch.status is not None:
            set_status(session, entry, patch.status, actor=actor, reason=patch.reason)
        if touches_priority:
            set_manual_priority(
                session,
                entry,
                None if patch.clear_manual_priority else patch.manual_priority_class,
                actor=actor,
                reason=patch.reason or "set by a person",
                settings=settings,
            )
        session.commit()
    except PriorityError as exc:
        session.rollback()
        raise HTTPException(422, str(exc)) from None
    if entry.priority_class != class_before and settings.hl7_host:
        from triage_node.notify import notify_priority_change

        background.add_task(
            notify_priority_change, settings, request.app.state.session_factory,
            entry.study.study_uid, reason=patch.reason or "set by a person",
        )
    return item_from_row(worklist_row(session, settings, entry))
