"""Filing an instance under its study and series, and refusing one that belongs elsewhere.

A series belongs to one study and a study to one patient (PS3.3 C.7.3.1, C.7.2.1). The
first instance of a study or series creates its row (first instance wins); a later
instance whose SeriesInstanceUID is filed under another StudyInstanceUID, or whose
StudyInstanceUID is filed under another PatientID, is refused with
`FILED_ELSEWHERE` and audited: filing it would put one patient's image in another's
series, and the worklist, the model and the report would then mix them.

Refused, not quarantined: the sender gets a failure status at once and keeps the object
(a C-STORE failure or a STOW-RS Failed SOP item), and nothing half-filed has to be
cleaned up later; the audit row and the log name the conflict, never the values.

Only PatientID identifies the patient here. PatientName and PatientBirthDate are not
compared: one site's systems write a name differently (component order, case, ``^``
against a space), and birth date is Type 2, empty in some objects of a study.
IssuerOfPatientID is not compared either, since the study row does not keep it.

The same check runs whether the series is in the store's cache or read from the
database (`FilingCache` keeps what the database said, for the series seen lately).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from triage_node.db.models import Series, Study
from triage_node.ingest.header import (
    DATASET_DOES_NOT_MATCH_SOP_CLASS,
    Header,
    Refused,
    float_value,
    int_value,
    requested_priority,
    series_geometry,
    text_value,
)

__all__ = ["FILED_ELSEWHERE", "Filing", "FilingCache", "file_series"]

#: Error: Data Set does not match SOP Class (A900-A9FF, PS3.4 Table B.2-1): the status
#: for a data set that contradicts what is already stored, as for the other
#: inconsistencies the store finds.
FILED_ELSEWHERE = DATASET_DOES_NOT_MATCH_SOP_CLASS
#: Series kept in `FilingCache` before it starts over.
CACHE_LIMIT = 10_000


def patient_key(header: Header) -> str | None:
    """PatientID as the study row keeps it (stripped, at most 64 characters, None if empty)."""
    return text_value(header.ds, "PatientID")


@dataclass(frozen=True)
class Filing:
    """Where a series is filed: its row, its study and that study's PatientID."""

    series_id: int
    study_uid: str
    patient_id: str | None

    def check(self, header: Header) -> None:
        """Refuse ``header`` with `FILED_ELSEWHERE` when it belongs to another study or patient."""
        if header.study_uid != self.study_uid:
            raise Refused(FILED_ELSEWHERE, "SeriesInstanceUID is already filed under another study")
        # Same study: the same check, and the same reason, as when the rows are read.
        _check_patient(self.patient_id, header)


def _check_patient(filed: str | None, header: Header) -> None:
    if patient_key(header) != filed:
        raise Refused(FILED_ELSEWHERE, "StudyInstanceUID is already filed under another patient")


class FilingCache:
    """Recently filed series by SeriesInstanceUID (study and series rows are never deleted).

    Entries are added only after their rows are committed.
    """

    def __init__(self, limit: int = CACHE_LIMIT) -> None:
        self._limit = limit
        self._filed: dict[str, Filing] = {}
        self._lock = threading.Lock()

    def get(self, series_uid: str) -> Filing | None:
        return self._filed.get(series_uid)

    def put(self, series_uid: str, filing: Filing) -> None:
        with self._lock:
            if len(self._filed) >= self._limit:
                self._filed.clear()
            self._filed[series_uid] = filing


def _insert_ignore(session: Session, model: type, **values: Any) -> None:
    """INSERT ... ON CONFLICT DO NOTHING on the model's unique UID column."""
    dialect = session.get_bind().dialect.name
    stmt: postgresql.Insert | sqlite.Insert
    if dialect == "postgresql":
        stmt = postgresql.insert(model).values(**values).on_conflict_do_nothing()
    elif dialect == "sqlite":
        stmt = sqlite.insert(model).values(**values).on_conflict_do_nothing()
    else:  # pragma: no cover - only the two engines the node supports
        raise RuntimeError(f"unsupported database dialect {dialect}")
    session.execute(stmt)


def file_series(
    session: Session,
    header: Header,
    calling_ae: str,
    source: str,
    expected: int | None,
    now: datetime,
) -> Filing:
    """Insert the Study and Series rows if missing (first instance wins) and check the
    instance against them.

    Raises
    ------
    Refused
        `FILED_ELSEWHERE` when the study is filed under another PatientID or the series
        under another study.
    """
    ds = header.ds
    _insert_ignore(
        session,
        Study,
        study_uid=header.study_uid,
        patient_name=text_value(ds, "PatientName", 324),
        patient_id=patient_key(header),
        accession_number=text_value(ds, "AccessionNumber"),
        study_date=text_value(ds, "StudyDate", 8),
        study_description=text_value(ds, "StudyDescription"),
        modality=text_value(ds, "Modality", 16),
        calling_ae=calling_ae[:16] if source == "dimse" else None,
        requested_priority=requested_priority(ds),
        received_at=now,
        updated_at=now,
    )
    study_id, patient_id = session.execute(
        select(Study.id, Study.patient_id).where(Study.study_uid == header.study_uid)
    ).one()
    _check_patient(patient_id, header)
    _insert_ignore(
        session,
        Series,
        study_id=study_id,
        series_uid=header.series_uid,
        modality=text_value(ds, "Modality", 16),
        series_number=int_value(ds, "SeriesNumber"),
        description=text_value(ds, "SeriesDescription"),
        body_part=text_value(ds, "BodyPartExamined"),
        protocol_name=text_value(ds, "ProtocolName"),
        image_type=text_value(ds, "ImageType", 128),
        convolution_kernel=text_value(ds, "ConvolutionKernel"),
        slice_thickness=float_value(ds, "SliceThickness"),
        window_width=float_value(ds, "WindowWidth"),  # a brain vs a bone window (selection)
        contrast_agent=text_value(ds, "ContrastBolusAgent"),
        sop_class_uid=header.sop_class_uid,
        **series_geometry(ds),
        expected_instances=expected,
        instance_count=0,
        state="receiving",
        first_received_at=now,
        last_received_at=now,
    )
    series_id, series_study_id = session.execute(
        select(Series.id, Series.study_id).where(Series.series_uid == header.series_uid)
    ).one()
    if series_study_id != study_id:
        raise Refused(FILED_ELSEWHERE, "SeriesInstanceUID is already filed under another study")
    return Filing(int(series_id), header.study_uid, patient_id)
