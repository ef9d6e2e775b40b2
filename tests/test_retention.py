"""Retention on SQLite and PostgreSQL: what may go (finished, delivered, not held, old
enough or pushed out by disk use), what a dry run reports, what a run deletes and audits,
the metrics it leaves, audited pruning of the audit trail, and a node kept accepting at
its quota because finished studies make room.

Studies come in through the real `InstanceStore` and `CompletenessTracker` (real spool,
real jobs); the worker's part (job done, SR/SC folder, outbox rows) is written as the
worker writes it, without running inference.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from pydicom.uid import generate_uid
from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import DBAPIError
from typer.testing import CliRunner

from tests.ingest_support import (
    PATIENT_ID,
    PATIENT_NAME,
    ct_dataset,
    database_url,  # noqa: F401  (fixture)
    part10,
)
from tests.worklist_factory import add_study, sqlite_api, sqlite_database  # noqa: F401  (fixtures)
from triage_node.api.health import metrics_registry
from triage_node.cli import build_app
from triage_node.config import load_settings
from triage_node.db import schema
from triage_node.db.models import (
    AuditEvent,
    HL7OutboxItem,
    Instance,
    Job,
    JobState,
    OutboxItem,
    OutboxState,
    Result,
    Series,
    Study,
)
from triage_node.db.session import make_engine, make_sessionmaker, transaction
from triage_node.ingest import watermark as watermark_module
from triage_node.ingest.store import OUT_OF_RESOURCES, SUCCESS, InstanceStore
from triage_node.retention import plan, run, set_legal_hold
from triage_node.studies.completeness import CompletenessTracker
from worker.celery_app import beat_schedule

NOW = datetime.now(UTC)


class Node:
    """The ingest side of a node (store, completeness) on a migrated database."""

    def __init__(self, url: str, data_dir: Path, **overrides: object) -> None:
        values = {"data_dir": data_dir, "database_url": url, "min_free_disk_mb": 1, **overrides}
        self.settings = load_settings(**values)
        schema.upgrade(url)
        self.engine = make_engine(url)
        self.factory = make_sessionmaker(self.engine)
        self.store = InstanceStore(self.settings, self.factory)
        self.tracker = CompletenessTracker(self.settings, self.factory, enqueuer=lambda ids: None)

    def receive(self, slices: int = 10, size: int = 16) -> tuple[str, list[int]]:
        """Send one head CT study and complete its series; returns its UID and the statuses."""
        study, series = generate_uid(), generate_uid()
        statuses = [
            self.store.store(part10(ct_dataset(study, series, i, size=size)), calling_ae="CT",
                             peer="127.0.0.1", source="dimse").status
            for i in range(slices)
        ]
        if SUCCESS in statuses:
            self.tracker.complete_series(series, "test")
        return study, statuses

    def finish(self, study_uid: str, outbox: OutboxState | None = OutboxState.delivered,
               days_ago: float = 0.0) -> None:
        """What the worker writes for a triaged study: job done, SR/SC folder, outbox row."""
        at = NOW - timedelta(days=days_ago)
        with transaction(self.factory) as s:
            study = s.scalar(select(Study).where(Study.study_uid == study_uid))
            job = s.scalar(select(Job).where(Job.study_id == study.id))
            job.state, job.finished_at = JobState.done, at
            out = self.settings.data_dir.resolve() / "results" / str(job.id)
            out.mkdir(parents=True)
            (out / "sr.dcm").write_bytes(b"\0" * 1000)
            s.add(Result(job_id=job.id, study_id=study.id, model_name="m", model_version="1",
                         device_uid="1.2.3", operating_point="balanced", positive=False,
                         study_probabilities={}, decisions={}, slice_probabilities=[], key_slices={},
                         output_dir=str(out), created_at=at))
            if outbox is not None:
                s.add(OutboxItem(job_id=job.id, study_uid=study_uid, sop_uid=generate_uid(),
                                 path=str(out / "sr.dcm"), destination="pacs", state=outbox,
                                 attempts=1, next_attempt_at=at,
                                 delivered_at=at if outbox is OutboxState.delivered else None))

    def age(self, study_uid: str, days: float) -> None:
        """Move the study's last image ``days`` into the past."""
        with transaction(self.factory) as s:
            sid = s.scalar(select(Study.id).where(Study.study_uid == study_uid))
            s.execute(update(Series).where(Series.study_id == sid)
                      .values(last_received_at=NOW - timedelta(days=days)))

    def studies(self) -> set[str]:
        with self.factory() as s:
            return set(s.scalars(select(Study.study_uid)))

    def audit(self, action: str) -> list[AuditEvent]:
        with self.factory() as s:
            return list(s.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.id)))

    def spool_has(self, study_uid: str) -> bool:
        return (self.settings.spool_dir / study_uid).exists()


@pytest.fixture
def node(database_url: str, tmp_path: Path) -> Iterator[Node]:  # noqa: F811
    n = Node(database_url, tmp_path / "data")
    yield n
    n.engine.dispose()


def _five_studies(node: Node) -> dict[str, str]:
    """One study per rule: only ``done`` (finished, delivered, old) may go."""
    uids = {name: node.receive()[0] for name in ("queued", "pending", "held", "young", "done")}
    node.finish(uids["pending"], OutboxState.pending, days_ago=40)
    node.finish(uids["held"], days_ago=40)
    node.finish(uids["young"], days_ago=1)
    node.finish(uids["done"], days_ago=40)
    set_legal_hold(node.factory, uids["held"], True, actor="cli:test", reason="litigation 17")
    for name in ("queued", "pending", "held", "done"):
        node.age(uids[name], 40)
    node.age(uids["young"], 2)
    return uids


def test_only_finished_delivered_unheld_old_studies_are_eligible(node: Node) -> None:
    uids = _five_studies(node)
    p = plan(node.settings, node.factory)
    assert [v.study_uid for v in p.by_age] == [uids["done"]]
    assert p.by_disk == []
    kept = {v.study_uid: v.reason for v in p.kept}
    assert set(kept) == {uids["queued"], uids["pending"], uids["held"]}
    assert "not yet triaged" in kept[uids["queued"]]
    assert "not yet delivered" in kept[uids["pending"]]
    assert kept[uids["held"]] == "legal hold"


def test_given_up_objects_hold_their_study_back_for_the_grace_days(node: Node) -> None:
    recent, stale = node.receive()[0], node.receive()[0]
    node.finish(recent, OutboxState.dead, days_ago=3)
    node.finish(stale, OutboxState.refused, days_ago=35)
    node.age(recent, 40)
    node.age(stale, 40)
    p = plan(node.settings, node.factory)
    assert [v.study_uid for v in p.by_age] == [stale]
    assert "dead less than 30 days ago" in p.kept[0].reason


def test_dry_run_lists_what_would_go_and_why_without_deleting(node: Node) -> None:
    uids = _five_studies(node)
    result = CliRunner().invoke(
        build_app(), ["retention", "--dry-run", "--json", "--data-dir", str(node.settings.data_dir)],
        env={"TRIAGE_DATABASE_URL": node.settings.effective_database_url},
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert [s["study_uid"] for s in report["studies"]] == [uids["done"]]
    assert "older than 30 days" in report["studies"][0]["reason"]
    assert {s["study_uid"] for s in report["kept"]} == {uids["queued"], uids["pending"], uids["held"]}
    assert node.studies() == set(uids.values()) and node.spool_has(uids["done"])
    assert node.audit("retention.deleted") == []
    assert PATIENT_NAME not in result.stdout and PATIENT_ID not in result.stdout


def test_run_deletes_files_then_rows_and_audits_the_batch(node: Node) -> None:
    uids = _five_studies(node)
    with node.factory() as s:
        folder = s.scalar(select(Result.output_dir).join(Study, Study.id == Result.study_id)
                          .where(Study.study_uid == uids["done"]))
    report = run(node.settings, node.factory)
    assert [s["study_uid"] for s in report.studies] == [uids["done"]]
    assert node.studies() == set(uids.values()) - {uids["done"]}
    assert not node.spool_has(uids["done"]) and not Path(folder).exists()
    assert all(node.spool_has(uids[n]) for n in ("queued", "pending", "held", "young"))
    with node.factory() as s:
        assert s.scalar(select(OutboxItem).where(OutboxItem.study_uid == uids["done"])) is None
        assert len(s.scalars(select(Instance)).all()) == 4 * 10
    (row,) = [e for e in node.audit("retention.deleted") if e.detail["kind"] == "studies"]
    assert row.actor == "retention"
    assert row.detail["study_uids"] == [uids["done"]] and row.detail["instances"] == 10
    assert row.detail["bytes"] == report.image_bytes > 0
    assert row.detail["rows"]["instances"] == 10 and row.detail["rows"]["studies"] == 1
    assert PATIENT_NAME not in json.dumps(row.detail) and PATIENT_ID not in json.dumps(row.detail)
    # The held study goes once released (and the release is audited).
    set_legal_hold(node.factory, uids["held"], False, actor="cli:test")
    assert [s["study_uid"] for s in run(node.settings, node.factory).studies] == [uids["held"]]
    assert [e.detail["changed"] for e in node.audit("study.legal_hold_released")] == [True]
    metrics = generate_latest(metrics_registry(node.factory)).decode()
    assert "triage_retention_deleted_studies_total 2.0" in metrics
    assert "triage_retention_deleted_instances_total 20.0" in metrics
    images = sum(e.detail["bytes"] for e in node.audit("retention.deleted") if e.detail["kind"] == "studies")
    assert f'triage_retention_deleted_bytes_total{{kind="images"}} {float(images)}' in metrics
    assert 'triage_retention_deleted_rows_total{table="instances"} 20.0' in metrics


def test_result_files_and_delivered_outbox_rows_go_before_the_study(node: Node) -> None:
    uid = node.receive()[0]
    node.finish(uid, days_ago=31)
    node.age(uid, 10)
    with transaction(node.factory) as s:
        s.add(HL7OutboxItem(study_uid=uid, message_type="ORU^R01", control_id="C1", message="MSH|",
                            state=OutboxState.delivered, delivered_at=NOW - timedelta(days=8)))
    report = run(node.settings, node.factory)
    assert report.studies == [] and report.result_folders == 1
    assert (report.outbox_rows, report.hl7_rows) == (1, 1)
    with node.factory() as s:
        result = s.scalar(select(Result))
        assert result.files_deleted_at is not None and not Path(result.output_dir).exists()
    assert node.studies() == {uid} and node.spool_has(uid)
    assert [e.detail["kind"] for e in node.audit("retention.deleted")] == ["results", "outbox"]


def test_old_audit_rows_are_pruned_only_by_retention_and_the_pruning_is_audited(node: Node) -> None:
    old = NOW - timedelta(days=3000)
    with transaction(node.factory) as s:
        s.execute(insert(AuditEvent), [{"at": old, "actor": "node", "action": "old.event", "outcome": "ok",
                                         "detail": {}} for _ in range(3)])
    # Outside retention the trigger still refuses every DELETE, old rows included.
    with pytest.raises(DBAPIError, match="append-only"):
        with transaction(node.factory) as s:
            s.execute(delete(AuditEvent).where(AuditEvent.action == "old.event"))
    report = run(node.settings, node.factory)
    assert report.audit_rows == 3 and node.audit("old.event") == []
    (row,) = node.audit("retention.deleted")
    assert row.detail["kind"] == "audit" and row.detail["rows"] == {"audit_events": 3}
    # Newer rows stay protected afterwards.
    with pytest.raises(DBAPIError, match="append-only"):
        with transaction(node.factory) as s:
            s.execute(delete(AuditEvent))


def test_legal_hold_command_sets_the_flag_and_audits_it(node: Node) -> None:
    uid = node.receive()[0]
    env = {"TRIAGE_DATABASE_URL": node.settings.effective_database_url}
    args = ["--data-dir", str(node.settings.data_dir)]
    result = CliRunner().invoke(build_app(), ["retention", "hold", uid, "--reason", "case 9", *args], env=env)
    assert result.exit_code == 0, result.output
    with node.factory() as s:
        assert s.scalar(select(Study.legal_hold).where(Study.study_uid == uid)) is True
    assert node.audit("study.legal_hold")[0].detail["reason"] == "case 9"
    missing = CliRunner().invoke(build_app(), ["retention", "release", "1.2.3", *args], env=env)
    assert missing.exit_code == 1


def test_settings_refuse_audit_rows_kept_shorter_than_images() -> None:
    from triage_node.config import SettingsError

    with pytest.raises(SettingsError, match="retention_audit_days"):
        load_settings(retention_instances_days=30, retention_audit_days=10)
    with pytest.raises(SettingsError, match="retention_disk_low_percent"):
        load_settings(retention_disk_high_percent=70, retention_disk_low_percent=80)


def test_the_beat_runs_the_cleaner_when_retention_is_enabled() -> None:
    assert beat_schedule(load_settings())["retention"]["task"] == "worker.retention"
    assert "retention" not in beat_schedule(load_settings(retention_enabled=False))


def test_a_long_run_at_the_quota_keeps_accepting_because_finished_studies_go(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    monkeypatch.setattr(watermark_module, "QUOTA_REFRESH_S", 0.0)
    # 1 MiB of images: about twelve 10-slice 64x64 studies. No age limit comes into it.
    quota = {"retention_disk_quota_mb": 1, "retention_disk_high_percent": 80,
             "retention_disk_low_percent": 50, "retention_instances_days": 365}

    node = Node(database_url, tmp_path / "data", **quota)
    try:
        held, _ = node.receive(slices=10, size=64)
        node.finish(held)
        set_legal_hold(node.factory, held, True, actor="cli:test")
        untriaged, _ = node.receive(slices=10, size=64)  # its job stays queued throughout
        sent = []
        for _ in range(30):
            uid, statuses = node.receive(slices=10, size=64)
            assert statuses == [SUCCESS] * 10, f"study {len(sent)} refused: {statuses}"
            node.finish(uid)
            sent.append(uid)
            run(node.settings, node.factory)  # what the beat does every retention_interval_s
            with node.factory() as s:
                used = sum(s.scalars(select(Instance.size_bytes)))
            assert used < 2**20
        remaining = node.studies()
        assert {held, untriaged} <= remaining and node.spool_has(held) and node.spool_has(untriaged)
        deleted = set(sent) - remaining
        assert len(deleted) >= 20
        batches = node.audit("retention.deleted")
        audited = [u for b in batches if b.detail["kind"] == "studies" for u in b.detail["study_uids"]]
        assert sorted(audited) == sorted(deleted)  # each deletion audited, once
        assert all("disk" in b.detail["reason"] for b in batches if b.detail["kind"] == "studies")
        assert all(not node.spool_has(u) for u in deleted)
        assert node.audit("instance.rejected") == []
        # Without the cleaner the quota is a wall: the node refuses with 0xA700.
        statuses = [s for _ in range(16) for s in node.receive(slices=10, size=64)[1]]
        assert OUT_OF_RESOURCES in statuses
        assert "retention_disk_quota_mb" in node.audit("instance.rejected")[0].detail["reason"]
    finally:
        node.engine.dispose()


def test_admins_set_and_release_the_legal_hold_over_http(sqlite_api) -> None:  # noqa: F811
    with transaction(sqlite_api.db.factory) as s:
        uid = add_study(s).study_uid
    body = {"held": True, "reason": "case 9"}
    assert sqlite_api.client("viewer").put(f"/api/studies/{uid}/legal-hold", json=body).status_code == 403
    with sqlite_api.client("admin") as admin:
        answer = admin.put(f"/api/studies/{uid}/legal-hold", json=body)
        assert answer.status_code == 200 and answer.json() == {"study_uid": uid, "held": True, "changed": True}
        assert admin.put("/api/studies/1.2.3/legal-hold", json=body).status_code == 404
        assert admin.put(f"/api/studies/{uid}/legal-hold", json={"held": False}).json()["changed"] is True
    with sqlite_api.db.factory() as s:
        actions = list(s.scalars(select(AuditEvent.action).where(AuditEvent.study_uid == uid)
                                 .where(AuditEvent.action.like("study.legal_hold%"))))
    assert actions == ["study.legal_hold", "study.legal_hold_released"]
