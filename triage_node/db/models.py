"""Table models (SQLAlchemy 2). The schema changes only through Alembic (``migrations/``).

Identifiers of the patient (name, ID, accession) are stored because the worklist
shows them to radiologists; they are never logged.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.sql.expression import false

from triage_node import QUEUE_ROUTINE
from triage_node.timeutil import utcnow


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}

    if TYPE_CHECKING:
        # Every model here maps one plain Table (declarative types it as any FromClause).
        __table__: ClassVar[Table]


def _ts(nullable: bool = True) -> Any:
    return mapped_column(DateTime(timezone=True), nullable=nullable)


class SeriesState(StrEnum):
    receiving = "receiving"
    complete = "complete"


class SelectionDecision(StrEnum):
    selected = "selected"
    rejected = "rejected"


class JobState(StrEnum):
    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"
    superseded = "superseded"


class OutboxState(StrEnum):
    pending = "pending"
    delivered = "delivered"
    dead = "dead"  # gave up: peer unreachable for delivery_max_attempts tries
    refused = "refused"  # gave up: peer refused the object (DIMSE failure status, HTTP 4xx)


class WorklistStatus(StrEnum):
    new = "new"
    reading = "reading"
    done = "done"


class PriorityClass(StrEnum):
    """Ordered from most to least urgent (see ``triage_node.worklist``)."""

    stat_ai = "STAT-AI"
    stat_order = "STAT-order"
    routine = "routine"


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True)
    patient_name: Mapped[str | None] = mapped_column(String(324))
    patient_id: Mapped[str | None] = mapped_column(String(64))
    accession_number: Mapped[str | None] = mapped_column(String(64))
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_description: Mapped[str | None] = mapped_column(String(64))
    modality: Mapped[str | None] = mapped_column(String(16))
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    requested_priority: Mapped[str | None] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )
    # Retention never deletes a study on hold (``triage-node retention hold``).
    legal_hold: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    series: Mapped[list[Series]] = relationship(back_populates="study", order_by="Series.id")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_uid: Mapped[str] = mapped_column(String(64), unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    description: Mapped[str | None] = mapped_column(String(64))
    body_part: Mapped[str | None] = mapped_column(String(64))
    protocol_name: Mapped[str | None] = mapped_column(String(64))
    image_type: Mapped[str | None] = mapped_column(String(128))
    convolution_kernel: Mapped[str | None] = mapped_column(String(64))
    slice_thickness: Mapped[float | None] = mapped_column(Float)
    contrast_agent: Mapped[str | None] = mapped_column(String(64))
    # WindowWidth (0028,1051), first value: a brain window vs a bone window (selection).
    window_width: Mapped[float | None] = mapped_column(Float)
    # Geometry of the first instance (PS3.3 C.7.6.2, C.7.6.3): series selection decides
    # from it when ImageType is absent (de-identified exports).
    image_orientation: Mapped[str | None] = mapped_column(String(128))
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    pixel_spacing_row: Mapped[float | None] = mapped_column(Float)
    pixel_spacing_column: Mapped[float | None] = mapped_column(Float)
    # From the instances' slice positions, at completion: median gap between slices and
    # the largest departure of a gap from it, in mm.
    slice_spacing: Mapped[float | None] = mapped_column(Float)
    slice_spacing_deviation: Mapped[float | None] = mapped_column(Float)
    # DerivationCodeSequence (0008,9215) as "scheme:value" codes and LossyImageCompression
    # (0028,2110) "01" as its method: an image DERIVED only by lossy compression.
    derivation_codes: Mapped[str | None] = mapped_column(String(128))
    lossy_compression: Mapped[str | None] = mapped_column(String(64))
    sop_class_uid: Mapped[str | None] = mapped_column(String(64))
    expected_instances: Mapped[int | None] = mapped_column(Integer)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(16), default=SeriesState.receiving)
    first_received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    completed_at: Mapped[datetime | None] = _ts()
    completion_reason: Mapped[str | None] = mapped_column(String(64))
    selection: Mapped[str | None] = mapped_column(String(16))
    selection_reason: Mapped[str | None] = mapped_column(Text)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    """One stored object. A different object under a known SOP Instance UID is a new version."""

    __tablename__ = "instances"
    __table_args__ = (UniqueConstraint("sop_uid", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_uid: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[int] = mapped_column(Integer, default=1)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax: Mapped[str] = mapped_column(String(64))
    instance_number: Mapped[int | None] = mapped_column(Integer)
    slice_position: Mapped[float | None] = mapped_column(Float)
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    source: Mapped[str] = mapped_column(String(16), default="dimse")  # dimse | stow
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    series: Mapped[Series] = relationship(back_populates="instances")


class Job(Base):
    """One triage run of one series. A late instance makes a new version of the job."""

    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("series_id", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    version: Mapped[int] = mapped_column(Integer, default=1)
    state: Mapped[str] = mapped_column(String(16), default=JobState.queued, index=True)
    queue: Mapped[str] = mapped_column(String(16), default=QUEUE_ROUTINE)
    task_id: Mapped[str | None] = mapped_column(String(64))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    # Stage timestamps (the product's main figures come from these).
    last_instance_at: Mapped[datetime | None] = _ts()
    series_complete_at: Mapped[datetime | None] = _ts()
    enqueued_at: Mapped[datetime | None] = _ts()
    started_at: Mapped[datetime | None] = _ts()
    inferred_at: Mapped[datetime | None] = _ts()
    reported_at: Mapped[datetime | None] = _ts()
    delivered_at: Mapped[datetime | None] = _ts()
    finished_at: Mapped[datetime | None] = _ts()
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    result: Mapped[Result | None] = relationship(back_populates="job", uselist=False)


class Result(Base):
    """What one job found and wrote. One row per job (idempotent by job id)."""

    __tablename__ = "results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(32))
    device_uid: Mapped[str] = mapped_column(String(64))
    operating_point: Mapped[str] = mapped_column(String(32))
    positive: Mapped[bool] = mapped_column(Boolean)
    study_probabilities: Mapped[dict[str, Any]] = mapped_column(JSON)
    decisions: Mapped[dict[str, Any]] = mapped_column(JSON)
    slice_probabilities: Mapped[list[Any]] = mapped_column(JSON)
    key_slices: Mapped[dict[str, Any]] = mapped_column(JSON)
    sr_sop_uid: Mapped[str | None] = mapped_column(String(64))
    sr_series_uid: Mapped[str | None] = mapped_column(String(64))
    overlay_series_uid: Mapped[str | None] = mapped_column(String(64))
    overlay_sop_uids: Mapped[list[Any]] = mapped_column(JSON, default=list)
    output_dir: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # Set when retention removed the SR/SC files; the finding itself stays.
    files_deleted_at: Mapped[datetime | None] = _ts()

    job: Mapped[Job] = relationship(back_populates="result")


class OutboxItem(Base):
    """One object to deliver to one destination."""

    __tablename__ = "outbox"
    __table_args__ = (UniqueConstraint("sop_uid", "destination"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), index=True)
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    sop_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    destination: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(String(16), default="result")  # result | routing
    state: Mapped[str] = mapped_column(String(16), default=OutboxState.pending, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    delivered_at: Mapped[datetime | None] = _ts()


class HL7OutboxItem(Base):
    """One HL7 v2 message to the RIS, kept as sent so that every retry repeats its MSH-10.

    It carries patient identifiers (PID) like the studies table; never logged.
    """

    __tablename__ = "hl7_outbox"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), index=True)
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    message_type: Mapped[str] = mapped_column(String(16))  # ORM^O01 | ORU^R01
    control_id: Mapped[str] = mapped_column(String(20), unique=True)
    # One message per job and type, so a re-run job does not tell the RIS twice; none for
    # a person's priority change, each of which is sent.
    dedup_key: Mapped[str | None] = mapped_column(String(96), unique=True)
    trigger: Mapped[str] = mapped_column(String(32), default="result")
    message: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), default=OutboxState.pending, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    ack_code: Mapped[str | None] = mapped_column(String(2))
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    delivered_at: Mapped[datetime | None] = _ts()

class WorklistEntry(Base):
    __tablename__ = "worklist"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), unique=True)
    status: Mapped[str] = mapped_column(String(16), default=WorklistStatus.new, index=True)
    priority_class: Mapped[str] = mapped_column(String(16), default=PriorityClass.routine)
    score: Mapped[float] = mapped_column(Float, default=0.0)
    manual_priority_class: Mapped[str | None] = mapped_column(String(16))
    manual_set_by: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )

    study: Mapped[Study] = relationship()


class AuditEvent(Base):
    """Append-only: the code has no update or delete path for this table."""

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_at_action", "at", "action"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64))
    outcome: Mapped[str] = mapped_column(String(16), default="ok")
    study_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    series_uid: Mapped[str | None] = mapped_column(String(64))
    sop_uid: Mapped[str | None] = mapped_column(String(64))
    job_id: Mapped[int | None] = mapped_column(Integer)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class AuditPruneGate(Base):
    """SQLite only: while retention prunes audit rows, the one row here says up to when.

    The DELETE trigger of ``audit_events`` lets a row go only when it is older than
    ``before``; the row exists only inside the pruning transaction (migration 0007).
    PostgreSQL uses the transaction-local setting ``triage.audit_prune_before`` instead.
    """

    __tablename__ = "audit_prune_gate"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    before: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = _ts()
