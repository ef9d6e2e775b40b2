"""Deleting what the plan allows: files, then rows, one transaction and one audit row per batch.

Every batch re-checks each study inside its own transaction (an image or a retry may
have come in since the plan), removes the study's rows, then its files, and commits
with one ``retention.deleted`` audit row that names the studies by UID and counts what
went (never a patient identifier). A study whose files cannot be removed is rolled
back to its savepoint and left for the next run. ``/metrics`` counts these audit rows.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, cast

from sqlalchemy import CursorResult, delete, func, insert, or_, select, text, update
from sqlalchemy.engine import Result as RowsResult
from sqlalchemy.orm import Session, sessionmaker

from triage_node.config import Settings
from triage_node.db import audit
from triage_node.db.models import (
    AuditEvent,
    AuditPruneGate,
    HL7OutboxItem,
    Instance,
    Job,
    OutboxItem,
    Result,
    Series,
    Study,
    WorklistEntry,
)
from triage_node.db.session import transaction
from triage_node.ingest.spool import InvalidUID, validate_uid
from triage_node.logs import get_logger
from triage_node.retention.eligibility import (
    Plan,
    ResultFiles,
    StudyVerdict,
    delivered_before,
    make_plan,
    recheck,
    study_verdicts,
)
from triage_node.retention.policy import DiskUse, Policy, disk_use
from triage_node.timeutil import utcnow

log = get_logger(__name__)

ACTOR = "retention"
ACTION = "retention.deleted"
#: Audit rows pruned per run at most, so one run never holds the table for long.
AUDIT_PRUNE_LIMIT = 50_000


@dataclass
class RunReport:
    """What one run deleted (the sum of its audit rows)."""

    disk_before: DiskUse
    disk_after: DiskUse | None = None
    studies: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    instances: int = 0
    image_bytes: int = 0
    result_folders: int = 0
    result_bytes: int = 0
    outbox_rows: int = 0
    hl7_rows: int = 0
    audit_rows: int = 0
    batches: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "disk_before": self.disk_before.as_dict(),
            "disk_after": self.disk_after.as_dict() if self.disk_after else None,
            "studies": self.studies,
            "skipped": self.skipped,
            "instances": self.instances,
            "image_bytes": self.image_bytes,
            "result_folders": self.result_folders,
            "result_bytes": self.result_bytes,
            "outbox_rows": self.outbox_rows,
            "hl7_rows": self.hl7_rows,
            "audit_rows": self.audit_rows,
            "batches": self.batches,
        }


def plan(settings: Settings, factory: sessionmaker[Session], now: datetime | None = None) -> Plan:
    """What a run would delete now (``triage-node retention --dry-run``)."""
    policy = Policy.from_settings(settings)
    with factory() as session:
        return make_plan(session, policy, disk_use(settings, session), now)


def run(settings: Settings, factory: sessionmaker[Session], now: datetime | None = None) -> RunReport:
    """Delete what is due: studies by age, then by disk use, result files, outbox rows, audit rows."""
    now = now or utcnow()
    policy = Policy.from_settings(settings)
    cleaner = _Cleaner(settings, factory, policy, now)
    todo = plan(settings, factory, now)
    report = cleaner.report = RunReport(disk_before=todo.disk)
    for i in range(0, len(todo.by_age), policy.batch_studies):
        cleaner.delete_studies(todo.by_age[i:i + policy.batch_studies], by_age=True)
    cleaner.relieve_disk()
    done = {s["study_uid"] for s in report.studies}
    cleaner.delete_result_files([r for r in todo.results if r.study_uid not in done])
    cleaner.delete_delivered_outbox()
    if todo.audit_before is not None:
        cleaner.prune_audit(todo.audit_before)
    with factory() as session:
        report.disk_after = disk_use(settings, session)
    return report


class _Cleaner:
    def __init__(self, settings: Settings, factory: sessionmaker[Session], policy: Policy, now: datetime) -> None:
        self.settings, self.factory, self.policy, self.now = settings, factory, policy, now
        self.results_root = settings.data_dir.resolve() / "results"
        self.report: RunReport

    # -- studies ---------------------------------------------------------------------
    def relieve_disk(self) -> None:
        """While the disk is above the high watermark, delete the oldest finished studies
        until it is under the low one, re-measuring after each batch."""
        tried: set[int] = set()
        with self.factory() as session:
            disk = disk_use(self.settings, session)
        if disk.percent <= self.policy.disk_high_percent:
            return
        while disk.percent > self.policy.disk_low_percent:
            with self.factory() as session:
                candidates = [v for v in study_verdicts(session, self.policy, self.now)
                              if v.finished and v.study_id not in tried]
            if not candidates:
                log.warning("retention: disk above its watermark and nothing finished left to delete",
                            percent=round(disk.percent, 1), basis=disk.basis)
                return
            need, batch = disk.bytes_above(self.policy.disk_low_percent), []
            for v in candidates[: self.policy.batch_studies]:
                batch.append(v)
                need -= v.size_bytes
                if need <= 0:
                    break
            tried.update(v.study_id for v in batch)
            reason = (f"disk {disk.percent:.1f}% of {disk.basis} above "
                      f"{self.policy.disk_high_percent:g}%, oldest finished first")
            self.delete_studies(batch, by_age=False, reason=reason)
            with self.factory() as session:
                disk = disk_use(self.settings, session)

    def delete_studies(self, batch: list[StudyVerdict], *, by_age: bool, reason: str | None = None) -> None:
        cutoff = Policy.cutoff(self.now, self.policy.instances_days)
        gone: list[dict[str, Any]] = []
        rows: dict[str, int] = {}
        with transaction(self.factory) as session:
            locking = session.get_bind().dialect.name == "postgresql"
            for planned in batch:
                if locking:  # two schedulers (two beats) must not both delete and audit a study
                    session.execute(select(Study.id).where(Study.id == planned.study_id).with_for_update())
                fresh = recheck(session, self.policy, planned.study_id, self.now)
                if fresh is None or not fresh.finished or (
                    by_age and (cutoff is None or fresh.last_received_at > cutoff)
                ):
                    why = fresh.reason if fresh is not None else "already gone"
                    self.report.skipped.append({"study_uid": planned.study_uid, "reason": why or "newer images"})
                    continue
                try:
                    with session.begin_nested():
                        counts, folders = _delete_study_rows(session, fresh.study_id)
                        session.flush()
                        self._remove_study_files(fresh.study_uid, folders)
                except OSError as exc:
                    log.error("retention: study files not removed; kept for the next run",
                              study_uid=fresh.study_uid, error=str(exc))
                    self.report.skipped.append({"study_uid": fresh.study_uid, "reason": f"files: {exc}"})
                    continue
                for table, n in counts.items():
                    rows[table] = rows.get(table, 0) + n
                gone.append({"study_uid": fresh.study_uid, "instances": fresh.instances,
                             "size_bytes": fresh.size_bytes, "reason": reason or planned.reason})
            if gone:
                audit.record(
                    session, ACTION, actor=ACTOR, kind="studies", studies=len(gone),
                    study_uids=[g["study_uid"] for g in gone],
                    instances=sum(g["instances"] for g in gone),
                    bytes=sum(g["size_bytes"] for g in gone),
                    rows=rows, reason=reason or f"older than {self.policy.instances_days} days",
                )
        if gone:
            self.report.studies.extend(gone)
            self.report.instances += sum(g["instances"] for g in gone)
            self.report.image_bytes += sum(g["size_bytes"] for g in gone)
            self.report.batches += 1
            log.info(ACTION, kind="studies", studies=len(gone), bytes=sum(g["size_bytes"] for g in gone))

    def _remove_study_files(self, study_uid: str, result_folders: list[str]) -> None:
        try:
            folder = self.settings.spool_dir / validate_uid(study_uid, "StudyInstanceUID")
        except InvalidUID:
            folder = None  # never stored under a path (refused at the door)
        if folder is not None and folder.exists():
            shutil.rmtree(folder)
        for out in result_folders:
            self._remove_result_folder(out)

    def _remove_result_folder(self, out: str) -> int:
        """Remove one results/<job> folder; returns its bytes. Refuses paths outside results/."""
        path = Path(out).resolve()
        if not path.is_relative_to(self.results_root) or path == self.results_root:
            raise OSError(f"{out} is outside {self.results_root}")
        if not path.exists():
            return 0
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        shutil.rmtree(path)
        return size

    # -- result files, outbox rows, audit rows ---------------------------------------------
    def delete_result_files(self, results: list[ResultFiles]) -> None:
        for i in range(0, len(results), self.policy.batch_studies):
            batch, done, size = results[i:i + self.policy.batch_studies], [], 0
            with transaction(self.factory) as session:
                for r in batch:
                    try:
                        with session.begin_nested():
                            session.execute(update(Result).where(Result.id == r.result_id)
                                            .values(files_deleted_at=self.now))
                            size += self._remove_result_folder(r.output_dir)
                    except OSError as exc:
                        log.error("retention: result files not removed", job_id=r.job_id, error=str(exc))
                        continue
                    done.append(r)
                if done:
                    audit.record(
                        session, ACTION, actor=ACTOR, kind="results", folders=len(done),
                        job_ids=[r.job_id for r in done], study_uids=sorted({r.study_uid for r in done}),
                        bytes=size, reason=f"older than {self.policy.results_days} days, delivered",
                    )
            if done:
                self.report.result_folders += len(done)
                self.report.result_bytes += size
                self.report.batches += 1
                log.info(ACTION, kind="results", folders=len(done), bytes=size)

    def delete_delivered_outbox(self) -> None:
        cutoff = Policy.cutoff(self.now, self.policy.outbox_days)
        if cutoff is None:
            return
        with transaction(self.factory) as session:
            counts = {}
            for model, name in ((OutboxItem, "outbox"), (HL7OutboxItem, "hl7_outbox")):
                counts[name] = _rowcount(session.execute(
                    delete(model).where(*delivered_before(model, cutoff))
                    .execution_options(synchronize_session=False)
                ))
            if any(counts.values()):
                audit.record(session, ACTION, actor=ACTOR, kind="outbox", rows=counts,
                             reason=f"delivered more than {self.policy.outbox_days} days ago")
        if any(counts.values()):
            self.report.outbox_rows += counts["outbox"]
            self.report.hl7_rows += counts["hl7_outbox"]
            self.report.batches += 1
            log.info(ACTION, kind="outbox", **counts)

    def prune_audit(self, before: datetime) -> None:
        """Delete audit rows older than ``before``: the trigger lets them go only inside
        this transaction, after the row that records the pruning (migration 0007)."""
        with transaction(self.factory) as session:
            ids = (select(AuditEvent.id).where(AuditEvent.at < before).order_by(AuditEvent.id)
                   .limit(AUDIT_PRUNE_LIMIT).scalar_subquery())
            count = session.scalar(select(func.count()).select_from(AuditEvent).where(AuditEvent.id.in_(ids)))
            if not count:
                return
            audit.record(session, ACTION, actor=ACTOR, kind="audit", rows={"audit_events": count},
                         before=before.isoformat(timespec="seconds"),
                         reason=f"older than {self.policy.audit_days} days")
            session.flush()
            if session.get_bind().dialect.name == "postgresql":
                session.execute(text("SELECT set_config('triage.audit_prune_before', :v, true)"),
                                {"v": before.isoformat()})
            else:
                session.execute(insert(AuditPruneGate).values(id=1, before=before))
            session.execute(delete(AuditEvent).where(AuditEvent.id.in_(ids), AuditEvent.at < before))
            if session.get_bind().dialect.name != "postgresql":
                session.execute(delete(AuditPruneGate))
        self.report.audit_rows += count
        self.report.batches += 1
        log.info(ACTION, kind="audit", rows=count)


def _delete_study_rows(session: Session, study_id: int) -> tuple[dict[str, int], list[str]]:
    """Every row of one study, children first; returns counts per table and its result folders."""
    uid = session.scalar(select(Study.study_uid).where(Study.id == study_id))
    jobs = select(Job.id).where(Job.study_id == study_id).scalar_subquery()
    series = select(Series.id).where(Series.study_id == study_id).scalar_subquery()
    folders = [f for f in session.scalars(select(Result.output_dir).where(
        Result.study_id == study_id, Result.output_dir.is_not(None), Result.files_deleted_at.is_(None)))
        if f is not None]
    counts: dict[str, int] = {}
    for name, stmt in (
        ("outbox", delete(OutboxItem).where(or_(OutboxItem.study_uid == uid, OutboxItem.job_id.in_(jobs)))),
        ("hl7_outbox", delete(HL7OutboxItem).where(
            or_(HL7OutboxItem.study_uid == uid, HL7OutboxItem.job_id.in_(jobs)))),
        ("results", delete(Result).where(Result.study_id == study_id)),
        ("worklist", delete(WorklistEntry).where(WorklistEntry.study_id == study_id)),
        ("jobs", delete(Job).where(Job.study_id == study_id)),
        ("instances", delete(Instance).where(Instance.series_id.in_(series))),
        ("series", delete(Series).where(Series.study_id == study_id)),
        ("studies", delete(Study).where(Study.id == study_id)),
    ):
        counts[name] = _rowcount(session.execute(stmt.execution_options(synchronize_session=False)))
    return counts, folders


def _rowcount(result: RowsResult[Any]) -> int:
    """Rows a DELETE matched. Its result is a CursorResult; Session.execute is typed as returning Result."""
    return cast(CursorResult[Any], result).rowcount or 0
