"""Security properties of the node (docs/SECURITY.md), each checked against real parts.

Covered elsewhere, by reference:
- unknown calling AE / unknown network / wrong called AE refused:
  ``tests/test_ingest_scp.py::test_unknown_calling_ae_is_rejected_permanently_with_reason_3``,
  ``::test_known_ae_from_a_network_not_on_the_list_is_rejected``,
  ``::test_empty_allow_list_admits_loopback_only``; refusals audited as
  ``association.rejected`` (``::test_unknown_calling_ae_is_rejected_permanently_with_reason_3``);
- TLS-required mode (a plain association to a TLS listener fails, client certificates
  from another CA are refused): ``tests/test_ingest_tls.py``;
- API tokens: no anonymous access, 401/403, keyed hashes only: ``tests/test_api_auth.py``;
- the default secret refused in production by Settings: ``tests/test_config.py``.

Here: ``serve``/``token``/``reconcile`` refuse to
start in production with the default secret; a full run (DCMTK storescu -> ``triage-node
serve`` with JSON logs -> ``triage-node worker``) logs no patient name or ID and no
credential; spool and result files are 0600 in 0700 folders; the audit table is
append-only in code and in the database (SQLite and PostgreSQL triggers).
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import DatabaseError

from tests.node_process import AET, TRIAGE_NODE, NodeProcess, WorkerProcess, shared_model_card
from triage_node.config import load_settings
from triage_node.db import audit, schema
from triage_node.db.models import AuditEvent, Job, JobState
from triage_node.db.session import make_engine, make_sessionmaker, transaction
from triage_node.peers import free_port, storescu, wait_until

REPO = Path(__file__).resolve().parents[1]


# -- no default secret outside development ---------------------------------------------
@pytest.mark.parametrize("command", [["serve"], ["token", "create", "--role", "admin"], ["reconcile"]])
def test_start_up_refuses_the_default_secret_in_production(tmp_path: Path, command: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
    env.update(TRIAGE_ENVIRONMENT="production", TRIAGE_DATA_DIR=str(tmp_path),
               TRIAGE_DICOM_PORT=str(free_port()), TRIAGE_HTTP_PORT=str(free_port()))
    proc = subprocess.run([TRIAGE_NODE, *command], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "TRIAGE_SECRET_KEY" in proc.stderr
    assert not list(tmp_path.rglob("*.db"))  # refused before touching anything


# -- a full run: logs and file modes -------------------------------------------------------
SECRET_KEY = "site-secret-Kq8vZ2"
DEST_TOKEN = "pacs-bearer-Wm3xT7"
DB_PASSWORD = "db-passw0rd-Hy5rN1"


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory, postgres_server) -> dict:  # type: ignore[no-untyped-def]
    """storescu -> serve (JSON logs) -> worker; returns the logs, the truth and the paths."""
    root = tmp_path_factory.mktemp("full-run")
    card = shared_model_card()
    studies = root / "studies"
    env_base = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
    subprocess.run([TRIAGE_NODE, "synth", "--out", str(studies), "--studies", "2", "--seed", "11",
                    "--positive-fraction", "0.5", "--rows", "256", "--components", "axial"],
                   check=True, capture_output=True, env=env_base, timeout=300)
    truth = json.loads((studies / "studies.json").read_text())
    database = postgres_server.create_database()
    database_url = database.replace("postgres@", f"postgres:{DB_PASSWORD}@")  # trust auth ignores it
    env = {
        "TRIAGE_SECRET_KEY": SECRET_KEY,
        "TRIAGE_MODEL_REPOSITORY": str(card.parent / "models"),
        "TRIAGE_MODEL_CARD": str(card),
        "TRIAGE_DESTINATIONS": json.dumps([{"name": "pacs", "kind": "dicomweb", "token": DEST_TOKEN,
                                            "url": f"http://127.0.0.1:{free_port()}/dicom-web"}]),
    }
    node = NodeProcess(root / "data", database_url=database_url, env=env)
    worker = WorkerProcess({**node.env_settings}, root / "worker.log")
    node.start()
    try:
        worker.start()
        sent = storescu(sorted(studies.rglob("*.dcm")), "127.0.0.1", node.dicom_port, AET)
        assert sent.returncode == 0, sent.stderr
        wait_until(lambda: _done_jobs(node) >= len(truth), "jobs done", timeout=180, interval=0.5,
                   process=worker.process, log=worker.log_path)
        viewer = node.token("viewer", "reader")
        assert httpx.get(node.url + "/api/worklist", headers={"Authorization": f"Bearer {viewer}"},
                         timeout=10).status_code == 200
        assert httpx.get(node.url + "/api/worklist", headers={"Authorization": "Bearer not-a-token-Zp4"},
                         timeout=10).status_code == 401
        run = {"truth": truth, "node": node, "viewer": viewer, "studies": studies}
    finally:
        worker.stop()
        node.stop()
    run["logs"] = {"serve": node.log_text(), "worker": worker.log_path.read_text(errors="replace")}
    node.engine.dispose()
    return run


def _done_jobs(node: NodeProcess) -> int:
    with node.session_factory() as session:
        return len(session.scalars(select(Job).where(Job.state == JobState.done)).all())


def test_the_full_run_worked(full_run: dict) -> None:
    assert _done_jobs(full_run["node"]) >= len(full_run["truth"])
    for name, log in full_run["logs"].items():
        lines = [line for line in log.splitlines() if line.startswith("{")]
        assert len(lines) > 5, f"{name}: no JSON log lines"


def test_no_patient_identifier_in_any_log_line(full_run: dict) -> None:
    needles = set()
    for study in full_run["truth"]:
        needles.add(study["patient_id"])
        name = study["patient_name"]
        if name:
            needles.add(name)
            needles.update(part for part in re.split(r"[\^ ]", name) if len(part) >= 3)
    # The objects the node received did carry them (so the check below can fail).
    sent = b"".join(p.read_bytes()[:4096] for p in full_run["studies"].rglob("*.dcm"))
    assert all(study["patient_id"].encode() in sent for study in full_run["truth"])
    for log_name, log in full_run["logs"].items():
        for needle in needles:
            assert needle not in log, f"{needle!r} in the {log_name} log"


def test_no_credential_in_any_log_line(full_run: dict) -> None:
    for log_name, log in full_run["logs"].items():
        for needle in (SECRET_KEY, DEST_TOKEN, DB_PASSWORD, full_run["viewer"], "not-a-token-Zp4"):
            assert needle not in log, f"a credential in the {log_name} log"


def _modes(root: Path) -> tuple[set[str], set[str]]:
    bad_files, bad_dirs = set(), set()
    for path in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        if path.is_dir() and mode != 0o700:
            bad_dirs.add(f"{path.relative_to(root.parent)} {mode:o}")
        elif path.is_file() and mode != 0o600:
            bad_files.add(f"{path.relative_to(root.parent)} {mode:o}")
    return bad_files, bad_dirs


def test_spool_and_result_files_are_0600_in_0700_folders(full_run: dict) -> None:
    data_dir = full_run["node"].data_dir
    for folder in (data_dir / "spool", data_dir / "results"):
        assert folder.is_dir() and any(folder.rglob("*.dcm"))
        assert _modes(folder) == (set(), set())


# -- the audit table is append-only --------------------------------------------------------
WRITE_PATHS = re.compile(
    r"update\(\s*AuditEvent|delete\(\s*AuditEvent|query\(\s*AuditEvent\s*\)[^\n]*\.(update|delete)\("
    r"|(UPDATE|DELETE\s+FROM|TRUNCATE)\s+(TABLE\s+)?audit_events",
    re.IGNORECASE,
)


def test_no_update_or_delete_path_for_audit_rows_in_the_code() -> None:
    offenders = []
    for package in ("triage_node", "worker"):
        for path in (REPO / package).rglob("*.py"):
            source = path.read_text()
            for match in WRITE_PATHS.finditer(source):
                offenders.append(f"{path.relative_to(REPO)}: {match.group(0)}")
            if "AuditEvent" in source and re.search(r"session\.delete\(\s*(event|audit|row|e)\b", source):
                offenders.append(f"{path.relative_to(REPO)}: session.delete of an audit row")
    # The one sanctioned path: retention prunes rows past `retention_audit_days`, after
    # recording the pruning, through the gate the triggers check (migration 0007).
    sanctioned = "triage_node/retention/deletion.py: delete(AuditEvent"
    assert offenders.count(sanctioned) == 1
    assert [o for o in offenders if o != sanctioned] == []
    # The pattern finds what it looks for.
    assert WRITE_PATHS.search("session.execute(update(AuditEvent).values(outcome='ok'))")
    assert WRITE_PATHS.search("DELETE FROM audit_events WHERE id = 1")


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_database_refuses_update_delete_and_truncate_of_audit_rows(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = f"sqlite:///{tmp_path / 'audit.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_db")
    schema.upgrade(url)
    engine = make_engine(url)
    factory = make_sessionmaker(engine)
    try:
        with transaction(factory) as session:
            audit.record(session, "test.event", actor="test", detail_value=1)
        statements = ["UPDATE audit_events SET outcome = 'changed'", "DELETE FROM audit_events"]
        if backend == "postgresql":
            statements.append("TRUNCATE audit_events")
        for statement in statements:
            with pytest.raises(DatabaseError, match="append-only"):
                with engine.begin() as conn:
                    conn.execute(text(statement))
        with factory() as session:
            (event,) = session.scalars(select(AuditEvent)).all()
            assert event.outcome == "ok"
            event.outcome = "changed"  # the ORM path is refused too
            with pytest.raises(DatabaseError, match="append-only"):
                session.commit()
    finally:
        engine.dispose()


def test_the_embedded_sqlite_database_is_private(tmp_path: Path) -> None:
    """The SQLite file (and its WAL) holds study rows and the audit trail: 0600, as the spool."""
    from tests.ingest_support import ct_dataset, part10
    from triage_node.ingest.store import InstanceStore

    settings = load_settings(data_dir=tmp_path / "data", min_free_disk_mb=1)
    schema.upgrade(settings.effective_database_url)
    engine = make_engine(settings.effective_database_url)
    try:
        store = InstanceStore(settings, make_sessionmaker(engine))
        assert store.store(part10(ct_dataset("1.2.3", "1.2.3.4", 0)), calling_ae="A", peer="127.0.0.1",
                           source="dimse").stored
        files = sorted((tmp_path / "data").glob("triage.db*"))
        assert [f.name for f in files][:1] == ["triage.db"]
        assert {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {
            f.name: oct(0o600) for f in files}
    finally:
        engine.dispose()
