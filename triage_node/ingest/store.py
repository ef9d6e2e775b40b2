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
   (0xA701 when that fails: never success without the row); steps 4 and 5 are
   `triage_node.ingest.recording.InstanceRecorder`,
6. and only then returns success and calls ``on_stored(series_uid)``.
A refused object's temporary file is deleted, and its audit row waits in memory while
the database is away (`triage_node.ingest.deferred_audit`).

Status codes are those of the Storage Service Class, PS3.4 Annex B.2.3, Table B.2-1.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from pydicom.uid import DeflatedExplicitVRLittleEndian
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from triage_node.config import Settings
from triage_node.db import audit
from triage_node.db.session import transaction
from triage_node.ingest.deferred_audit import DeferredAudit
from triage_node.ingest.filing import FILED_ELSEWHERE
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
from triage_node.ingest.outcome import StoreOutcome
from triage_node.ingest.recording import InstanceRecorder
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
        self.inflation = InflationBudget(settings.inflation_budget_mb * 2**20)
        # Refusals that could not be audited (database away), written once it is back.
        self._deferred_audit = DeferredAudit()
        self.watermark = DiskWatermark(self.spool, session_factory)
        # fsyncs and digests run here (two per object at once), overlapping the
        # header checks and SQL work of the same object.
        self._io = ThreadPoolExecutor(
            max_workers=2 * max(1, settings.max_associations), thread_name_prefix="spool"
        )
        # Publishes the file and commits its rows (`triage_node.ingest.recording`).
        self.recorder = InstanceRecorder(self.spool, session_factory, self._io)

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
                self.recorder.drop_staged(staging)
                raise
            digest = hashing.result()
            if header.dataset_offset != incoming.hash_from:
                # The file meta was not where the quick look put it: hash from the header's.
                digest = dataset_digest(data, header.dataset_offset)
            outcome = self.recorder.record(header, data, digest, staging, calling_ae, source, actor)
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
