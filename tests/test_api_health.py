"""``/readyz`` against real dependencies (and their absence); ``/metrics`` in Prometheus format."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime, timedelta

from prometheus_client.parser import text_string_to_metric_families

from tests.worklist_factory import (  # noqa: F401 (fixtures)
    add_result,
    add_study,
    api,
    build_api,
    database,
    sqlite_api,
    sqlite_database,
)
from triage_node.db.models import OutboxItem
from triage_node.db.session import transaction


def model_repository(root):
    """A Triton-layout repository with the two models' files and a model card."""
    for name in ("ich_slice_cnn", "ich_sequence"):
        folder = root / name / "1"
        folder.mkdir(parents=True)
        (folder / "model.onnx").write_bytes(b"onnx")
    card = root / "model_card.json"
    card.write_text(json.dumps({"name": "test"}))
    return root, card


def test_readyz_reports_each_dependency(sqlite_database, tmp_path):
    repo, card = model_repository(tmp_path / "models")
    data = tmp_path / "data"
    (data / "broker" / "queue").mkdir(parents=True)
    ready = build_api(sqlite_database, data, model_repository=repo, model_card=card, min_free_disk_mb=1)
    body = ready.client(None).get("/readyz")
    assert body.status_code == 200, body.json()
    assert set(body.json()["checks"]) == {"database", "broker", "inference", "disk"}
    # Model files gone, a disk floor no disk meets: not ready, and it says why.
    shutil.rmtree(repo / "ich_sequence")
    strict = build_api(sqlite_database, data, model_repository=repo, model_card=card,
                       min_free_disk_mb=10**9)
    body = strict.client(None).get("/readyz")
    assert body.status_code == 503
    checks = body.json()["checks"]
    assert checks["database"]["ok"] and checks["broker"]["ok"]
    shutil.rmtree(data / "broker")
    assert not strict.client(None).get("/readyz").json()["checks"]["broker"]["ok"]
    assert not checks["inference"]["ok"] and "ich_sequence" in checks["inference"]["detail"]
    assert not checks["disk"]["ok"]


def test_readyz_checks_redis_and_triton_for_real(sqlite_database, tmp_path, redis_server):
    repo, card = model_repository(tmp_path / "models")
    up = build_api(sqlite_database, tmp_path / "data", broker_url=redis_server.url,
                   model_repository=repo, model_card=card, min_free_disk_mb=1)
    checks = up.client(None).get("/readyz").json()["checks"]
    assert checks["broker"] == {"ok": True, "detail": "redis answers PING"}
    redis_server.stop()
    down = up.client(None).get("/readyz")
    assert down.status_code == 503 and not down.json()["checks"]["broker"]["ok"]
    # Triton at an address where nothing listens.
    triton = build_api(sqlite_database, tmp_path / "data", inference_backend="triton",
                       triton_url="127.0.0.1:9", min_free_disk_mb=1)
    checks = triton.client(None).get("/readyz").json()["checks"]
    assert not checks["inference"]["ok"]


def test_readyz_database_down_or_not_migrated(tmp_path):
    from tests.worklist_factory import Database
    from triage_node.db.session import make_engine, make_sessionmaker

    engine = make_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    db = Database(url=str(engine.url), factory=make_sessionmaker(engine))
    from triage_node.api.app import create_app
    from triage_node.config import load_settings

    app = create_app(load_settings(data_dir=tmp_path, database_url=db.url), db.factory)
    from starlette.testclient import TestClient

    body = TestClient(app, client=("127.0.0.1", 50000)).get("/readyz").json()
    assert body["status"] == "not ready" and "SchemaOutOfDate" in body["checks"]["database"]["detail"]


def parse(text: str) -> dict:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_metrics_counts_jobs_queue_outbox_and_results(api):
    now = datetime.now(UTC)
    with transaction(api.db.factory) as session:
        study = add_study(session)
        add_result(session, study, {"any": 0.9}, created_at=now)
        add_result(session, study, {"any": 0.1}, state="queued")
        session.add(OutboxItem(study_uid=study.study_uid, sop_uid="1.2.3", path="/x", destination="pacs",
                               state="dead", attempts=8, next_attempt_at=now - timedelta(minutes=1)))
    response = api.client(None).get("/metrics")  # loopback: no token needed
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    m = parse(response.text)
    assert m[("triage_jobs", (("state", "done"),))] == 1
    assert m[("triage_jobs", (("state", "queued"),))] == 1
    assert m[("triage_queue_depth", (("queue", "stat"),))] == 1
    assert m[("triage_delivery_failures_total", ())] == 1
    assert m[("triage_outbox_items", (("state", "dead"),))] == 1
    assert m[("triage_instances_received_total", ())] == 0
    assert m[("triage_studies_received_total", ())] == 1
    # One finished job in the last day, positive for "any"; the queued one has no verdict yet.
    assert m[("triage_results_last_24h", ())] == 1
    assert m[("triage_positive_rate", (("class", "any"),))] == 1.0
    # Stage latencies are observed by the worker at the event (tests/test_observability.py).
    assert not any(name.startswith("triage_stage_seconds") for name, _ in m)


def test_metrics_need_a_token_off_loopback(sqlite_api):
    assert sqlite_api.client(None, host="10.1.2.3").get("/metrics").status_code == 401
    assert sqlite_api.client("sender", host="10.1.2.3").get("/metrics").status_code == 403
    assert sqlite_api.client("viewer", host="10.1.2.3").get("/metrics").status_code == 200
    assert sqlite_api.client(None, host="10.1.2.3").get("/healthz").status_code == 200
