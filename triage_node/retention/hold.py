"""Legal hold: a study on hold is never deleted, whatever its age or the disk use."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from triage_node.db import audit
from triage_node.db.models import Study
from triage_node.db.session import transaction


class UnknownStudy(LookupError):
    """No study with this StudyInstanceUID is stored."""


def set_legal_hold(
    factory: sessionmaker[Session], study_uid: str, held: bool, *, actor: str, reason: str = ""
) -> bool:
    """Put a study on legal hold or release it; audited. Returns whether the flag changed.

    Raises
    ------
    UnknownStudy
        When no such study is stored (perhaps deleted already: see the audit trail).
    """
    with transaction(factory) as session:
        query = select(Study).where(Study.study_uid == study_uid)
        if session.get_bind().dialect.name == "postgresql":
            query = query.with_for_update()
        study = session.scalar(query)
        if study is None:
            raise UnknownStudy(study_uid)
        changed = study.legal_hold != held
        study.legal_hold = held
        audit.record(
            session, "study.legal_hold" if held else "study.legal_hold_released", actor=actor[:64],
            study_uid=study_uid, changed=changed, reason=reason[:500],
        )
    return changed
