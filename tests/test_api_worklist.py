"""``/api/worklist`` on SQLite and PostgreSQL: refusals, order, filters, changes, audit."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from tests.worklist_factory import (  # noqa: F401 (fixtures)
    add_result,
    add_study,
    api,
    database,
    write_result_objects,
)
from triage_node.db.models import AuditEvent
from triage_node.db.session import transaction
from triage_node.worklist.priority import compute_priority

NOW = datetime.now(UTC)


def seed(api, tmp_path):
    """A positive study (with overlays), a STAT order, and two negatives."""
    settings = api.settings
    with transaction(api.db.factory) as session:
        neg_old = add_study(session, received_at=NOW - timedelta(hours=2), patient_name="Old^Negative")
        add_result(session, neg_old, {"any": 0.04})
        neg_new = add_study(session, received_at=NOW - timedelta(minutes=3), patient_name="New^Negative")
        add_result(session, neg_new, {"any": 0.08})
        stat = add_study(session, received_at=NOW - timedelta(minutes=30), requested_priority="STAT",
                         modality="CT", patient_name="Stat^Order")
        pos = add_study(session, received_at=NOW - timedelta(minutes=1), patient_name="Positive^Bleed")
        objects = write_result_objects(tmp_path / "results" / "pos", pos, n_overlays=2)
        add_result(session, pos, {"any": 0.96, "subdural": 0.93, "subarachnoid": 0.4}, **objects)
        for s in (neg_old, neg_new, stat, pos):
            compute_priority(session, s, settings, reason="test")
        return {"neg_old": neg_old.study_uid, "neg_new": neg_new.study_uid, "stat": stat.study_uid,
                "pos": pos.study_uid}


def test_no_anonymous_access_and_roles_are_enforced(api):
    for path in ("/api/worklist", "/api/audit", "/api/studies/1.2.3", "/dicomweb/studies"):
        response = api.client(None).get(path)
        assert response.status_code == 401, path
        assert response.headers["www-authenticate"].startswith("Bearer")
    bad = api.client(None)
    bad.headers["Authorization"] = "Bearer tn_not-a-real-token"
    assert bad.get("/api/worklist").status_code == 401
    assert api.client("sender").get("/api/worklist").status_code == 403  # STOW-only token
    assert api.client("viewer").get("/api/worklist").status_code == 200
    assert api.client(None).get("/healthz").status_code == 200
    assert "/api/worklist" in api.client("viewer").get("/openapi.json").json()["paths"]


def test_worklist_is_ordered_positive_first_with_details(api, tmp_path):
    uids = seed(api, tmp_path)
    body = api.client().get("/api/worklist").json()
    assert body["total"] == 4
    order = [item["study_uid"] for item in body["items"]]
    assert order == [uids["pos"], uids["stat"], uids["neg_old"], uids["neg_new"]]
    top = body["items"][0]
    assert top["priority_class"] == "STAT-AI" and top["positive"] is True
    assert top["positive_classes"] == ["subdural"]
    assert top["probabilities"]["subdural"] == 0.93
    assert top["thumbnail_url"].startswith(f"/api/studies/{uids['pos']}/objects/")
    assert 50 <= top["waiting_seconds"] < 600
    assert body["items"][1]["priority_class"] == "STAT-order" and body["items"][1]["positive"] is None
    # The PNG thumbnail is a real image.
    png = api.client().get(top["thumbnail_url"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_ageing_orders_the_two_negatives_by_waiting_time(api, tmp_path):
    uids = seed(api, tmp_path)
    items = api.client().get("/api/worklist", params={"priority_class": "routine"}).json()["items"]
    # 0.04 + 2 h x 0.05/h = 0.14 > 0.08 + ~0: the older study first.
    assert [i["study_uid"] for i in items] == [uids["neg_old"], uids["neg_new"]]
    assert items[0]["effective_score"] > items[0]["score"]


def test_filters_and_pagination(api, tmp_path):
    uids = seed(api, tmp_path)
    client = api.client()
    page = client.get("/api/worklist", params={"limit": 2, "offset": 1}).json()
    assert page["total"] == 4 and len(page["items"]) == 2 and page["offset"] == 1
    stat_only = client.get("/api/worklist", params=[("priority_class", "STAT-AI"), ("priority_class", "STAT-order")])
    assert [i["study_uid"] for i in stat_only.json()["items"]] == [uids["pos"], uids["stat"]]
    since = (NOW - timedelta(minutes=10)).isoformat()
    recent = client.get("/api/worklist", params={"since": since}).json()
    assert {i["study_uid"] for i in recent["items"]} == {uids["pos"], uids["neg_new"]}
    assert client.get("/api/worklist", params={"modality": "MR"}).json()["total"] == 0
    assert client.get("/api/worklist", params={"status": "archived"}).status_code == 422
    assert client.get("/api/worklist", params={"limit": 0}).status_code == 422


def test_patch_status_and_manual_priority_are_audited(api, tmp_path):
    uids = seed(api, tmp_path)
    viewer, admin = api.client("viewer"), api.client("admin")
    items = viewer.get("/api/worklist").json()["items"]
    neg = next(i for i in items if i["study_uid"] == uids["neg_new"])
    r = viewer.patch(f"/api/worklist/{neg['id']}", json={"status": "reading", "reason": "opened"})
    assert r.status_code == 200 and r.json()["status"] == "reading"
    # A viewer may not set priorities; an admin may.
    r = viewer.patch(f"/api/worklist/{neg['id']}", json={"manual_priority_class": "STAT-order"})
    assert r.status_code == 403
    r = admin.patch(f"/api/worklist/{neg['id']}",
                    json={"manual_priority_class": "STAT-order", "reason": "clinician called"})
    assert r.status_code == 200
    assert r.json()["priority_class"] == "STAT-order" and r.json()["manual_priority_class"] == "STAT-order"
    order = [i["study_uid"] for i in viewer.get("/api/worklist").json()["items"]]
    assert order.index(uids["neg_new"]) < order.index(uids["neg_old"])
    # Done studies leave the default reading list only when filtered out.
    viewer.patch(f"/api/worklist/{neg['id']}", json={"status": "done"})
    open_items = viewer.get("/api/worklist", params=[("status", "new"), ("status", "reading")]).json()
    assert uids["neg_new"] not in [i["study_uid"] for i in open_items["items"]]
    assert viewer.patch("/api/worklist/999999", json={"status": "done"}).status_code == 404
    assert viewer.patch(f"/api/worklist/{neg['id']}", json={"status": "lost"}).status_code == 422
    assert viewer.patch(f"/api/worklist/{neg['id']}", json={"colour": "red"}).status_code == 422
    with api.db.factory() as session:
        events = session.scalars(
            select(AuditEvent).where(AuditEvent.study_uid == uids["neg_new"]).order_by(AuditEvent.id)
        ).all()
        denied = session.scalars(select(AuditEvent).where(AuditEvent.action == "auth.forbidden")).all()
    actions = [(e.action, e.actor) for e in events if e.action != "worklist.priority" or e.actor != "node"]
    assert ("worklist.status", "token:viewer-user") in actions
    assert ("worklist.manual_priority", "token:admin-user") in actions
    manual = next(e for e in events if e.action == "worklist.manual_priority")
    assert manual.detail["reason"] == "clinician called"
    assert any(d.actor == "token:viewer-user" for d in denied)


def _uids(response) -> list[str]:
    assert response.status_code == 200, response.text
    return [i["study_uid"] for i in response.json()["items"]]


def test_sort_by_any_column_both_ways_with_the_priority_order_as_tie_break(api, tmp_path):
    uids = seed(api, tmp_path)
    client = api.client()
    by_name = _uids(client.get("/api/worklist", params={"sort": "patient"}))
    assert by_name == [uids["neg_new"], uids["neg_old"], uids["pos"], uids["stat"]]  # New, Old, Positive, Stat
    assert _uids(client.get("/api/worklist", params={"sort": "patient", "order": "desc"})) == by_name[::-1]
    # Probability of ICH, highest first; the STAT order without a result last either way.
    assert _uids(client.get("/api/worklist", params={"sort": "probability", "order": "desc"})) == [
        uids["pos"], uids["neg_new"], uids["neg_old"], uids["stat"]]
    assert _uids(client.get("/api/worklist", params={"sort": "probability"}))[-1] == uids["stat"]
    assert _uids(client.get("/api/worklist", params={"sort": "finding", "order": "desc"}))[0] == uids["pos"]
    assert _uids(client.get("/api/worklist", params={"sort": "received"})) == [
        uids["neg_old"], uids["stat"], uids["neg_new"], uids["pos"]]
    assert _uids(client.get("/api/worklist", params={"sort": "waiting", "order": "desc"})) == [
        uids["neg_old"], uids["stat"], uids["neg_new"], uids["pos"]]
    # Equal keys (all CT, all new) keep the priority order.
    default = _uids(client.get("/api/worklist"))
    for key in ("modality", "status", "accession"):
        assert _uids(client.get("/api/worklist", params={"sort": key})) == default, key
    assert _uids(client.get("/api/worklist", params={"sort": "priority", "order": "desc"})) == default[::-1]
    assert client.get("/api/worklist", params={"sort": "colour"}).status_code == 422


def test_search_by_patient_name_id_or_accession_and_filter_by_finding(api, tmp_path):
    uids = seed(api, tmp_path)
    client = api.client()
    assert _uids(client.get("/api/worklist", params={"q": "positive bleed"})) == [uids["pos"]]
    assert _uids(client.get("/api/worklist", params={"q": "BLEED"})) == [uids["pos"]]
    assert _uids(client.get("/api/worklist", params={"q": "bleed positive"})) == []  # words in order
    with api.db.factory() as session:
        from triage_node.db.models import Study

        pid = session.query(Study).filter_by(study_uid=uids["stat"]).one().patient_id
    assert _uids(client.get("/api/worklist", params={"q": pid.lower()})) == [uids["stat"]]
    assert len(_uids(client.get("/api/worklist", params={"q": "acc1"}))) == 4
    assert _uids(client.get("/api/worklist", params={"q": "100%"})) == []  # LIKE wildcards are literal
    assert _uids(client.get("/api/worklist", params={"q": "_"})) == []
    assert _uids(client.get("/api/worklist", params={"finding": "any"})) == [uids["pos"]]
    assert _uids(client.get("/api/worklist", params={"finding": "subdural"})) == [uids["pos"]]
    assert _uids(client.get("/api/worklist", params={"finding": "subarachnoid"})) == []  # 0.4: not decided
    assert _uids(client.get("/api/worklist", params={"finding": "pending"})) == [uids["stat"]]
    assert set(_uids(client.get("/api/worklist", params={"finding": "negative"}))) == {uids["neg_old"], uids["neg_new"]}
    assert client.get("/api/worklist", params={"finding": "tumour"}).status_code == 422


def test_finding_filter_reads_the_current_result_not_a_superseded_one(api, tmp_path):
    from triage_node.db.models import JobState

    with transaction(api.db.factory) as session:
        study = add_study(session, patient_name="Rerun^Study")
        add_result(session, study, {"any": 0.9, "epidural": 0.8}, state=JobState.superseded.value,
                   created_at=NOW - timedelta(minutes=5))
        add_result(session, study, {"any": 0.1}, created_at=NOW)
        compute_priority(session, study, api.settings)
        uid = study.study_uid
    client = api.client()
    assert _uids(client.get("/api/worklist", params={"finding": "epidural"})) == []
    assert _uids(client.get("/api/worklist", params={"finding": "negative"})) == [uid]
