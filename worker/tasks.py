"""Celery tasks: thin adapters around plain functions (STYLE.md 5).

``worker.triage_job(job_id, version)``
    Runs :func:`worker.pipeline.run.run_job`. Idempotent per (job id, version): a
    redelivered message (late acknowledgement after a lost worker) finds the job done
    and returns its result, or re-runs it and overwrites the same objects. Retried with
    exponential backoff only for transient errors (inference backend unreachable,
    database OperationalError); any other error fails the job once.
``worker.deliver_due()``
    Delivers outbox items whose next attempt is due (retries with backoff); run
    periodically by the worker's embedded beat and right after each job.
``worker.reconcile()``
    The sweep of stuck jobs (`triage_node.jobs.sweep`): jobs left ``running`` by a
    vanished worker, ``queued`` jobs the broker never took, and jobs the broker lost;
    run every ``reconcile_interval_s`` by the beat, the only schedule that moves them.
``worker.notify_job(job_id)``
    Webhooks and the HL7 priority update for a positive result or a failed job
    (:func:`triage_node.notify.notify_job`), and the HL7 ORU^R01 of every result
    (:func:`triage_node.notify.report_result`), sent by the triage task after its result
    (or failure) is committed, on the ``stat`` queue so a slow receiver never holds up
    triage itself.
``worker.deliver_hl7_due()``
    Sends HL7 messages the RIS has not acknowledged yet, when their next try is due
    (:func:`triage_node.notify.outbox.deliver_due`); run periodically by beat.
"""

from __future__ import annotations

from typing import Any

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import OperationalError

from triage_node import QUEUE_STAT
from triage_node.logs import get_logger
from worker.celery_app import app
from worker.inference.base import BackendUnavailable

log = get_logger(__name__)

#: Errors worth retrying: the same job succeeds once the peer is back.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (BackendUnavailable, OperationalError)
MAX_RETRIES = 5


class TriageTask(Task):
    """Marks the job failed when the task fails for good (after the last retry)."""

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        from worker.pipeline.context import get_context
        from worker.pipeline.run import mark_failed

        if args:
            try:
                ctx = get_context()
                mark_failed(ctx, int(args[0]), int(args[1]) if len(args) > 1 else None, exc)
                send_notifications(ctx.settings, int(args[0]))
            except Exception as err:  # noqa: BLE001 - the failure is already being reported
                log.error("job.mark_failed_error", error=repr(err))


def send_notifications(settings: Any, job_id: int) -> None:
    """Queue the notification task when a receiver is configured (webhook or RIS)."""
    if settings.webhook_urls or settings.hl7_host:
        notify_job.apply_async(args=[job_id], queue=QUEUE_STAT)


@app.task(
    name="worker.triage_job",
    bind=True,
    base=TriageTask,
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=TRANSIENT_ERRORS,
    retry_backoff=2,
    retry_backoff_max=60,
    retry_jitter=True,
    max_retries=MAX_RETRIES,
)
def triage_job(self: Task, job_id: int, version: int) -> dict[str, Any]:
    """Triage one series (job) and deliver what it wrote; returns a summary."""
    from worker.pipeline.context import get_context
    from worker.pipeline.run import deliver_for_job, run_job

    ctx = get_context()
    try:
        outcome = run_job(ctx, int(job_id), int(version), task_id=self.request.id)
    except SoftTimeLimitExceeded:
        log.error("job.time_limit", job_id=job_id)
        raise
    summary = outcome.as_dict()
    if outcome.ran:
        if outcome.positive or ctx.settings.hl7_host:  # the RIS hears of every result
            send_notifications(ctx.settings, int(job_id))
        summary["delivery"] = deliver_for_job(ctx, int(job_id))
    return summary


@app.task(name="worker.deliver_due", acks_late=True, ignore_result=True)
def deliver_due() -> dict[str, Any]:
    """Deliver every outbox item that is due (any job)."""
    from worker.pipeline.context import get_context
    from worker.pipeline.run import deliver_pending

    return deliver_pending(get_context())


@app.task(name="worker.notify_job", acks_late=True, ignore_result=True)
def notify_job(job_id: int) -> dict[str, Any]:
    """Send the webhooks and the HL7 messages of one job; every send is audited."""
    from triage_node.notify import notify_job as send
    from triage_node.notify import report_result
    from worker.pipeline.context import get_context

    ctx = get_context()
    report = send(ctx.settings, ctx.session_factory, int(job_id))
    oru = report_result(ctx.settings, ctx.session_factory, int(job_id))
    return {
        "event": report.event,
        "webhooks": [w.delivered for w in report.webhooks],
        "hl7_ack": report.hl7_ack,
        "hl7_error": report.hl7_error,
        "hl7_oru": list(oru) if oru else None,
    }


@app.task(name="worker.deliver_hl7_due", acks_late=True, ignore_result=True)
def deliver_hl7_due() -> dict[str, int]:
    """Send every HL7 message whose next try is due."""
    from triage_node.notify.outbox import deliver_due as deliver
    from worker.pipeline.context import get_context

    ctx = get_context()
    return deliver(ctx.session_factory, ctx.settings).as_dict()


@app.task(name="worker.reconcile", ignore_result=True)
def reconcile() -> dict[str, int]:
    """Every step of `triage_node.jobs.sweep.sweep`: stale, never sent, lost."""
    from triage_node.jobs.sweep import sweep
    from triage_node.queue import JobEnqueuer, make_client
    from worker.pipeline.context import get_context

    ctx = get_context()
    client = make_client(ctx.settings)
    try:
        report = sweep(JobEnqueuer(ctx.session_factory, client), ctx.settings)
    finally:
        client.close()
    return {"requeued": len(report.requeued), "sent": sum(o.sent for o in report.sent),
            "resent": sum(r.sent for r in report.resent)}


@app.task(name="worker.retention", acks_late=True, ignore_result=True)
def retention() -> dict[str, object]:
    """Delete what the retention policy allows (`triage_node.retention.run`); audited per batch."""
    from triage_node.retention import run
    from worker.pipeline.context import get_context

    ctx = get_context()
    report = run(ctx.settings, ctx.session_factory)
    return {"studies": len(report.studies), "bytes": report.image_bytes + report.result_bytes,
            "batches": report.batches}
