"""When is a series complete, and what happens then.

A DICOM sender never says "this series is finished" (PS3.4 Annex B has no such
message), so the node decides:

* **Fast path**, at association release (`CompletenessTracker.association_finished`):
  the series is complete when its InstanceNumbers (0020,0013) are contiguous, its
  slice positions (ImagePositionPatient projected on the slice normal, PS3.3
  C.7.6.2.1.1) are evenly spaced, and the count equals NumberOfSeriesRelatedInstances
  (0020,1209) / ImagesInAcquisition (0020,1002) where the sender gave one.
* **Stability timer** otherwise (`check_stable`, run by `run_in_thread`): complete
  after ``settings.stability_seconds`` without a new instance.

On completion the study's complete series go through `select_series`; the selected
one gets a `Job` row (committed), and only then is the job enqueued. A late instance
after a job exists makes a new job version; the old job becomes ``superseded``; both
are audited. Timestamps for the product's main figure (last instance to enqueue) are
kept on the job: ``last_instance_at``, ``series_complete_at``, ``enqueued_at``
(read back by ``triage_node.studies.latency``). The fast-path test itself is
``triage_node.studies.fast_path``.

Thread-safety: the SCP calls `instance_stored` and `association_finished` from its
association threads and the timer runs in its own thread; the pending set has its own
lock and completions are serialised by another, so no series is completed twice at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from triage_node.config import Settings
from triage_node.db import audit
from triage_node.db.models import (
    Instance,
    Job,
    JobState,
    SelectionDecision,
    Series,
    SeriesState,
    Study,
    WorklistEntry,
)
from triage_node.db.session import transaction
from triage_node.jobs import create_version
from triage_node.logs import get_logger
from triage_node.queue import JobEnqueuer, choose_queue, make_client
from triage_node.studies.fast_path import SeriesStats, fast_path_complete, series_stats
from triage_node.studies.geometry import slice_spacing
from triage_node.studies.selection import select_series
from triage_node.studies.selection_rules import SelectionRules, load_rules
from triage_node.timeutil import as_utc, utcnow
from triage_node.worklist.priority import compute_priority

log = get_logger(__name__)

ACTOR = "node"
#: Job states that a new version supersedes.
ACTIVE_JOB_STATES = (JobState.queued, JobState.running, JobState.done)

Enqueuer = Callable[[list[int]], Any]



@dataclass
class Completion:
    """What one completion did (for callers and tests)."""

    series_uid: str
    completed: bool
    reason: str
    job_ids: list[int] = field(default_factory=list)
    superseded: list[int] = field(default_factory=list)


class CompletenessTracker:
    """Decide when series are complete, select, create jobs and enqueue them.

    Parameters
    ----------
    settings : Settings
        ``stability_seconds``, ``selection_rules``, ``stat_calling_aes`` are used.
    session_factory : sessionmaker
        Database sessions.
    enqueuer : callable, optional
        Called with the list of new job ids after their transaction committed;
        default a `JobEnqueuer` on `make_client(settings)`.
    rules : SelectionRules, optional
        Default: loaded from ``settings.selection_rules`` (or the shipped file).
    """

    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        enqueuer: Enqueuer | None = None,
        *,
        rules: SelectionRules | None = None,
    ) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.enqueuer: Enqueuer = enqueuer or JobEnqueuer(session_factory, make_client(settings))
        self._rules = rules
        self._pending: dict[str, float] = {}
        self._pending_lock = threading.Lock()
        self._complete_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def rules(self) -> SelectionRules:
        return self._rules or load_rules(self.settings.selection_rules)

    # -- notifications from ingest -----------------------------------------------
    def instance_stored(self, series_uid: str) -> None:
        """An instance of ``series_uid`` was committed (cheap: called per C-STORE)."""
        with self._pending_lock:
            self._pending[series_uid] = time.monotonic()

    def pending(self) -> list[str]:
        """Series waiting for completion."""
        with self._pending_lock:
            return sorted(self._pending)

    def association_finished(self, series_uids: Iterable[str]) -> list[Completion]:
        """Fast path at association release (or at the end of a STOW-RS request)."""
        results = []
        for series_uid in sorted(set(series_uids)):
            with self.session_factory() as session:
                series = session.scalar(select(Series).where(Series.series_uid == series_uid))
                if series is None:
                    continue
                stats = series_stats(session, series.id)
                ready, why = fast_path_complete(stats, series.expected_instances)
            if ready:
                results.append(self.complete_series(series_uid, "fast_path", detail=why))
            else:
                with self._pending_lock:
                    self._pending.setdefault(series_uid, time.monotonic())
                log.info("series.fast_path_declined", series_uid=series_uid, why=why)
                results.append(Completion(series_uid, completed=False, reason=why))
        return results

    # -- stability timer ---------------------------------------------------------------
    def check_stable(self, now: datetime | None = None) -> list[Completion]:
        """Complete pending series with no new instance for ``stability_seconds``.

        Parameters
        ----------
        now : datetime, optional
            Current time (UTC); tests pass a later time instead of sleeping.
        """
        now = now or utcnow()
        quiet = timedelta(seconds=self.settings.stability_seconds)
        results = []
        for series_uid in self.pending():
            with self.session_factory() as session:
                last = session.scalar(
                    select(func.max(Instance.received_at))
                    .join(Series, Series.id == Instance.series_id)
                    .where(Series.series_uid == series_uid)
                )
            last = as_utc(last)
            if last is None:
                with self._pending_lock:
                    self._pending.pop(series_uid, None)
                continue
            if now - last >= quiet:
                results.append(self.complete_series(series_uid, "stable"))
        return results

    def recover(self) -> list[str]:
        """After a restart: put series still receiving, or with late instances, back to pending."""
        with self.session_factory() as session:
            receiving = session.scalars(
                select(Series.series_uid).where(Series.state == SeriesState.receiving)
            ).all()
            late = session.scalars(
                select(Series.series_uid)
                .join(Instance, Instance.series_id == Series.id)
                .where(Series.state == SeriesState.complete)
                .group_by(Series.id, Series.series_uid, Series.completed_at)
                .having(func.max(Instance.received_at) > Series.completed_at)
            ).all()
        found = sorted({*receiving, *late})
        with self._pending_lock:
            for uid in found:
                self._pending.setdefault(uid, time.monotonic())
        if found:
            log.info("completeness.recovered", series=len(found))
        return found

    def run_in_thread(self, interval: float = 0.25) -> threading.Thread:
        """Start the timer thread (stability checks; jobs the broker did not take are the beat's `worker.reconcile`)."""
        if self._thread is not None and self._thread.is_alive():
            return self._thread
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._loop, args=(interval,), name="completeness-timer", daemon=True
        )
        self._thread.start()
        return self._thread

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self, interval: float) -> None:
        self.recover()
        while not self._stop.wait(interval):
            try:
                self.check_stable()
            except Exception:  # noqa: BLE001 - the timer must survive a database hiccup
                log.exception("completeness.timer_error")

    # -- completion --------------------------------------------------------------------
    def complete_series(self, series_uid: str, reason: str, detail: str = "") -> Completion:
        """Mark a series complete, run selection on its study, create and enqueue jobs."""
        with self._complete_lock:
            with self._pending_lock:
                self._pending.pop(series_uid, None)
            with transaction(self.session_factory) as session:
                result = self._complete_in(session, series_uid, reason, detail)
        if result.job_ids:
            self.enqueuer(list(result.job_ids))
        return result

    def _complete_in(
        self, session: Session, series_uid: str, reason: str, detail: str
    ) -> Completion:
        query = select(Series).where(Series.series_uid == series_uid)
        if session.get_bind().dialect.name == "postgresql":
            query = query.with_for_update()
        series = session.scalar(query)
        if series is None:
            return Completion(series_uid, completed=False, reason="unknown series")
        stats = series_stats(session, series.id)
        completed_at = as_utc(series.completed_at)
        already = series.state == SeriesState.complete
        if already and (
            stats.last_received_at is None or completed_at is None
            or stats.last_received_at <= completed_at
        ):
            return Completion(series_uid, completed=False, reason="already complete")
        now = utcnow()
        series.state = SeriesState.complete
        series.completed_at = now
        series.completion_reason = reason
        # Recomputed at each completion: late instances may fill or break the spacing.
        series.slice_spacing, series.slice_spacing_deviation = slice_spacing(stats.positions)
        study = session.get(Study, series.study_id)
        assert study is not None  # the series' foreign key, read in this transaction
        audit.record(
            session, "series.complete", actor=ACTOR, study_uid=study.study_uid,
            series_uid=series_uid, reason=reason, detail=detail, instances=stats.count,
            late=already,
        )
        log.info("series.complete", series_uid=series_uid, reason=reason,
                 instances=stats.count, late=already)
        result = Completion(series_uid, completed=True, reason=reason)
        chosen = self._select(session, study)
        if chosen is not None:
            self._job_for(session, study, chosen, stats if chosen is series else None, result)
        return result

    def _select(self, session: Session, study: Study) -> Series | None:
        complete = session.scalars(
            select(Series)
            .where(Series.study_id == study.id, Series.state == SeriesState.complete)
            .order_by(Series.id)
        ).all()
        chosen = None
        for series, decision, why in select_series(study, complete, self.rules):
            if decision is SelectionDecision.selected:
                chosen = series
            if (series.selection, series.selection_reason) == (decision.value, why):
                continue
            series.selection = decision.value
            series.selection_reason = why
            audit.record(
                session, f"series.{decision.value}", actor=ACTOR, study_uid=study.study_uid,
                series_uid=series.series_uid, reason=why,
                series_number=series.series_number,
            )
            log.info(f"series.{decision.value}", series_uid=series.series_uid, reason=why)
        return chosen

    def _job_for(
        self,
        session: Session,
        study: Study,
        chosen: Series,
        stats: SeriesStats | None,
        result: Completion,
    ) -> None:
        stats = stats or series_stats(session, chosen.id)
        last = stats.last_received_at
        active = session.scalars(
            select(Job).where(Job.study_id == study.id, Job.state.in_(ACTIVE_JOB_STATES))
        ).all()
        current = [j for j in active if j.series_id == chosen.id]
        others = [j for j in active if j.series_id != chosen.id]
        if current and not others and all(
            last is None or (as_utc(j.last_instance_at) or last) >= last for j in current
        ):
            return  # the selected series already has a job that saw every instance
        version = (
            session.scalar(select(func.max(Job.version)).where(Job.series_id == chosen.id)) or 0
        ) + 1
        queue, queue_reason = choose_queue(self.settings, session, chosen)
        why = "late instances" if current else ("another series selected" if others else "new")
        job, superseded = create_version(
            session, study=study, series=chosen, version=version, queue=queue,
            queue_reason=queue_reason, reason=why, actor=ACTOR, supersede=active,
            last_instance_at=last, series_complete_at=as_utc(chosen.completed_at),
            created_at=utcnow(),
        )
        result.superseded.extend(superseded)
        if session.scalar(select(WorklistEntry.id).where(WorklistEntry.study_id == study.id)) is None:
            # The study joins the reading list as soon as it is triaged, not only once a
            # result exists: a STAT order without a result must be visible too.
            compute_priority(session, study.id, self.settings, actor=ACTOR, reason="study received")
        log.info("job.created", job_id=job.id, version=version, queue=queue,
                 series_uid=chosen.series_uid, reason=why)
        result.job_ids.append(job.id)
