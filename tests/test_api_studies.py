"""``/api/studies/{uid}`` and its PNG renders; ``/api/audit`` with filters and CSV."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta

from PIL import Image

from tests.worklist_factory import (  # noqa: F401 (fixtures)
    add_result,
    add_study,
    api,
    database,
    write_result_objects,
)
from triage_node.db.models import JobState
from triage_node.db.session import transaction
from triage_node.worklist.priority import compute_priority, set_status

NOW = datetime.now(UTC)


def test_study_details_with_versions_timings_and_overlays(api, tmp_path):
    with transaction(api.db.factory) as session:
        study = add_study(session, received_at=NOW - timedelta(minutes=5))
        add_result(session, study, {"any": 0.3}, state=JobState.superseded.value,
                   created_at=NOW - timedelta(minutes=3))
        objects = write_result_objects(tmp_path / "results" / "7", study, n_overlays=2)
        add_result(session, study, {"any": 0.9, "epidural": 0.85}, created_at=NOW, **objects)
        compute_priority(session, study, api.settings)
        uid = study.study_uid
    body = api.client().get(f"/api/studies/{uid}").json()
    assert body["priority_class"] == "STAT-AI" and body["status"] == "new"
    assert [(r["version"], r["state"]) for r in body["results"]] == [(2, "done"), (1, "superseded")]
    current = body["results"][0]
    assert current["positive"] is True and current["decisions"]["epidural"] is True
    assert current["probabilities"]["epidural"] == 0.85
    assert current["key_slices"] == {"epidural": [1]}
    assert current["sr_sop_uid"] == objects["sr_sop_uid"]
    assert current["stage_seconds"]["inference"] == 10.0 and current["total_seconds"] is None
    kinds = sorted((o["kind"], o["sop_uid"]) for o in current["objects"])
    assert kinds == sorted([("sr", objects["sr_sop_uid"])] + [("overlay", s) for s in objects["overlay_sop_uids"]])
    assert body["series"][0]["description"] == "AXIAL 5mm"
    overlay = next(o for o in current["objects"] if o["kind"] == "overlay")
    full = api.client().get(overlay["png_url"])
    assert full.status_code == 200
    image = Image.open(io.BytesIO(full.content))
    assert image.mode == "RGB" and image.size == (64, 64)
    red, green, blue = image.getpixel((64 // 2.5, 64 // 3))
    assert red > 200 and red - blue > 100  # the heat is there
    thumb = Image.open(io.BytesIO(api.client().get(overlay["png_url"] + "?size=32").content))
    assert thumb.size == (32, 32)
    sr = next(o for o in current["objects"] if o["kind"] == "sr")
    assert api.client().get(f"/api/studies/{uid}/objects/{sr['sop_uid']}.png").status_code == 415
    assert api.client().get(f"/api/studies/{uid}/objects/1.2.3.png").status_code == 404
    assert api.client().get("/api/studies/1.2.3.4").status_code == 404


def test_audit_filters_and_csv_export(api):
    with transaction(api.db.factory) as session:
        a = add_study(session)
        b = add_study(session)
        entry = compute_priority(session, a, api.settings, actor="node", reason="study received")
        compute_priority(session, b, api.settings, actor="node", reason="study received")
        set_status(session, entry, "reading", actor="token:dr-x", reason="opened")
        uid_a = a.study_uid
    client = api.client()
    everything = client.get("/api/audit").json()
    assert everything["total"] >= 6  # 3 token.created + 2 priorities + 1 status
    by_study = client.get("/api/audit", params={"study": uid_a}).json()
    assert [e["action"] for e in by_study["items"]] == ["worklist.priority", "worklist.status"]
    prefix = client.get("/api/audit", params={"action": "worklist.*"}).json()
    assert prefix["total"] == 3
    actor = client.get("/api/audit", params={"actor": "token:dr-x"}).json()
    assert [e["detail"]["new_status"] for e in actor["items"]] == ["reading"]
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert client.get("/api/audit", params={"since": future}).json()["total"] == 0
    assert client.get("/api/audit", params={"until": future, "limit": 2}).json()["total"] == everything["total"]
    response = client.get("/api/audit", params={"study": uid_a, "format": "csv"})
    assert response.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert [r["action"] for r in rows] == ["worklist.priority", "worklist.status"]
    assert rows[1]["actor"] == "token:dr-x" and '"new_status": "reading"' in rows[1]["detail"]
    assert client.get("/api/audit", params={"format": "xml"}).status_code == 422
