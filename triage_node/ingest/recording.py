"""The spool-and-record step of `triage_node.ingest.store.InstanceStore`: durable file, then committed rows.

`InstanceRecorder.record` takes an object whose header has been checked and whose bytes
are being staged in the spool, and under its SOP Instance UID's lock (striped by UID, so
two associations sending the same instance at once do not choose the same version file)

1. reads the versions already stored; an identical data set (same digest) is a
   duplicate: audited, answered with the stored version, its staged file dropped,
2. stages the Study/Series/Instance rows and an audit row
   (`triage_node.ingest.instance_rows`; 0xA900 for an instance filed under another
   study or patient: `triage_node.ingest.filing`),
3. renames the staged file to its final name and fsyncs its folder
   (`triage_node.ingest.spool.Spool.publish`; 0xA700 when that fails), then commits
   the rows (0xA701 when that fails: never success without the row), retrying when a
   row appeared under it (another process, or a study/series race on PostgreSQL).

A file published whose rows did not commit is removed unless a row references it.
Kept apart from the store, which holds the door (watermark, header checks, refusals).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from triage_node.db import audit
from triage_node.db.models import Instance
from triage_node.ingest.filing import FilingCache
from triage_node.ingest.header import DATABASE_UNAVAILABLE, OUT_OF_RESOURCES, Header, Refused
from triage_node.ingest.instance_rows import known_versions, stage_rows
from triage_node.ingest.outcome import StoreOutcome
from triage_node.ingest.spool import Spool
from triage_node.logs import get_logger

__all__ = ["INSERT_RETRIES", "InstanceRecorder"]

log = get_logger(__name__)

INSERT_RETRIES = 3


class InstanceRecorder:
    """Publish staged files and commit their rows, in that order.

    Parameters
    ----------
    spool : Spool
        Where the staged files are published.
    session_factory : sessionmaker
        Built once at start (STYLE.md 3).
    io : ThreadPoolExecutor
        The store's I/O pool; a retry stages the bytes again there.
    """

    def __init__(
        self, spool: Spool, session_factory: sessionmaker[Session], io: ThreadPoolExecutor
    ) -> None:
        self.spool = spool
        self.session_factory = session_factory
        self.io = io
        self.filed = FilingCache()
        self._sop_locks = [threading.Lock() for _ in range(64)]

    def record(
        self, header: Header, data: bytes, digest: str, staging: Future[Path], calling_ae: str,
        source: str, actor: str,
    ) -> StoreOutcome:
        """Spool and record one object under its SOP Instance UID's lock.

        Within one session: read the known versions and stage the rows while the file
        is being written (``staging``); then give the file its final name, and commit
        only once it is durable. Each attempt consumes its staged file (published or
        dropped). Raises `Refused` when the object cannot be recorded.
        """
        current: Future[Path] | None = staging
        with self._lock_for(header.sop_uid):
            for attempt in range(INSERT_RETRIES):
                if current is None:
                    current = self.io.submit(self.spool.stage, data)
                try:
                    return self._record_once(header, data, digest, current, calling_ae, source, actor)
                except IntegrityError:
                    # A row appeared under us (another process, or a study/series race
                    # on PostgreSQL): read again.
                    if attempt + 1 == INSERT_RETRIES:
                        raise Refused(DATABASE_UNAVAILABLE, "instance row conflicts") from None
                finally:
                    current = None
        raise AssertionError("unreachable")  # pragma: no cover

    def drop_staged(self, staging: Future[Path]) -> None:
        """Wait for a staged file that will not be published, and delete it."""
        try:
            self.spool.discard(staging.result())
        except OSError:
            pass  # the write itself failed: nothing was left behind

    # -- internals -----------------------------------------------------------------
    def _lock_for(self, sop_uid: str) -> threading.Lock:
        return self._sop_locks[hash(sop_uid) % len(self._sop_locks)]

    def _record_once(
        self, header: Header, data: bytes, digest: str, staging: Future[Path], calling_ae: str,
        source: str, actor: str,
    ) -> StoreOutcome:
        # The file gets its final name (rename + directory fsync) once the version is
        # known, and the rows are committed only after that.
        staged: Path | None = None
        written: Path | None = None
        committed = False
        try:
            with self.session_factory() as session:
                rows = known_versions(session, header.sop_uid)
                same = [row for row in rows if row[1] == digest]
                if same:
                    return self._duplicate(session, header, same[0], actor, source)
                version = max((int(row[0]) for row in rows), default=0) + 1
                path = self.spool.path_for(
                    header.study_uid, header.series_uid, header.sop_uid, version
                )
                filing = stage_rows(session, self.filed, header, len(data), digest, version,
                                    path, calling_ae, source, actor)
                session.flush()
                try:
                    staged = staging.result()
                    written = self.spool.publish(
                        staged, header.study_uid, header.series_uid, header.sop_uid, version
                    )
                except OSError as exc:
                    raise Refused(OUT_OF_RESOURCES, f"spool write failed: {exc.strerror}") from None
                # The file is durable (fsynced, renamed, directory fsynced): commit.
                session.commit()
                committed = True
        except (Refused, IntegrityError):
            raise
        except SQLAlchemyError as exc:
            raise Refused(
                DATABASE_UNAVAILABLE, f"database write failed: {type(exc).__name__}"
            ) from None
        finally:
            if staged is None:
                # Not yet collected (duplicate or an early failure): wait, then drop it.
                try:
                    staged = staging.result()
                except OSError:
                    staged = None
                if staged is not None and written is None:
                    self.spool.discard(staged)
            if written is not None and not committed:
                self._discard_unreferenced(written)
        # Only after the commit: a rolled-back insert must not be cached.
        self.filed.put(header.series_uid, filing)
        log.debug(
            "instance stored",
            study_uid=header.study_uid,
            series_uid=header.series_uid,
            sop_uid=header.sop_uid,
            version=version,
            source=source,
            bytes=len(data),
        )
        return StoreOutcome.success(header, version=version, path=written, duplicate=False)

    def _duplicate(
        self, session: Session, header: Header, row: Any, actor: str, source: str
    ) -> StoreOutcome:
        version, digest, path = int(row[0]), str(row[1]), str(row[2])
        audit.record_now(
            session,
            "instance.duplicate",
            actor=actor,
            study_uid=header.study_uid,
            series_uid=header.series_uid,
            sop_uid=header.sop_uid,
            version=version,
            sha256=digest,
            source=source,
        )
        session.commit()
        log.debug("duplicate instance", sop_uid=header.sop_uid, version=version, source=source)
        return StoreOutcome.success(header, version=version, path=Path(path), duplicate=True)

    def _discard_unreferenced(self, path: Path) -> None:
        """Remove a spooled file whose row did not commit, unless a row references it."""
        try:
            with self.session_factory() as session:
                referenced = session.execute(
                    select(func.count()).select_from(Instance).where(Instance.path == str(path))
                ).scalar_one()
        except SQLAlchemyError:
            log.warning("cannot check spooled file; keeping it", path=str(path))
            return
        if not referenced:
            self.spool.remove(path)
