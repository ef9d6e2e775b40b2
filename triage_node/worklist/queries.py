"""Read-side queries: the ordered worklist and one study's details.

The audit trail is read in ``triage_node.worklist.audit_trail``, and the objects the
worker wrote in ``triage_node.worklist.result_files``.

Ordering is done in SQL on SQLite and PostgreSQL alike: class rank first (a ``CASE``),
then the stored score plus ageing, then the waiting time. Ageing needs "seconds since
the study arrived", which each dialect spells differently; `epoch_seconds` compiles to
``EXTRACT(EPOCH FROM x)`` on PostgreSQL and to ``julianday`` arithmetic on SQLite
(where SQLAlchemy stores UTC timestamps as ISO text).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Float, Select, and_, case, func, literal, or_, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session, aliased
from sqlalchemy.sql.functions import FunctionElement

from triage_node import SUBTYPES
from triage_node.config import Settings
from triage_node.db.models import (
    Job,
    JobState,
    PriorityClass,
    Result,
    Series,
    Study,
    WorklistEntry,
)
from triage_node.timeutil import utcnow
from triage_node.worklist.priority_rules import CLASS_RANK


class epoch_seconds(FunctionElement):  # noqa: N801 - SQL function naming
    """Seconds since 1970-01-01 UTC of a timestamp column, in SQL."""

    type = Float()
    inherit_cache = True


@compiles(epoch_seconds, "postgresql")
def _epoch_pg(element: epoch_seconds, compiler: Any, **kw: Any) -> str:
    return f"EXTRACT(EPOCH FROM {compiler.process(element.clauses, **kw)})"


@compiles(epoch_seconds, "sqlite")
def _epoch_sqlite(element: epoch_seconds, compiler: Any, **kw: Any) -> str:
    return f"((julianday({compiler.process(element.clauses, **kw)}) - 2440587.5) * 86400.0)"


def _as_utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def class_rank_expr() -> Any:
    """SQL ``CASE`` giving each class its rank (0 = most urgent)."""
    return case(
        {name: rank for name, rank in CLASS_RANK.items()},
        value=WorklistEntry.priority_class,
        else_=len(CLASS_RANK),
    )


def effective_score_expr(settings: Settings, now: datetime) -> Any:
    """SQL expression: stored score + ageing_per_hour * hours since the study arrived."""
    now_epoch = _as_utc(now).timestamp()
    hours = (literal(now_epoch, Float()) - epoch_seconds(Study.received_at)) / 3600.0
    return WorklistEntry.score + literal(settings.ageing_per_hour, Float()) * hours


@dataclass(frozen=True)
class WorklistFilter:
    """Filters of ``GET /api/worklist`` (all optional)."""

    status: tuple[str, ...] = ()
    priority_class: tuple[str, ...] = ()
    since: datetime | None = None
    until: datetime | None = None
    modality: str | None = None
    #: Words matched (case-insensitive, in order) in the patient name, PatientID or accession.
    search: str | None = None
    #: ``any`` (AI positive), a subtype (decided positive), ``negative`` or ``pending``.
    finding: str | None = None
    #: One of `SORT_KEYS`; the priority order breaks ties and is the default.
    sort: str = "priority"
    descending: bool = False
    limit: int = 50
    offset: int = 0

    def __post_init__(self) -> None:
        if self.sort not in SORT_KEYS:
            raise ValueError(f"sort must be one of {', '.join(SORT_KEYS)}, not {self.sort!r}")
        if self.finding is not None and self.finding not in FINDINGS:
            raise ValueError(f"finding must be one of {', '.join(FINDINGS)}, not {self.finding!r}")


#: Columns the worklist sorts by (``WorklistFilter.sort``).
SORT_KEYS = ("priority", "patient", "accession", "study", "modality", "finding", "probability",
             "received", "waiting", "status")
#: Values of ``WorklistFilter.finding``.
FINDINGS = ("any", *SUBTYPES, "negative", "pending")


@dataclass
class WorklistRow:
    """One line of the worklist, with what the page and the API show."""

    entry: WorklistEntry
    study: Study
    effective_score: float
    waiting_seconds: float
    result: Result | None
    rank: int
    extras: dict[str, Any] = field(default_factory=dict)


def _latest_result_id() -> Any:
    """Correlated subquery: the id of the study's newest result whose job is not superseded
    (the row `latest_results` picks)."""
    inner, job = aliased(Result), aliased(Job)
    return (
        select(inner.id)
        .join(job, job.id == inner.job_id)
        .where(inner.study_id == Study.id, job.state != JobState.superseded.value)
        .order_by(inner.created_at.desc(), inner.id.desc())
        .limit(1)
        .correlate(Study)
        .scalar_subquery()
    )


def _like_pattern(text: str) -> str:
    """``%word1%word2%`` with LIKE's wildcards escaped: "novak adam" finds ``Novak^Adam``."""
    words = [w for w in text.lower().replace(",", " ").replace("^", " ").split() if w]
    escaped = [w.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") for w in words]
    return "%" + "%".join(escaped) + "%"


def _search_clause(text: str) -> Any:
    pattern = _like_pattern(text)
    return or_(*(func.lower(col).like(pattern, escape="\\")
                 for col in (Study.patient_name, Study.patient_id, Study.accession_number)))


def _finding_clause(finding: str) -> Any:
    if finding == "pending":
        return Result.id.is_(None)
    if finding == "negative":
        return and_(Result.id.is_not(None), Result.positive.is_(False))
    if finding == "any":
        return Result.positive.is_(True)
    return Result.decisions[finding].as_boolean().is_(True)


def _nulls_last(expr: Any) -> Any:
    # SQLite sorts NULL first and PostgreSQL last; say it once for both.
    return case((expr.is_(None), 1), else_=0)


def _status_rank() -> Any:
    return case({"new": 0, "reading": 1, "done": 2}, value=WorklistEntry.status, else_=3)


def _sort_keys(flt: WorklistFilter, eff: Any) -> list[Any]:
    """ORDER BY for ``flt.sort``; the priority order follows as the tie-break."""
    priority = [class_rank_expr(), eff.desc(), Study.received_at, WorklistEntry.id]
    if flt.sort == "priority":
        return [class_rank_expr().desc(), eff, Study.received_at.desc(), WorklistEntry.id.desc()] \
            if flt.descending else priority
    descending = flt.descending
    if flt.sort == "waiting":  # the longest wait is the earliest arrival
        descending = not descending
    p_any = Result.study_probabilities["any"].as_float()
    columns = {
        "patient": [Study.patient_name],
        "accession": [Study.accession_number],
        "study": [Study.study_description, Study.modality],
        "modality": [Study.modality],
        # Positive above negative; within each, by probability of ICH.
        "finding": [Result.positive, p_any],
        "probability": [p_any],
        "received": [Study.received_at],
        "waiting": [Study.received_at],
        "status": [_status_rank()],
    }[flt.sort]
    keys: list[Any] = []
    for col in columns:
        keys += [_nulls_last(col), col.desc() if descending else col]
    return keys + priority


def _needs_result(flt: WorklistFilter) -> bool:
    return flt.finding is not None or flt.sort in ("finding", "probability")


def worklist_select(settings: Settings, flt: WorklistFilter, now: datetime) -> Select[Any]:
    """The ordered, filtered worklist as a SQL statement (without pagination)."""
    eff = effective_score_expr(settings, now).label("effective_score")
    stmt = select(WorklistEntry, Study, eff).join(Study, Study.id == WorklistEntry.study_id)
    if _needs_result(flt):
        stmt = stmt.outerjoin(Result, Result.id == _latest_result_id())
    if flt.status:
        stmt = stmt.where(WorklistEntry.status.in_(flt.status))
    if flt.priority_class:
        stmt = stmt.where(WorklistEntry.priority_class.in_(flt.priority_class))
    if flt.since is not None:
        stmt = stmt.where(Study.received_at >= flt.since)
    if flt.until is not None:
        stmt = stmt.where(Study.received_at < flt.until)
    if flt.modality:
        stmt = stmt.where(Study.modality == flt.modality)
    if flt.search and flt.search.strip():
        stmt = stmt.where(_search_clause(flt.search))
    if flt.finding is not None:
        stmt = stmt.where(_finding_clause(flt.finding))
    return stmt.order_by(*_sort_keys(flt, eff))


def worklist_modalities(session: Session) -> list[str]:
    """Modalities of the studies on the worklist (the page's filter choices)."""
    stmt = (select(Study.modality).join(WorklistEntry, WorklistEntry.study_id == Study.id)
            .where(Study.modality.is_not(None)).distinct().order_by(Study.modality))
    return [m for m in session.scalars(stmt) if m]


def latest_results(session: Session, study_ids: list[int]) -> dict[int, Result]:
    """Per study, the newest result of a job that is not superseded."""
    if not study_ids:
        return {}
    stmt = (
        select(Result)
        .join(Job, Job.id == Result.job_id)
        .where(Result.study_id.in_(study_ids), Job.state != JobState.superseded.value)
        .order_by(Result.created_at, Result.id)
    )
    out: dict[int, Result] = {}
    for result in session.scalars(stmt):
        out[result.study_id] = result  # later rows win
    return out


def list_worklist(
    session: Session, settings: Settings, flt: WorklistFilter, now: datetime | None = None
) -> tuple[list[WorklistRow], int]:
    """Return one page of the ordered worklist and the total number of matching entries."""
    now = now or utcnow()
    stmt = worklist_select(settings, flt, now)
    total = session.scalar(select(func.count()).select_from(stmt.order_by(None).subquery())) or 0
    page = session.execute(stmt.limit(flt.limit).offset(flt.offset)).all()
    results = latest_results(session, [study.id for _, study, _ in page])
    rows = []
    for entry, study, eff in page:
        rows.append(
            WorklistRow(
                entry=entry,
                study=study,
                effective_score=float(eff),
                waiting_seconds=max(0.0, (now - _as_utc(study.received_at)).total_seconds()),
                result=results.get(study.id),
                rank=CLASS_RANK.get(entry.priority_class, len(CLASS_RANK)),
            )
        )
    return rows, int(total)


def worklist_row(
    session: Session, settings: Settings, entry: WorklistEntry, now: datetime | None = None
) -> WorklistRow:
    """The `WorklistRow` of one entry (after a change), computed as the list computes it."""
    now = now or utcnow()
    study = session.get(Study, entry.study_id)
    assert study is not None
    hours = max(0.0, (now - _as_utc(study.received_at)).total_seconds()) / 3600.0
    return WorklistRow(
        entry=entry,
        study=study,
        effective_score=entry.score + settings.ageing_per_hour * hours,
        waiting_seconds=hours * 3600.0,
        result=latest_results(session, [study.id]).get(study.id),
        rank=CLASS_RANK.get(entry.priority_class, len(CLASS_RANK)),
    )


@dataclass
class StudyDetail:
    """Everything ``GET /api/studies/{uid}`` and the study page show."""

    study: Study
    entry: WorklistEntry | None
    series: list[Series]
    jobs: list[Job]
    results: dict[int, Result]  # by job id


def study_detail(session: Session, study_uid: str) -> StudyDetail | None:
    """The study with its series, all job versions and their results; None if unknown."""
    study = session.scalars(select(Study).where(Study.study_uid == study_uid)).one_or_none()
    if study is None:
        return None
    entry = session.scalars(
        select(WorklistEntry).where(WorklistEntry.study_id == study.id)
    ).one_or_none()
    series = list(session.scalars(select(Series).where(Series.study_id == study.id).order_by(Series.id)))
    jobs = list(
        session.scalars(select(Job).where(Job.study_id == study.id).order_by(Job.series_id, Job.version))
    )
    results = {
        r.job_id: r for r in session.scalars(select(Result).where(Result.study_id == study.id))
    }
    return StudyDetail(study=study, entry=entry, series=series, jobs=jobs, results=results)


def job_state_counts(session: Session) -> dict[str, int]:
    """Number of jobs in each state (for ``/metrics``)."""
    return {state: int(n) for state, n in session.execute(select(Job.state, func.count()).group_by(Job.state))}


__all__ = [
    "FINDINGS",
    "SORT_KEYS",
    "PriorityClass",
    "StudyDetail",
    "WorklistFilter",
    "WorklistRow",
    "class_rank_expr",
    "epoch_seconds",
    "job_state_counts",
    "latest_results",
    "list_worklist",
    "study_detail",
    "worklist_modalities",
    "worklist_row",
    "worklist_select",
]
