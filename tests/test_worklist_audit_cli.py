"""``triage-node audit``: filters and output formats, against a migrated SQLite database."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta

import pytest
import typer
from typer.testing import CliRunner

from tests.worklist_factory import add_study, migrated_database
from triage_node.cli import build_app
from triage_node.cli.audit import parse_since
from triage_node.db.session import transaction
from triage_node.worklist.priority import compute_priority, set_status


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    for key in ("TRIAGE_DATABASE_URL", "TRIAGE_DATA_DIR"):
        monkeypatch.delenv(key, raising=False)
    db = next(migrated_database(f"sqlite:///{tmp_path / 'triage.db'}"))
    with transaction(db.factory) as session:
        a, b = add_study(session), add_study(session)
        entry = compute_priority(session, a, actor="node", reason="study received")
        compute_priority(session, b, actor="node", reason="study received")
        set_status(session, entry, "done", actor="token:dr-q", reason="read")
    return tmp_path, a.study_uid


def run(*args: str) -> str:
    result = CliRunner().invoke(build_app(), ["audit", *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_audit_command_filters_and_formats(data_dir):
    folder, uid = data_dir
    lines = [json.loads(line) for line in run("--data-dir", str(folder), "--json").splitlines()]
    assert [e["action"] for e in lines] == ["worklist.priority", "worklist.priority", "worklist.status"]
    by_study = run("--data-dir", str(folder), "--study", uid, "--json").splitlines()
    assert [json.loads(line)["action"] for line in by_study] == ["worklist.priority", "worklist.status"]
    status = run("--data-dir", str(folder), "--action", "worklist.status", "--json").splitlines()
    assert json.loads(status[0])["actor"] == "token:dr-q"
    assert run("--data-dir", str(folder), "--since", "1h", "--action", "worklist.*", "--json").count("\n") == 3
    future = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
    assert run("--data-dir", str(folder), "--since", future, "--json") == ""
    table = run("--data-dir", str(folder), "--study", uid)
    assert "worklist.status" in table and "new_status=done" in table
    rows = list(csv.DictReader(io.StringIO(run("--data-dir", str(folder), "--csv"))))
    assert len(rows) == 3 and rows[2]["actor"] == "token:dr-q"


def test_since_accepts_durations_and_iso_and_refuses_other_text():
    now = datetime(2026, 1, 2, 12, 0, tzinfo=UTC)
    assert parse_since("90m", now) == now - timedelta(minutes=90)
    assert parse_since("7d", now) == now - timedelta(days=7)
    assert parse_since("2026-01-01T08:00", now) == datetime(2026, 1, 1, 8, 0, tzinfo=UTC)
    with pytest.raises(typer.BadParameter):
        parse_since("yesterday", now)
