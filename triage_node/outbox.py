"""The one writer of DICOM outbox rows: which object still goes to which destination.

A job's SR and overlays (`worker.pipeline.record`) and received images that routing rules
forward (`triage_node.routing`) are queued here alike, one ``pending`` row per (object,
destination), in the caller's transaction; `worker.pipeline.delivery` sends them. A row
that already exists for (SOP Instance UID, destination) is left as it is, so a re-run of a
job or a re-routed series never sends an object twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from triage_node.db.models import OutboxItem, OutboxState
from triage_node.logs import get_logger
from triage_node.setting_types import Destination
from triage_node.timeutil import as_utc, utcnow

__all__ = ["enqueue_outbox"]

log = get_logger(__name__)


def enqueue_outbox(
    session: Session,
    job_id: int | None,
    study_uid: str,
    objects: Sequence[tuple[str, str | Path]],
    destinations: Sequence[Destination | str],
    *,
    reason: str = "result",
    now: datetime | None = None,
) -> list[OutboxItem]:
    """Add one pending row per (object, destination) to the session's transaction.

    Parameters
    ----------
    objects : sequence of (sop_uid, path)
        The DICOM files to deliver (e.g. the SR and the overlays of a job).
    destinations : sequence of Destination or destination name
    reason : {"result", "routing"}

    Returns
    -------
    list of OutboxItem
        The rows added; rows that already exist for (sop_uid, destination) are left as they
        are, so a re-run of a job does not send its objects twice.
    """
    names = [d.name if isinstance(d, Destination) else str(d) for d in destinations]
    if not objects or not names:
        return []
    sop_uids = [sop for sop, _ in objects]
    existing = {
        (sop, dest) for sop, dest in session.execute(
            select(OutboxItem.sop_uid, OutboxItem.destination).where(
                OutboxItem.sop_uid.in_(sop_uids), OutboxItem.destination.in_(names)
            )
        )
    }
    when = as_utc(now or utcnow())
    added = []
    for sop_uid, path in objects:
        for name in names:
            if (sop_uid, name) in existing:
                continue
            item = OutboxItem(
                job_id=job_id,
                study_uid=study_uid,
                sop_uid=sop_uid,
                path=str(path),
                destination=name,
                reason=reason,
                state=OutboxState.pending,
                attempts=0,
                next_attempt_at=when,
            )
            session.add(item)
            added.append(item)
            existing.add((sop_uid, name))
    session.flush()
    log.info("outbox_enqueued", job_id=job_id, study_uid=study_uid, rows=len(added), destinations=names)
    return added
