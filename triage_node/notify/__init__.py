"""Notifications after a job: signed webhooks and HL7 priority updates to the RIS.

Call `notify_job` after the transaction that stored the result (or the failure) has
committed; it does network I/O and writes its own audit rows (``notify.webhook``,
``notify.hl7``) in a new transaction.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from triage_node.config import Settings
from triage_node.db import audit
from triage_node.db.models import Job, JobState, Result, Series, Study, WorklistEntry
from triage_node.db.session import transaction
from triage_node.logs import get_logger
from triage_node.notify.hl7 import HL7Error, PriorityUpdate, send_priority_update
from triage_node.notify.webhook import WebhookOutcome, send_event

log = get_logger(__name__)

EVENT_POSITIVE = "ich.positive"
EVENT_FAILED = "job.failed"


@dataclass
class NotifyReport:
    """What `notify_job` sent."""

    event: str | None = None
    webhooks: list[WebhookOutcome] = field(default_factory=list)
    hl7_ack: str | None = None
    hl7_error: str | None = None


def positive_classes(result: Result) -> list[str]:
    return [name for name, hit in (result.decisions or {}).items() if hit and name != "any"]


def result_payload(study: Study, job: Job, result: Result, entry: WorklistEntry | None) -> dict[str, Any]:
    """Webhook body for a positive result: UIDs, classes, probabilities, priority."""
    return {
        "study_uid": study.study_uid,
        "job_id": job.id,
        "job_version": job.version,
        "positive": bool(result.positive),
        "positive_classes": positive_classes(result),
        "probabilities": result.study_probabilities,
        "model": {"name": result.model_name, "version": result.model_version},
        "operating_point": result.operating_point,
        "priority_class": entry.priority_class if entry else None,
        "score": entry.score if entry else None,
        "sr_sop_uid": result.sr_sop_uid,
        "worklist_url": f"/studies/{study.study_uid}",
    }


def failure_payload(study: Study, job: Job) -> dict[str, Any]:
    """Webhook body for a failed job (the error text, no patient identifiers)."""
    return {
        "study_uid": study.study_uid,
        "job_id": job.id,
        "job_version": job.version,
        "error": (job.error or "")[:2000],
        "attempts": job.attempts,
    }


def _note(result: Result) -> str:
    classes = positive_classes(result)
    probs = result.study_probabilities or {}
    parts = ", ".join(f"{c} {float(probs.get(c, 0.0)):.2f}" for c in classes) or "any"
    return f"AI triage: intracranial hemorrhage suspected ({parts}); not a diagnosis"


def notify_job(
    settings: Settings,
    session_factory: sessionmaker[Session],
    job_id: int,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> NotifyReport:
    """Send the webhook (positive result or failed job) and the HL7 update for a job.

    Nothing is sent for a negative result or a job still running. Every send is
    audited with its outcome.
    """
    report = NotifyReport()
    with session_factory() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise ValueError(f"no job {job_id}")
        study = session.get(Study, job.study_id)
        assert study is not None
        result = session.scalars(select(Result).where(Result.job_id == job_id)).one_or_none()
        entry = session.scalars(
            select(WorklistEntry).where(WorklistEntry.study_id == study.id)
        ).one_or_none()
        series = session.get(Series, job.series_id)
        if job.state == JobState.failed.value:
            report.event, payload = EVENT_FAILED, failure_payload(study, job)
        elif result is not None and result.positive:
            report.event, payload = EVENT_POSITIVE, result_payload(study, job, result, entry)
        else:
            return report
        update = None
        if report.event == EVENT_POSITIVE and result is not None and entry is not None:
            update = PriorityUpdate(
                study_uid=study.study_uid,
                accession_number=study.accession_number,
                patient_id=study.patient_id,
                patient_name=study.patient_name,
                priority_class=entry.priority_class,
                procedure=study.study_description or (series.description if series else None),
                note=_note(result),
            )
    report.webhooks = send_event(settings, report.event, payload, sleep=sleep)
    if update is not None and settings.hl7_host:
        try:
            report.hl7_ack = send_priority_update(settings, update, sleep=sleep)
        except HL7Error as exc:
            report.hl7_error = str(exc)
    with transaction(session_factory) as session:
        for outcome in report.webhooks:
            audit.record(
                session,
                "notify.webhook",
                actor="node",
                outcome="ok" if outcome.delivered else "failed",
                study_uid=payload["study_uid"],
                job_id=job_id,
                event=report.event,
                host=urlsplit(outcome.url).netloc,
                attempts=outcome.attempts,
                status_code=outcome.status_code,
                error=outcome.error,
            )
        if update is not None and settings.hl7_host:
            audit.record(
                session,
                "notify.hl7",
                actor="node",
                outcome="ok" if report.hl7_error is None else "failed",
                study_uid=update.study_uid,
                job_id=job_id,
                priority_class=update.priority_class,
                ack=report.hl7_ack,
                error=report.hl7_error,
            )
    return report


def notify_priority_change(
    settings: Settings,
    session_factory: sessionmaker[Session],
    study_uid: str,
    *,
    reason: str,
    sleep: Callable[[float], None] = time.sleep,
) -> str | None:
    """Tell the RIS (HL7 over MLLP) the study's current priority after a person changed it.

    Returns the ACK code, or None when no RIS is configured; audited as ``notify.hl7``.
    """
    if not settings.hl7_host:
        return None
    with session_factory() as session:
        study = session.scalars(select(Study).where(Study.study_uid == study_uid)).one()
        entry = session.scalars(
            select(WorklistEntry).where(WorklistEntry.study_id == study.id)
        ).one()
        update = PriorityUpdate(
            study_uid=study.study_uid,
            accession_number=study.accession_number,
            patient_id=study.patient_id,
            patient_name=study.patient_name,
            priority_class=entry.priority_class,
            procedure=study.study_description,
            note=f"Priority {entry.priority_class} set by a person: {reason}"[:200],
        )
    ack, error = None, None
    try:
        ack = send_priority_update(settings, update, sleep=sleep)
    except HL7Error as exc:
        error = str(exc)
    with transaction(session_factory) as session:
        audit.record(
            session, "notify.hl7", actor="node", outcome="ok" if error is None else "failed",
            study_uid=study_uid, priority_class=update.priority_class, ack=ack, error=error,
            trigger="manual priority",
        )
    return ack


__all__ = [
    "EVENT_FAILED",
    "EVENT_POSITIVE",
    "NotifyReport",
    "notify_job",
    "notify_priority_change",
]
