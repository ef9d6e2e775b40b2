"""Readers' feedback on AI results: agree / disagree / comment, kept in the audit trail.

The audit trail is the store (append-only, one write path): each feedback is one
``result.feedback`` event naming the study, the job whose result was judged and, in
``detail``, the verdict, the comment and what the model said (version, device UID,
positive classes, rounded study probabilities), so that an export still describes the
result after a re-run supersedes it. Patient identifiers never go into ``detail``; the
export joins them from the study row, and only for callers allowed to see them.

A reader may change their mind: the summary counts the latest verdict per reader and
job, while the export keeps every row.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from triage_node import CLASSES
from triage_node.db import audit
from triage_node.db.models import AuditEvent, Job, JobState, Result, Study

ACTION = "result.feedback"
COMMENT_MAX = 2000


class Verdict(StrEnum):
    agree = "agree"
    disagree = "disagree"
    comment = "comment"  # a remark without a verdict


class FeedbackError(ValueError):
    """Feedback that cannot be recorded (no result, an empty comment)."""


def positive_classes(result: Result) -> list[str]:
    """Subtypes the result decided positive, in the model's class order."""
    return [c for c in CLASSES[1:] if (result.decisions or {}).get(c)]


def result_for(session: Session, study_uid: str, job_id: int | None = None) -> Result | None:
    """The result judged: the job's when ``job_id`` is given, else the study's current one."""
    stmt = (select(Result).join(Study, Study.id == Result.study_id).join(Job, Job.id == Result.job_id)
            .where(Study.study_uid == study_uid))
    if job_id is not None:
        return session.scalars(stmt.where(Result.job_id == job_id)).one_or_none()
    stmt = stmt.where(Job.state != JobState.superseded.value).order_by(Result.created_at.desc(), Result.id.desc())
    return session.scalars(stmt.limit(1)).first()


def record_feedback(session: Session, study_uid: str, result: Result, verdict: Verdict | str,
                    comment: str, *, actor: str) -> AuditEvent:
    """Add one ``result.feedback`` audit event to the session (the caller commits)."""
    verdict = Verdict(verdict)
    comment = " ".join((comment or "").split())[:COMMENT_MAX]  # one line in the CSV
    if verdict is Verdict.comment and not comment:
        raise FeedbackError("a comment without a verdict needs some text")
    probabilities = {c: round(float(p), 3) for c, p in (result.study_probabilities or {}).items()}
    return audit.record(
        session, ACTION, actor=actor, study_uid=study_uid, job_id=result.job_id,
        verdict=verdict.value, comment=comment, model_name=result.model_name,
        model_version=result.model_version, device_uid=result.device_uid,
        operating_point=result.operating_point, positive=bool(result.positive),
        positive_classes=positive_classes(result), probabilities=probabilities,
    )


@dataclass(frozen=True)
class FeedbackRow:
    """One feedback event with the study's identifiers (for export and pages)."""

    at: datetime
    actor: str
    study_uid: str
    job_id: int | None
    verdict: str
    comment: str
    model_version: str | None
    device_uid: str | None
    ai_positive: bool | None
    ai_positive_classes: tuple[str, ...]
    accession_number: str | None
    patient_name: str | None
    patient_id: str | None


def list_feedback(session: Session, *, study_uid: str | None = None, since: datetime | None = None,
                  until: datetime | None = None, limit: int = 100000) -> list[FeedbackRow]:
    """Feedback events, oldest first, with the study's accession and patient."""
    stmt = (select(AuditEvent, Study).outerjoin(Study, Study.study_uid == AuditEvent.study_uid)
            .where(AuditEvent.action == ACTION))
    if study_uid:
        stmt = stmt.where(AuditEvent.study_uid == study_uid)
    if since is not None:
        stmt = stmt.where(AuditEvent.at >= since)
    if until is not None:
        stmt = stmt.where(AuditEvent.at < until)
    return [row_of(event, study)
            for event, study in session.execute(stmt.order_by(AuditEvent.at, AuditEvent.id).limit(limit))]


def row_of(event: AuditEvent, study: Study | None) -> FeedbackRow:
    """The `FeedbackRow` of one ``result.feedback`` event and its study (None if unknown)."""
    d = event.detail or {}
    at = event.at if event.at.tzinfo else event.at.replace(tzinfo=UTC)
    return FeedbackRow(
        at=at.astimezone(UTC), actor=event.actor, study_uid=event.study_uid or "",
        job_id=event.job_id, verdict=str(d.get("verdict", "")), comment=str(d.get("comment", "")),
        model_version=d.get("model_version"), device_uid=d.get("device_uid"),
        ai_positive=d.get("positive"), ai_positive_classes=tuple(d.get("positive_classes") or ()),
        accession_number=study.accession_number if study else None,
        patient_name=study.patient_name if study else None,
        patient_id=study.patient_id if study else None,
    )


def latest_verdicts(session: Session, study_uids: Iterable[str]) -> dict[str, str]:
    """Per study, the newest agree/disagree anyone gave (for the worklist rows)."""
    uids = list(study_uids)
    if not uids:
        return {}
    stmt = (select(AuditEvent.study_uid, AuditEvent.detail)
            .where(AuditEvent.action == ACTION, AuditEvent.study_uid.in_(uids))
            .order_by(AuditEvent.at, AuditEvent.id))
    out: dict[str, str] = {}
    for uid, detail in session.execute(stmt):
        verdict = (detail or {}).get("verdict")
        if verdict in (Verdict.agree, Verdict.disagree):
            out[uid] = verdict
    return out


def _ratio(hits: int, total: int) -> float | None:
    return round(hits / total, 4) if total else None


def summarise(rows: Iterable[FeedbackRow]) -> dict[str, Any]:
    """Counts, and the model's PPV as judged by readers.

    ``ppv``: among AI-positive results, the share readers agreed with; ``npv`` the same
    among AI-negative ones. Each reader's latest agree/disagree per job counts once;
    comments alone do not count. Also given per model version.
    """
    rows = list(rows)
    latest: dict[tuple[int | None, str, str], FeedbackRow] = {}
    for row in rows:  # oldest first: later verdicts replace earlier ones
        if row.verdict in (Verdict.agree, Verdict.disagree):
            latest[(row.job_id, row.study_uid, row.actor)] = row

    def judged(subset: list[FeedbackRow]) -> dict[str, Any]:
        pos = [r for r in subset if r.ai_positive]
        neg = [r for r in subset if r.ai_positive is False]
        pos_agree = sum(r.verdict == Verdict.agree for r in pos)
        neg_agree = sum(r.verdict == Verdict.agree for r in neg)
        return {
            "judged": len(subset),
            "ai_positive_judged": len(pos), "ai_positive_agreed": pos_agree, "ppv": _ratio(pos_agree, len(pos)),
            "ai_negative_judged": len(neg), "ai_negative_agreed": neg_agree, "npv": _ratio(neg_agree, len(neg)),
        }

    judgements = list(latest.values())
    versions = sorted({r.model_version or "" for r in judgements})
    return {
        "feedback": len(rows),
        "by_verdict": {v.value: sum(r.verdict == v for r in rows) for v in Verdict},
        **judged(judgements),
        "by_model_version": {v: judged([r for r in judgements if (r.model_version or "") == v])
                             for v in versions},
    }


CSV_COLUMNS = ("time_utc", "study_uid", "accession_number", "verdict", "comment", "model_version",
               "ai_positive", "ai_positive_classes", "job_id", "reader", "device_uid")
PATIENT_COLUMNS = ("patient_name", "patient_id")


def _cell(value: str) -> str:
    # A leading = + - @ makes a spreadsheet run the cell as a formula (CSV injection).
    return "'" + value if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


def to_csv(rows: Iterable[FeedbackRow], *, with_patient: bool = False) -> str:
    """One line per feedback; patient name and ID only when ``with_patient``."""
    out = io.StringIO()
    columns = list(CSV_COLUMNS) + (list(PATIENT_COLUMNS) if with_patient else [])
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        line = {
            "time_utc": r.at.isoformat(timespec="seconds"), "study_uid": r.study_uid,
            "accession_number": _cell(r.accession_number or ""), "verdict": r.verdict,
            "comment": _cell(r.comment), "model_version": r.model_version or "",
            "ai_positive": "" if r.ai_positive is None else str(bool(r.ai_positive)).lower(),
            "ai_positive_classes": ";".join(r.ai_positive_classes), "job_id": r.job_id or "",
            "reader": r.actor, "device_uid": r.device_uid or "",
        }
        if with_patient:
            line.update(patient_name=_cell(r.patient_name or ""), patient_id=_cell(r.patient_id or ""))
        writer.writerow(line)
    return out.getvalue()
