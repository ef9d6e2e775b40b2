"""What happened to one received object: the answer both doors give (C-STORE status, STOW-RS item)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from triage_node.dicom_status import StoreStatus
from triage_node.ingest.header import Header

__all__ = ["StoreOutcome"]

SUCCESS = StoreStatus.SUCCESS


@dataclass(frozen=True)
class StoreOutcome:
    """What happened to one received object.

    Attributes
    ----------
    status : int
        Storage Service Class status (PS3.4 Table B.2-1), one of this module's constants.
    study_uid, series_uid, sop_uid : str or None
        UIDs from the header (None when they could not be read or were invalid).
    stored : bool
        True when the object is on disk and in the database (new or duplicate).
    duplicate : bool
        True when the identical object was already stored (idempotent success).
    version : int
        Version of the stored object (1 for the first; 0 when nothing was stored).
    reason : str or None
        Why the object was refused; None on success.
    sop_class_uid : str or None
        SOP Class UID of the object, when known.
    path : Path or None
        Spool path of the stored version.
    """

    status: int
    study_uid: str | None
    series_uid: str | None
    sop_uid: str | None
    stored: bool
    duplicate: bool
    version: int
    reason: str | None = None
    sop_class_uid: str | None = None
    path: Path | None = None

    @property
    def ok(self) -> bool:
        return self.status == SUCCESS

    @classmethod
    def success(cls, header: Header, *, version: int, path: Path, duplicate: bool) -> StoreOutcome:
        """The object is on disk and in the database (new, or identical to a stored one)."""
        return cls(
            status=SUCCESS,
            study_uid=header.study_uid,
            series_uid=header.series_uid,
            sop_uid=header.sop_uid,
            stored=True,
            duplicate=duplicate,
            version=version,
            sop_class_uid=header.sop_class_uid,
            path=path,
        )
