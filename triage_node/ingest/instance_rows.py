"""The rows one received instance writes: Study/Series filing, the Instance row, its audit row.

Core statements built once (SQLAlchemy then reuses their compiled form), so that the
per-instance work is a few executes with parameters and a few hundred microseconds of
Python. Kept apart from ``triage_node.ingest.store``, which decides when the rows are
staged and committed (only once the file is durable) and what is answered: this is the
database side alone, and the same session carries it from staging to commit.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import Row, bindparam, func, select, update
from sqlalchemy.orm import Session

from triage_node.db import audit
from triage_node.db.models import Instance, Series
from triage_node.ingest.filing import Filing, FilingCache, file_series
from triage_node.ingest.header import Header, int_value, slice_position
from triage_node.timeutil import utcnow

__all__ = ["known_versions", "stage_rows", "stored_bytes"]

_INSTANCES = Instance.__table__
_SELECT_VERSIONS = select(_INSTANCES.c.version, _INSTANCES.c.sha256, _INSTANCES.c.path).where(
    _INSTANCES.c.sop_uid == bindparam("sop_uid")
)
_INSERT_INSTANCE = _INSTANCES.insert()


def _series_update(new_instance: bool, with_expected: bool) -> Any:
    table = Series.__table__
    values: dict[str, Any] = {"last_received_at": bindparam("now")}
    if new_instance:
        values["instance_count"] = table.c.instance_count + 1
    if with_expected:
        values["expected_instances"] = bindparam("expected")
    return update(table).where(table.c.id == bindparam("series_id")).values(**values)


#: (first version of the object?, sender gave an expected count?) -> UPDATE series ...
_UPDATE_SERIES = {
    (new, expected): _series_update(new, expected) for new in (True, False) for expected in (True, False)
}


def known_versions(session: Session, sop_uid: str) -> Sequence[Row[Any, Any, Any]]:
    """(version, sha256, path) of every stored version of one SOP Instance UID."""
    return session.connection().execute(_SELECT_VERSIONS, {"sop_uid": sop_uid}).all()


def stored_bytes(session: Session) -> Any:
    """Size of every stored instance version together, in bytes (0 when there is none)."""
    return session.scalar(select(func.coalesce(func.sum(_INSTANCES.c.size_bytes), 0)))


def stage_rows(
    session: Session,
    filed: FilingCache,
    header: Header,
    size_bytes: int,
    digest: str,
    version: int,
    path: Path,
    calling_ae: str,
    source: str,
    actor: str,
) -> Filing:
    """Study/Series upserts, the Instance row and its audit row, not yet committed.

    Returns where the series is filed. An instance of a series or study filed under
    another study or patient is refused (`triage_node.ingest.filing`), whether the
    series is cached or not.

    Core statements (not ORM units of work) keep this to a few hundred
    microseconds of Python per instance; where a series already seen is filed is
    cached, since study and series rows are never deleted.
    """
    ds = header.ds
    now = utcnow()
    expected = int_value(ds, "NumberOfSeriesRelatedInstances") or int_value(ds, "ImagesInAcquisition")
    filing = filed.get(header.series_uid)
    if filing is None:
        filing = file_series(session, header, calling_ae, source, expected, now)
    else:
        filing.check(header)
    series_id = filing.series_id
    params: dict[str, Any] = {"series_id": series_id, "now": now}
    if expected is not None:
        params["expected"] = expected
    session.connection().execute(_UPDATE_SERIES[(version == 1, expected is not None)], params)
    session.connection().execute(
        _INSERT_INSTANCE,
        {
            "series_id": series_id,
            "sop_uid": header.sop_uid,
            "version": version,
            "sop_class_uid": header.sop_class_uid,
            "transfer_syntax": header.transfer_syntax,
            "instance_number": int_value(ds, "InstanceNumber"),
            "slice_position": slice_position(ds),
            "path": str(path),
            "sha256": digest,
            "size_bytes": size_bytes,
            "calling_ae": calling_ae[:16],
            "source": source,
            "received_at": now,
        },
    )
    audit.record_now(
        session,
        "instance.stored" if version == 1 else "instance.new_version",
        actor=actor,
        study_uid=header.study_uid,
        series_uid=header.series_uid,
        sop_uid=header.sop_uid,
        version=version,
        sha256=digest,
        source=source,
        transfer_syntax=header.transfer_syntax,
        **({"received_transfer_syntax": header.received_transfer_syntax}
           if header.received_transfer_syntax else {}),
    )
    return filing
