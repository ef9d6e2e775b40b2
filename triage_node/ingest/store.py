"""`InstanceStore`: the one path by which a received object enters the node.

Both doors call it: the DIMSE listener (``source="dimse"``, fragment by fragment:
`begin`, `IncomingObject.write`, `finish`) and the STOW-RS endpoint (``source="stow"``,
the whole file at once: `store`). For each Part 10 object it

1. checks the free-disk watermark and the retention quota (0xA700 past either),
2. writes the bytes to a temporary file in the spool as they arrive
   (`triage_node.ingest.incoming.IncomingObject`),
3. once the object is complete, inflates a deflated one within ``max_object_mb``
   and keeps it inflated (`triage_node.ingest.inflate`; 0xA702 past the limit), then
   fsyncs the file and hashes the data set in the I/O pool while it checks the header
   (no pixel decoding; the data set bytes are never re-encoded) and the UIDs
   (0xC000-range when they cannot become paths, 0xA900 when they are missing or do
   not match what the transfer announced),
4. stages the Study/Series/Instance rows and an audit row
   (`triage_node.ingest.instance_rows`; 0xA900 for an instance whose series or study
   is filed under another study or patient: `triage_node.ingest.filing`),
5. renames the file to its final name and fsyncs its folder
   (`triage_node.ingest.spool.Spool.publish`), then commits the rows
   (0xA701 when that fails: never success without the row),
6. and only then returns success and calls ``on_stored(series_uid)``.
A refused object's temporary file is deleted, and its audit row waits in memory while
the database is away (`triage_node.ingest.deferred_audit`).

Status codes are those of the Storage Service Class, PS3.4 Annex B.2.3, Table B.2-1.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from pydicom.uid import DeflatedExplicitVRLittleEndian
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from triage_node.config import Settings
from triage_node.db import audit
from triage_node.db.models import Instance
from triage_node.db.session import transaction
from triage_node.ingest.deferred_audit import DeferredAudit
from triage_node.ingest.filing import FILED_ELSEWHERE, FilingCache
from triage_node.ingest.header import (
    CANNOT_UNDERSTAND,
    DATABASE_UNAVAILABLE,
    DATASET_DOES_NOT_MATCH_SOP_CLASS,
    INVALID_UID,
    OBJECT_TOO_LARGE,
    OUT_OF_RESOURCES,
    SUCCESS,
    Header,
    Refused,
    dataset_offset,
    dataset_offset_from_bytes,
    parse_header,
    slice_position,
)
from triage_node.ingest.incoming import IncomingObject, dataset_digest
from triage_node.ingest.inflate import InflationBudget
from triage_node.ingest.instance_rows import known_versions, stage_rows
from triage_node.ingest.outcome import StoreOutcome
from triage_node.ingest.spool import Spool
from triage_node.ingest.watermark import DiskWatermark
from triage_node.logs import get_logger, remember_identifiers

__all__ = [
    "CANNOT_UNDERSTAND",
    "DATABASE_UNAVAILABLE",
    "DATASET_DOES_NOT_MATCH_SOP_CLASS",
    "FILED_ELSEWHERE",
    "INVALID_UID",
    "OBJECT_TOO_LARGE",
    "OUT_OF_RESOURCES",
    "SUCCESS",
    "InstanceStore",
    "StoreOutcome",
    "dataset_offset",
    "parse_header",
    "slice_position",
]

log = get_logger(__name__)

SOURCES = ("dimse", "stow")

_INSERT_RETRIES = 3


class InstanceStore:
    """Validate, spool and record received DICOM objects.

    Parameters
    ----------
    settings : Settings
        ``spool_dir`` and ``min_free_disk_mb`` are used.
    session_factory : sessionmaker
        Built once at start (STYLE.md 3).
    on_stored : callable, optional
        Called with the SeriesInstanceUID after each newly stored object has been
        committed (not for duplicates); exceptions in it are logged, never turned into
        a failure status, since the object is already safe.
    """

    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        on_stored: Callable[[str], object] | None = None,
    ) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.on_stored = on_stored
        self.spool = Spool(settings.spool_dir)
        self._filed = FilingCache()
        self.inflation = InflationBudget(settings.inflation_budget_mb * 2**20)
        # Refusals that could not be audited (database away), written once it is back.
        self._deferred_audit = DeferredAudit()
        self._sop_locks = [threading.Lock() for _ in range(64)]
        self.watermark = DiskWatermark(self.spool, session_factory)
        # fsyncs and digests run here (two per object at once), overlapping the
        # header checks and SQL work of the same object.
        self._io = ThreadPoolExecutor(
            max_workers=2 * max(1, settings.max_associations), thread_name_prefix="spool"
        )

    # -- watermark -----------------------------------------------------------------
    def below_watermark(self) -> bool:
        """True when nothing more may be stored (`triage_node.ingest.watermark`)."""
        return self.watermark.below(self.settings)

    # -- the door ------------------------------------------------------------------
    def store(
        self,
        data: bytes,
        *,
        calling_ae: str,
        peer: str,
        source: str,
        expected_sop_class: str | None = None,
        expected_sop_instance: str | None = None,
        expected_study: str | None = None,
    ) -> StoreOutcome:
        """Store one Part 10 file (preamble, file meta and dataset as received).

        Parameters
        ----------
        data : bytes
            The object exactly as received; written to the spool unchanged.
        calling_ae : str
            Calling AE title (DIMSE) or the token name (STOW-RS), for audit rows.
        peer : str
            Peer IP address.
        source : {"dimse", "stow"}
            Which door the object came through.
        expected_sop_class, expected_sop_instance : str, optional
            Affected SOP Class/Instance UID announced by the C-STORE request (PS3.7
            9.1.1.1); a dataset that disagrees gets 0xA900.
        expected_study : str, optional
            StudyInstanceUID of a STOW-RS request URL (PS3.18 10.5.1.1.1); 0xA900 otherwise.

        Returns
        -------
        StoreOutcome
        """
        incoming = self.begin(hash_from=dataset_offset_from_bytes(data))
        incoming.write(data)
        return self.finish(
            incoming, calling_ae=calling_ae, peer=peer, source=source,
            expected_sop_class=expected_sop_class, expected_sop_instance=expected_sop_instance,
            expected_study=expected_study,
        )

    def begin(self, *, hash_from: int) -> IncomingObject:
        """Start receiving an object; `IncomingObject.write` its bytes, then `finish` it.

        Below the free-disk watermark nothing is written and ``finish`` answers 0xA700.
        An object that will not be finished (its association ended) is
        `IncomingObject.discard`-ed.
        """
        refused = None
        if self.below_watermark():
            refused = Refused(OUT_OF_RESOURCES, self.watermark.reason(self.settings))
        return IncomingObject(self.spool, hash_from=hash_from, refused=refused)

    def finish(
        self,
        incoming: IncomingObject,
        *,
        calling_ae: str,
        peer: str,
        source: str,
        expected_sop_class: str | None = None,
        expected_sop_instance: str | None = None,
        expected_study: str | None = None,
    ) -> StoreOutcome:
        """Make a complete object durable and record it, or refuse it (see `store`)."""
        if source not in SOURCES:
            incoming.discard()
            raise ValueError(f"source must be one of {SOURCES}")
        actor = f"ae:{calling_ae}@{peer}"[:64] if source == "dimse" else f"stow:{calling_ae}"[:64]
        header: Header | None = None
        try:
            if incoming.refused is not None:
                raise incoming.refused
            # Deflated: inflated once, within the object size limit, and kept inflated.
            inflated = incoming.inflate(self.settings.max_object_mb * 2**20, self.inflation)
            # The bytes are in the temporary file already: its fsync and the digest
            # run in the I/O pool (neither holds the GIL) while this thread checks the
            # header and stages the rows. A refused object's file is dropped.
            data = incoming.data()  # joined here, before the pool reads it
            started = threading.Event()
            staging = self._io.submit(incoming.sync, started)
            hashing = self._io.submit(dataset_digest, data, incoming.hash_from)
            # Wait until the fsync is under way: the pool thread needs the GIL to begin
            # it, and the checks below, pure Python, would hold the GIL until their
            # first SQL call, leaving the disk idle meanwhile.
            started.wait()
            try:
                header = incoming.header()
                if inflated:
                    header = replace(header, received_transfer_syntax=DeflatedExplicitVRLittleEndian)
                remember_identifiers(header.ds)
                if expected_study and header.study_uid != expected_study:
                    raise Refused(
                        DATASET_DOES_NOT_MATCH_SOP_CLASS,
                        "StudyInstanceUID differs from the study in the request URL",
                    )
                if expected_sop_class and header.sop_class_uid != expected_sop_class.strip("\x00 "):
                    raise Refused(
                        DATASET_DOES_NOT_MATCH_SOP_CLASS,
                        "SOPClassUID differs from the presentation context's abstract syntax",
                    )
                if expected_sop_instance and header.sop_uid != expected_sop_instance.strip("\x00 "):
                    raise Refused(
                        DATASET_DOES_NOT_MATCH_SOP_CLASS,
                        "SOPInstanceUID differs from the request's Affected SOP Instance UID",
                    )
            except BaseException:
                self._drop_staged(staging)
                raise
            digest = hashing.result()
            if header.dataset_offset != incoming.hash_from:
                # The file meta was not where the quick look put it: hash from the header's.
                digest = dataset_digest(data, header.dataset_offset)
            outcome = self._spool_and_record(header, data, digest, staging, calling_ae, source, actor)
        except Refused as refused:
            outcome = self._refuse(header, refused, actor, source)
        finally:
            incoming.discard()  # frees the bytes; the file is published or dropped by now
        if self._deferred_audit:
            self._deferred_audit.flush(self.session_factory)
        if (outcome.stored and not outcome.duplicate and outcome.series_uid is not None
                and self.on_stored is not None):
            try:
                self.on_stored(outcome.series_uid)
            except Exception:  # noqa: BLE001 - the object is safe; only log
                log.exception("on_stored callback failed", series_uid=outcome.series_uid)
        return outcome

    # -- internals -----------------------------------------------------------------
    def _lock_for(self, sop_uid: str) -> threading.Lock:
        return self._sop_locks[hash(sop_uid) % len(self._sop_locks)]

    def _spool_and_record(
        self, header: Header, data: bytes, digest: str, staging: Future[Path], calling_ae: str,
        source: str, actor: str,
    ) -> StoreOutcome:
        """Spool and record one object under its SOP Instance UID's lock.

        The lock (striped by UID) keeps two associations sending the same SOP Instance
        UID at once from choosing the same version file. Within one session: read the
        known versions and stage the rows while the file is being written (``staging``);
        then give the file its final name, and commit only once it is durable.
        Each attempt consumes its staged file (published or dropped).
        """
        current: Future[Path] | None = staging
        with self._lock_for(header.sop_uid):
            for attempt in range(_INSERT_RETRIES):
                if current is None:
                    current = self._io.submit(self.spool.stage, data)
                try:
                    return self._spool_and_record_once(
                        header, data, digest, current, calling_ae, source, actor
                    )
                except IntegrityError:
                    # A row appeared under us (another process, or a study/series race
                    # on PostgreSQL): read again.
                    if attempt + 1 == _INSERT_RETRIES:
                        raise Refused(DATABASE_UNAVAILABLE, "instance row conflicts") from None
                finally:
                    current = None
        raise AssertionError("unreachable")  # pragma: no cover

    def _spool_and_record_once(
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
                filing = stage_rows(session, self._filed, header, len(data), digest, version,
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
        self._filed.put(header.series_uid, filing)
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

    def _drop_staged(self, staging: Future[Path]) -> None:
        """Wait for a staged file that will not be published, and delete it."""
        try:
            self.spool.discard(staging.result())
        except OSError:
            pass  # the write itself failed: nothing was left behind

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

    def _refuse(
        self, header: Header | None, refused: Refused, actor: str, source: str
    ) -> StoreOutcome:
        log.warning(
            "instance refused",
            status=f"0x{refused.status:04X}",
            reason=refused.reason,
            sop_uid=header.sop_uid if header else None,
            source=source,
        )
        row: dict[str, Any] = dict(
            action="instance.rejected",
            actor=actor,
            outcome="failed",
            study_uid=header.study_uid if header else None,
            series_uid=header.series_uid if header else None,
            sop_uid=header.sop_uid if header else None,
            status=f"0x{refused.status:04X}",
            reason=refused.reason,
            source=source,
        )
        try:
            with transaction(self.session_factory) as session:
                audit.record(session, **row)
        except SQLAlchemyError:
            self._deferred_audit.defer(row)
            log.error("audit row for a refused instance deferred: database unavailable")
        return StoreOutcome(
            status=refused.status,
            study_uid=header.study_uid if header else None,
            series_uid=header.series_uid if header else None,
            sop_uid=header.sop_uid if header else None,
            stored=False,
            duplicate=False,
            version=0,
            reason=refused.reason,
            sop_class_uid=header.sop_class_uid if header else None,
        )
