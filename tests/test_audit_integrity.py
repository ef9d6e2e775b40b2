"""The audit trail (issue 17, finding 6): rows cannot be rewritten by a replacing
INSERT, and a flood of refusals from one source writes a bounded number of rows.

UPDATE, DELETE and TRUNCATE are covered by
``tests/test_security.py::test_the_database_refuses_update_delete_and_truncate_of_audit_rows``.
"""

from __future__ import annotations

import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy import select, text
from sqlalchemy.exc import DatabaseError

from tests.node_process import NodeProcess
from triage_node.db import audit, schema
from triage_node.db.audit import RefusalSummary
from triage_node.db.models import AuditEvent
from triage_node.db.session import make_engine, make_sessionmaker, transaction

COLUMNS = "(id, at, actor, action, outcome, detail)"
VALUES = "(:id, :at, 'forged', 'test.event', 'ok', '{}')"
#: Statements that would rewrite the row with id :id, per backend.
REPLACING = {
    "sqlite": [
        f"INSERT OR REPLACE INTO audit_events {COLUMNS} VALUES {VALUES}",
        f"REPLACE INTO audit_events {COLUMNS} VALUES {VALUES}",
        f"INSERT INTO audit_events {COLUMNS} VALUES {VALUES} ON CONFLICT (id) DO UPDATE SET actor = excluded.actor",
    ],
    "postgresql": [
        f"INSERT INTO audit_events {COLUMNS} VALUES {VALUES} ON CONFLICT (id) DO UPDATE SET actor = excluded.actor",
        "MERGE INTO audit_events t USING (SELECT CAST(:id AS integer) AS id) s ON t.id = s.id "
        "WHEN MATCHED THEN UPDATE SET actor = 'forged'",
    ],
}


def _rows(factory) -> list[tuple]:  # type: ignore[no-untyped-def]
    with factory() as session:
        return [(e.id, e.actor, e.action, e.outcome, e.detail)
                for e in session.scalars(select(AuditEvent).order_by(AuditEvent.id))]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_database_refuses_to_replace_an_audit_row(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    path = tmp_path / "audit.db"
    url = f"sqlite:///{path}" if backend == "sqlite" else request.getfixturevalue("postgres_db")
    schema.upgrade(url)
    engine = make_engine(url)
    factory = make_sessionmaker(engine)
    try:
        with transaction(factory) as session:
            audit.record(session, "test.event", actor="test", detail_value=1)
        before = _rows(factory)
        (row_id,) = [r[0] for r in before]
        for statement in REPLACING[backend]:
            with pytest.raises(DatabaseError, match="append-only"):
                with engine.begin() as conn:
                    conn.execute(text(statement), {"id": row_id, "at": datetime.now(UTC)})
        assert _rows(factory) == before
    finally:
        engine.dispose()
    if backend == "sqlite":
        # Without the node's engine (no PRAGMA recursive_triggers): the 0004 trigger alone.
        with sqlite3.connect(path) as conn, pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute(f"INSERT OR REPLACE INTO audit_events {COLUMNS} VALUES "
                         f"({row_id}, '2026-01-01', 'forged', 'test.event', 'ok', '{{}}')")
        engine = make_engine(url)
        try:
            assert _rows(make_sessionmaker(engine)) == before
        finally:
            engine.dispose()


# -- refusals rate-summarised ---------------------------------------------------------------
class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def factory(tmp_path: Path):  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path / 'refusals.db'}"
    schema.upgrade(url)
    engine = make_engine(url)
    yield make_sessionmaker(engine)
    engine.dispose()


def _refusals(factory) -> list[AuditEvent]:  # type: ignore[no-untyped-def]
    with factory() as session:
        return list(session.scalars(
            select(AuditEvent).where(AuditEvent.action == "association.rejected").order_by(AuditEvent.id)))


def test_two_hundred_refusals_from_one_source_write_two_rows_and_the_summary_counts_them(factory) -> None:  # type: ignore[no-untyped-def]
    clock = FakeClock()
    summary = RefusalSummary(window_s=60, clock=clock)
    written = []
    for n in range(200):
        clock.now += 0.1
        written.append(summary.refused(factory, "association.rejected", peer="10.9.9.9",
                                       reason="calling AE title not recognised",
                                       actor=f"ae:X{n}@10.9.9.9", called_ae="TRIAGE_NODE"))
    # Another source is refused meanwhile: its first refusal is written at once.
    assert summary.refused(factory, "association.rejected", peer="10.1.1.1",
                           reason="calling AE title not recognised", actor="ae:CT@10.1.1.1")
    assert written == [True] + [False] * 199
    assert len(_refusals(factory)) == 2
    clock.now += 61  # the window closes; the next refusal writes its summary and its own row
    assert summary.refused(factory, "association.rejected", peer="10.9.9.9",
                           reason="calling AE title not recognised", actor="ae:X@10.9.9.9")
    rows = _refusals(factory)
    assert len(rows) == 4
    first, other, total, again = rows
    assert first.actor == "ae:X0@10.9.9.9" and first.detail["reason"] == "calling AE title not recognised"
    assert other.actor == "ae:CT@10.1.1.1"
    assert total.outcome == "failed" and total.detail["summary"] is True and total.detail["count"] == 199
    assert total.detail["message"] == "199 more refusals from 10.9.9.9 in the last 19.9 s"
    assert total.detail["called_ae"] == "TRIAGE_NODE"
    assert again.actor == "ae:X@10.9.9.9" and "summary" not in again.detail


def test_a_window_that_closes_writes_its_summary_without_another_refusal(factory) -> None:  # type: ignore[no-untyped-def]
    summary = RefusalSummary(window_s=0.5)
    for _ in range(20):
        summary.refused(factory, "association.rejected", peer="10.9.9.9", reason="r", actor="ae:X@10.9.9.9")
    deadline = time.monotonic() + 10
    while len(_refusals(factory)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    rows = _refusals(factory)
    assert [r.detail.get("count") for r in rows] == [None, 19]


def test_flush_writes_the_open_windows(factory) -> None:  # type: ignore[no-untyped-def]
    summary = RefusalSummary(window_s=3600)
    for _ in range(5):
        summary.refused(factory, "association.rejected", peer="10.9.9.9", reason="r", actor="a")
    summary.refused(factory, "association.rejected", peer="10.9.9.8", reason="r", actor="b")
    summary.flush()
    assert [(r.actor, r.detail.get("count")) for r in _refusals(factory)] == [("a", None), ("b", None), ("a", 4)]


def test_a_running_node_audits_a_flood_of_refused_associations_in_bounded_rows(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "data", env={"TRIAGE_ALLOWED_CALLERS": '["CT_SCANNER@127.0.0.1/32"]'})
    with node:
        ae = AE(ae_title="INTRUDER")
        ae.acse_timeout = ae.network_timeout = 10
        ae.add_requested_context(Verification)
        for _ in range(200):
            assoc = ae.associate("127.0.0.1", node.dicom_port, ae_title="TRIAGE_NODE")
            # On a busy machine the node may still be closing earlier connections, so one may
            # meet the per-address cap at accept instead: refused too, under its own reason.
            assert assoc.is_rejected or assoc.is_aborted
        node.stop()  # closes the window: its summary row is written at shutdown
        rows = _refusals(node.session_factory)
    assert len(rows) <= 4  # per reason: the first row and one summary
    assert sum(r.detail["count"] if r.detail.get("summary") else 1 for r in rows) == 200
