"""Readers' feedback on AI results: the API, the audit trail as its store, the CSV export,
the PPV readers judge, and ``triage-node feedback export`` (SQLite and PostgreSQL)."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from tests.worklist_factory import (  # noqa: F401 (fixtures)
    add_result,
    add_study,
    api,
    database,
)
from triage_node.db.models import AuditEvent, JobState
from triage_node.db.session import transaction
from triage_node.worklist.feedback import summarise
from triage_node.worklist.priority import compute_priority

NOW = datetime.now(UTC)


def seed(api) -> dict[str, str]:
    with transaction(api.db.factory) as session:
        pos = add_study(session, patient_name="Novak^Adam")
        add_result(session, pos, {"any": 0.96, "subdural": 0.93, "intraparenchymal": 0.61})
        pos2 = add_study(session, patient_name="Silva^Rui")
        add_result(session, pos2, {"any": 0.81, "epidural": 0.7})
        neg = add_study(session, patient_name="Okafor^Ben")
        add_result(session, neg, {"any": 0.05})
        pending = add_study(session, patient_name="Lind^Eva")
        for study in (pos, pos2, neg, pending):
            compute_priority(session, study, api.settings)
        return {"pos": pos.study_uid, "pos2": pos2.study_uid, "neg": neg.study_uid, "pending": pending.study_uid}


def post(client, uid: str, **body):
    return client.post(f"/api/studies/{uid}/feedback", json=body)


def test_feedback_is_an_audit_event_naming_the_reader_result_and_model(api):
    uids = seed(api)
    response = post(api.client("viewer"), uids["pos"], verdict="agree", comment="  clear\nSDH  ")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["reader"] == "token:viewer-user" and body["verdict"] == "agree"
    assert body["comment"] == "clear SDH"  # one line, for the CSV
    assert body["ai_positive"] is True and body["ai_positive_classes"] == ["intraparenchymal", "subdural"]
    assert body["accession_number"] == "ACC1" and body["patient_name"] is None  # viewer: no names
    assert body["at"].endswith("Z") or body["at"].endswith("+00:00")
    with api.db.factory() as session:
        event = session.scalars(select(AuditEvent).where(AuditEvent.action == "result.feedback")).one()
    assert event.actor == "token:viewer-user" and event.study_uid == uids["pos"] and event.job_id == body["job_id"]
    detail = event.detail
    assert detail["verdict"] == "agree" and detail["comment"] == "clear SDH"
    assert detail["model_version"] == "0.1.0" and detail["device_uid"] == "1.2.3.4"
    assert detail["probabilities"]["any"] == 0.96 and detail["positive"] is True
    # No patient identifier in the audit detail.
    assert "Novak" not in str(detail) and "PID-" not in str(detail)


def test_feedback_refusals(api):
    uids = seed(api)
    viewer = api.client("viewer")
    assert api.client(None).post(f"/api/studies/{uids['pos']}/feedback", json={"verdict": "agree"}).status_code == 401
    assert post(api.client("sender"), uids["pos"], verdict="agree").status_code == 403
    assert post(viewer, uids["pending"], verdict="agree").status_code == 404  # no result yet
    assert post(viewer, "1.2.3.4.5", verdict="agree").status_code == 404
    assert post(viewer, uids["pos"], verdict="maybe").status_code == 422
    assert post(viewer, uids["pos"], verdict="comment", comment="   ").status_code == 422
    assert post(viewer, uids["pos"], verdict="agree", comment="x" * 2001).status_code == 422
    assert post(viewer, uids["pos"], verdict="agree", colour="red").status_code == 422
    assert post(viewer, uids["pos"], verdict="agree", job_id=999999).status_code == 404
    with api.db.factory() as session:
        assert not session.scalars(select(AuditEvent).where(AuditEvent.action == "result.feedback")).all()
        denied = session.scalars(select(AuditEvent).where(AuditEvent.action == "auth.forbidden")).all()
    assert [d.actor for d in denied] == ["token:sender-user"]


def test_feedback_on_a_named_job_keeps_what_that_result_said(api):
    with transaction(api.db.factory) as session:
        study = add_study(session)
        old = add_result(session, study, {"any": 0.9, "epidural": 0.8}, state=JobState.superseded.value,
                         created_at=NOW - timedelta(minutes=5))
        new = add_result(session, study, {"any": 0.2}, created_at=NOW)
        uid, old_job, new_job = study.study_uid, old.job_id, new.job_id
    viewer = api.client()
    assert post(viewer, uid, verdict="disagree").json()["job_id"] == new_job  # the current result
    judged = post(viewer, uid, verdict="agree", job_id=old_job).json()
    assert judged["job_id"] == old_job and judged["ai_positive_classes"] == ["epidural"]


def test_csv_has_one_row_per_feedback_and_names_only_for_admin(api):
    uids = seed(api)
    viewer, admin = api.client("viewer"), api.client("admin")
    post(viewer, uids["pos"], verdict="disagree")
    post(viewer, uids["pos"], verdict="agree", comment="=HYPERLINK(\"http://x\")")  # changed mind
    post(admin, uids["pos2"], verdict="disagree", comment="motion artefact")
    post(viewer, uids["neg"], verdict="agree")
    post(viewer, uids["neg"], verdict="comment", comment="old infarct, not a bleed")
    response = viewer.get("/api/feedback.csv")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert len(rows) == 5 and response.headers["x-total-count"] == "5"
    assert list(rows[0]) == ["time_utc", "study_uid", "accession_number", "verdict", "comment", "model_version",
                             "ai_positive", "ai_positive_classes", "job_id", "reader", "device_uid"]
    assert [r["verdict"] for r in rows] == ["disagree", "agree", "disagree", "agree", "comment"]
    assert rows[1]["comment"].startswith("'=")  # a spreadsheet does not run it
    assert rows[0]["ai_positive_classes"] == "intraparenchymal;subdural" and rows[0]["ai_positive"] == "true"
    assert rows[3]["ai_positive"] == "false" and rows[2]["reader"] == "token:admin-user"
    assert all(datetime.fromisoformat(r["time_utc"]).utcoffset() == timedelta(0) for r in rows)
    assert "Novak" not in response.text and "PID-" not in response.text
    # PPV as judged: pos (latest: agree) and pos2 (disagree) -> 0.5.
    assert response.headers["x-reader-ppv"] == "0.5"
    full = list(csv.DictReader(io.StringIO(admin.get("/api/feedback.csv").text)))
    assert full[0]["patient_name"] == "Novak^Adam" and full[0]["patient_id"].startswith("PID-")
    assert api.client("sender").get("/api/feedback.csv").status_code == 403
    assert api.client(None).get("/api/feedback.csv").status_code == 401
    # A time window.
    later = viewer.get("/api/feedback.csv", params={"since": (datetime.now(UTC) + timedelta(minutes=1)).isoformat()})
    assert later.text.count("\n") == 1


def test_summary_counts_each_readers_latest_verdict_per_result(api):
    uids = seed(api)
    viewer, admin = api.client("viewer"), api.client("admin")
    post(viewer, uids["pos"], verdict="disagree")
    post(viewer, uids["pos"], verdict="agree")
    post(admin, uids["pos"], verdict="agree")
    post(viewer, uids["pos2"], verdict="disagree")
    post(viewer, uids["neg"], verdict="agree")
    post(viewer, uids["neg"], verdict="comment", comment="ok")
    body = viewer.get("/api/feedback").json()
    summary = body["summary"]
    assert summary["feedback"] == 6
    assert summary["by_verdict"] == {"agree": 3, "disagree": 2, "comment": 1}
    assert summary["ai_positive_judged"] == 3 and summary["ai_positive_agreed"] == 2
    assert summary["ppv"] == round(2 / 3, 4) and summary["npv"] == 1.0
    assert summary["by_model_version"]["0.1.0"]["ppv"] == round(2 / 3, 4)
    assert len(body["items"]) == 6 and body["items"][0]["patient_name"] is None
    assert summarise([])["ppv"] is None


def test_feedback_export_command_writes_the_csv_and_prints_the_ppv(api, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from triage_node.cli import build_app

    uids = seed(api)
    post(api.client(), uids["pos"], verdict="agree")
    post(api.client(), uids["pos2"], verdict="disagree")
    monkeypatch.setenv("TRIAGE_DATABASE_URL", api.db.url)
    out = tmp_path / "feedback.csv"
    result = CliRunner().invoke(build_app(), ["feedback", "export", "--out", str(out),
                                              "--data-dir", str(tmp_path / "data")])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open()))
    assert [r["verdict"] for r in rows] == ["agree", "disagree"] and "patient_name" not in rows[0]
    assert "2 feedback" in result.output and "PPV as judged by readers: 50.0 %" in result.output
    with_names = CliRunner().invoke(build_app(), ["feedback", "export", "--out", str(out), "--with-patient",
                                                  "--data-dir", str(tmp_path / "data")])
    assert with_names.exit_code == 0 and "Novak^Adam" in out.read_text()
