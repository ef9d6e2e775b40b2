"""Notifications after a job: signed webhooks, and HL7 messages to the RIS.

Call `notify_job` (webhooks, ORM^O01 priority update) and `report_result` (ORU^R01 with
the AI result) after the transaction that stored the result (or the failure) has
committed; they do network I/O and write their own audit rows (``notify.webhook``,
``notify.hl7``). HL7 messages go through the outbox (``outbox.py``): sent at once, and
retried by the worker's periodic ``deliver_hl7_due`` until the RIS acknowledges them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from triage_node.config import Settings
from triage_node.db import audit
from triage_node.db.models import Job, JobState, Result, Series, Study, WorklistEntry
from triage_node.db.session import transaction
from triage_node.logs import get_logger
from triage_node.notify import outbox
from triage_node.notify.hl7 import (
    ORM,
    ORU,
    ClassFinding,
    Envelope,
    PriorityUpdate,
    ResultReport,
    build_orm,
    build_oru,
)
from triage_node.notify.webhook import WebhookOutcome, send_event
from triage_node.timeutil import utcnow

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


def _send_now(
    settings: Settings,
    session_factory: sessionmaker[Session],
    item_id: int,
) -> tuple[str | None, str | None]:
    """Try one stored message at once; ``(ack code, error)``. A row not due (already sent,
    or waiting for its next try) is left to the periodic delivery."""
    report = outbox.deliver_due(session_factory, settings, ids=[item_id])
    result = (report.results or {}).get(item_id)
    if result is None:
        return None, None
    return result.ack_code, None if result.outcome == "accepted" else result.detail


def _send_orm(settings: Settings, session_factory: sessionmaker[Session], update: PriorityUpdate, *,
              job_id: int | None, trigger: str) -> tuple[str | None, str | None]:
    message, control_id = build_orm(update, envelope=Envelope.from_settings(settings))
    item_id = outbox.enqueue(
        session_factory, message=message, control_id=control_id, message_type=ORM,
        study_uid=update.study_uid, job_id=job_id, trigger=trigger,
        dedup_key=f"job:{job_id}:{ORM}" if job_id is not None else None,
    )
    return _send_now(settings, session_factory, item_id)


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
        report.hl7_ack, report.hl7_error = _send_orm(
            settings, session_factory, update, job_id=job_id, trigger="result"
        )
    return report


def result_report(session: Session, job_id: int) -> ResultReport | None:
    """The ORU^R01 content of a job's result, or None when the job wrote none."""
    result = session.scalars(select(Result).where(Result.job_id == job_id)).one_or_none()
    if result is None:
        return None
    job = session.get(Job, job_id)
    assert job is not None
    study = session.get(Study, job.study_id)
    assert study is not None
    series = session.get(Series, job.series_id)
    probs = result.study_probabilities or {}
    decisions = result.decisions or {}
    names = ["any", *sorted(n for n in probs if n != "any")] if "any" in probs else sorted(probs)
    created = result.created_at or utcnow()
    return ResultReport(
        study_uid=study.study_uid,
        accession_number=study.accession_number,
        patient_id=study.patient_id,
        patient_name=study.patient_name,
        procedure=study.study_description or (series.description if series else None),
        model_name=result.model_name,
        model_version=result.model_version,
        operating_point=result.operating_point,
        device_uid=result.device_uid,
        findings=tuple(
            ClassFinding(n, bool(decisions.get(n)), min(1.0, max(0.0, float(probs[n])))) for n in names
        ),
        observed_at=created if created.tzinfo else created.replace(tzinfo=UTC),
    )


def report_result(
    settings: Settings,
    session_factory: sessionmaker[Session],
    job_id: int,
) -> tuple[str | None, str | None] | None:
    """Send the job's AI result to the RIS as ORU^R01 (positive or negative).

    Returns ``(ack code, error)`` of the first try, or None when no RIS is configured or
    the job wrote no result. A message not acknowledged stays in the outbox for retries.
    """
    if not settings.hl7_host:
        return None
    with session_factory() as session:
        report = result_report(session, job_id)
    if report is None:
        return None
    message, control_id = build_oru(report, envelope=Envelope.from_settings(settings))
    item_id = outbox.enqueue(
        session_factory, message=message, control_id=control_id, message_type=ORU,
        study_uid=report.study_uid, job_id=job_id, trigger="result", dedup_key=f"job:{job_id}:{ORU}",
    )
    return _send_now(settings, session_factory, item_id)


def notify_priority_change(
    settings: Settings,
    session_factory: sessionmaker[Session],
    study_uid: str,
    *,
    reason: str,
) -> str | None:
    """Tell the RIS (ORM^O01 over MLLP) the study's current priority after a person changed it.

    Returns the ACK code of the first try, or None when no RIS is configured or it did not
    acknowledge (the message then stays in the outbox); audited as ``notify.hl7``.
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
    ack, _ = _send_orm(settings, session_factory, update, job_id=None, trigger="manual priority")
    return ack


__all__ = [
    "EVENT_FAILED",
    "EVENT_POSITIVE",
    "NotifyReport",
    "notify_job",
    "notify_priority_change",
    "report_result",
    "result_report",
]
