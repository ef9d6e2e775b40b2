"""Faults during ingest, with a real ``triage-node serve`` process and a pynetdicom SCU.

For each fault the SCU sends one series and the test counts what was acknowledged
(C-STORE status 0x0000), stored (instance rows, spool files) and refused:

- the node SIGKILLed in the middle of an association: after a restart every
  acknowledged instance is on disk and in the database; re-sending the rest completes
  the series with one job;
- PostgreSQL restarted during ingest: the SCU sees failure statuses (0xA701) or a
  broken association while the database is away, never a success for an instance
  that has no row; refusals the audit table could not take at the time are audited
  once it is back; re-sending the failed ones completes the series.

Covered elsewhere, by reference: disk below the watermark (0xA700, then the
association refused: ``tests/test_ingest_scp.py::test_watermark_answers_a700_and_refuses_new_associations``
and ``tests/test_ingest_store.py::test_below_the_free_disk_watermark_nothing_is_written``),
a database error in the middle of a store (``tests/test_ingest_store.py::
test_database_failure_is_never_a_success_and_leaves_no_file``), the PACS down for the
whole run then up (``tests/test_delivery.py::test_orthanc_down_then_up_gets_each_object_exactly_once``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import func, select

from tests.ingest_support import ct_dataset
from tests.node_process import AET, NodeProcess, fault_counts, record_fault
from triage_node.db.models import AuditEvent, Instance, Job, JobState
from triage_node.ingest.store import DATABASE_UNAVAILABLE, SUCCESS
from triage_node.peers import PostgresServer, wait_until

N = 60


def _series(n: int = N) -> list[Dataset]:
    study, series = generate_uid(), generate_uid()
    return [ct_dataset(study, series, i, size=64) for i in range(n)]


def _ae() -> AE:
    ae = AE(ae_title="FAULT_SCU")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    return ae


class Sender(threading.Thread):
    """Send datasets one by one on one association; record each answer (None: no answer)."""

    def __init__(self, port: int, datasets: list[Dataset], pause: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.datasets = datasets
        self.pause = pause
        self.answers: dict[str, int | None] = {}
        self.reassociate = True

    def run(self) -> None:
        assoc = None
        for ds in self.datasets:
            if assoc is None or not assoc.is_established:
                if assoc is not None and not self.reassociate:
                    break
                assoc = _ae().associate("127.0.0.1", self.port, ae_title=AET)
                if not assoc.is_established:
                    self.answers[str(ds.SOPInstanceUID)] = None
                    continue
            response = assoc.send_c_store(ds)
            self.answers[str(ds.SOPInstanceUID)] = int(response.Status) if "Status" in response else None
            time.sleep(self.pause)
        if assoc is not None and assoc.is_established:
            assoc.release()

    @property
    def acknowledged(self) -> set[str]:
        return {sop for sop, status in self.answers.items() if status == SUCCESS}


def _rows(node: NodeProcess) -> dict[str, Instance]:
    with node.session_factory() as session:
        return {i.sop_uid: i for i in session.scalars(select(Instance))}


def _resend(node: NodeProcess, datasets: list[Dataset], done: set[str]) -> Sender:
    sender = Sender(node.dicom_port, [ds for ds in datasets if str(ds.SOPInstanceUID) not in done])
    sender.run()
    return sender


def _jobs(node: NodeProcess) -> int:
    """Live jobs (not superseded). A restart may let the stability timer complete the
    partial series first; the re-sent instances then make a new version of the job."""
    with node.session_factory() as session:
        return int(session.scalar(select(func.count()).select_from(Job)
                                  .where(Job.state != JobState.superseded)))


def _check_on_disk(node: NodeProcess, rows: dict[str, Instance], sops: set[str]) -> None:
    for sop in sops:
        path = Path(rows[sop].path)
        path = path if path.is_absolute() else node.settings.spool_dir / path
        ds = dcmread(path)
        assert str(ds.SOPInstanceUID) == sop and len(ds.PixelData) == 64 * 64 * 2


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    running = NodeProcess(tmp_path / "data").start()
    try:
        yield running
    finally:
        running.close()


def test_node_sigkilled_during_an_association_keeps_every_acknowledged_instance(node: NodeProcess) -> None:
    datasets = _series()
    sender = Sender(node.dicom_port, datasets)
    sender.reassociate = False
    sender.start()
    wait_until(lambda: len(sender.acknowledged) >= 15, "15 instances acknowledged", timeout=60)
    node.kill()  # SIGKILL, mid-association
    sender.join(timeout=60)
    acknowledged = sender.acknowledged
    assert 15 <= len(acknowledged) < N, len(acknowledged)

    node.start()  # same data directory and ports
    rows = _rows(node)
    assert acknowledged <= set(rows), f"lost: {sorted(acknowledged - set(rows))}"
    _check_on_disk(node, rows, acknowledged)
    # The object being received when the node died was never acknowledged: its partial
    # temporary file (written as the fragments came) is removed at start.
    assert list((node.settings.spool_dir / ".incoming").iterdir()) == []
    stored_before_resend = len(rows)  # may exceed acknowledged by the instance in flight

    retry = _resend(node, datasets, acknowledged)
    assert set(retry.answers.values()) == {SUCCESS}
    rows = _rows(node)
    assert len(rows) == N and all(r.version == 1 for r in rows.values())
    wait_until(lambda: _jobs(node) == 1, "one live job for the series", timeout=30)
    time.sleep(1.0)
    assert _jobs(node) == 1
    record_fault("node_sigkill_during_association", fault_counts(
        node.session_factory, acknowledged=len(acknowledged), stored_after_restart=stored_before_resend,
        resent=len(retry.answers), jobs=_jobs(node)))


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    server = PostgresServer()  # not the session server: this test restarts it
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


def test_postgresql_restarted_during_ingest_never_acknowledges_a_missing_row(
    tmp_path: Path, own_postgres: PostgresServer
) -> None:
    node = NodeProcess(tmp_path / "data", database_url=own_postgres.url()).start()
    try:
        datasets = _series()
        sender = Sender(node.dicom_port, datasets, pause=0.05)
        sender.start()
        wait_until(lambda: len(sender.acknowledged) >= 10, "10 instances acknowledged", timeout=60)
        own_postgres.stop()
        time.sleep(2.0)
        own_postgres.start()
        sender.join(timeout=120)
        assert not sender.is_alive()
        acknowledged = sender.acknowledged
        failed = {sop: s for sop, s in sender.answers.items() if s != SUCCESS}
        assert failed, "the outage was not seen by the SCU"
        assert {s for s in failed.values() if s is not None} <= {DATABASE_UNAVAILABLE}
        rows = _rows(node)
        assert acknowledged <= set(rows), f"acknowledged without a row: {sorted(acknowledged - set(rows))}"
        _check_on_disk(node, rows, acknowledged)
        assert node.alive
        refused = sum(s == DATABASE_UNAVAILABLE for s in failed.values())
        assert node.log_text().count('"status": "0xA701"') >= refused

        retry = _resend(node, datasets, acknowledged)
        assert set(retry.answers.values()) == {SUCCESS}
        assert len(_rows(node)) == N
        # Refusals the audit table could not take at the time were written once it was back.
        with node.session_factory() as session:
            audited = session.scalars(select(AuditEvent).where(AuditEvent.action == "instance.rejected")).all()
        audited = [e for e in audited if e.detail["status"] == "0xA701"]
        assert len(audited) == refused
        assert {e.sop_uid for e in audited} <= set(failed)
        record_fault("postgresql_restart_during_ingest", fault_counts(
            node.session_factory, acknowledged=len(acknowledged), refused=len(failed),
            refused_0xA701=refused, audited_0xA701=len(audited),
            no_answer=sum(s is None for s in failed.values()), resent=len(retry.answers)))
    finally:
        node.close()
