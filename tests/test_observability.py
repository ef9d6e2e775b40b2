"""Monitoring as shipped: the worker's histograms observed at the event (a real delivery to
DCMTK storescp), ``triage_build_info`` on the node and on the worker's own HTTP server,
the positive rate against the expected band, and the Prometheus rules and Grafana
dashboard checked against the metric names the node really exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from datetime import UTC, datetime, timedelta

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.test_delivery import dimse, report_files, settings_for  # noqa: F401 (fixture)
from tests.worklist_factory import (  # noqa: F401 (fixtures)
    add_result,
    add_study,
    build_api,
    sqlite_database,
)
from triage_node.config import REPO_ROOT, load_settings
from triage_node.db.models import Job
from triage_node.db.session import transaction
from triage_node.metrics import BuildInfo, expected_positive_rates, expected_rates_from_cv
from triage_node.outbox import enqueue_outbox
from triage_node.peers import free_port
from worker import metrics as worker_metrics
from worker.pipeline.delivery import deliver_due

PROMETHEUS = REPO_ROOT / "deploy" / "prometheus"
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "dashboards" / "triage.json"
#: Series Prometheus makes itself, and PromQL functions and keywords.
NOT_EXPORTED = {"up"}


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def worker_text(settings) -> str:
    return generate_latest(worker_metrics.exposition_registry(BuildInfo.from_settings(settings))).decode()


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


def test_result_at_pacs_is_observed_when_the_last_object_is_stored(sqlite_database, tmp_path, report_files,
                                                                     storescp):
    scp = storescp(aet="ARCHIVE")
    settings = settings_for(tmp_path, dimse("obs-pacs", scp.port, "ARCHIVE"))
    study_uid, objects = report_files
    with transaction(sqlite_database.factory) as session:
        study = add_study(session)
        job = add_result(session, study, {"any": 0.9}).job
        job.last_instance_at = datetime.now(UTC) - timedelta(seconds=40)
        enqueue_outbox(session, job.id, study_uid, objects, settings.destinations)
    before = worker_text(settings)
    report = deliver_due(sqlite_database.factory, settings)
    assert report.sent == len(objects) and len(scp.files()) == len(objects)
    after = worker_text(settings)
    count = "triage_result_at_pacs_seconds_count"
    # One job, all of its objects at one destination: one observation, about 40 s.
    assert value(after, count, destination="obs-pacs") == value(before, count, destination="obs-pacs") + 1
    assert value(after, "triage_result_at_pacs_seconds_bucket", destination="obs-pacs", le="30.0") == 0
    assert value(after, "triage_result_at_pacs_seconds_bucket", destination="obs-pacs", le="45.0") == 1
    assert value(after, "triage_results_delivered_total", destination="obs-pacs") == 1
    assert value(after, "triage_delivery_tries_total", destination="obs-pacs", outcome="sent") == len(objects)
    # A second pass sends nothing and observes nothing.
    deliver_due(sqlite_database.factory, settings)
    assert value(worker_text(settings), count, destination="obs-pacs") == value(after, count, destination="obs-pacs")


def test_stage_latency_is_observed_per_job_not_rebuilt(sqlite_database):
    with transaction(sqlite_database.factory) as session:
        job = add_result(session, add_study(session), {"any": 0.1}).job
        job.last_instance_at = job.enqueued_at - timedelta(seconds=30)
    with sqlite_database.factory() as session:
        job = session.get(Job, job.id)
    before = generate_latest(worker_metrics.REGISTRY).decode()
    worker_metrics.observe_stages(job)
    after = generate_latest(worker_metrics.REGISTRY).decode()
    for stage in ("queue_wait", "inference", "reporting", "end_to_end"):
        assert value(after, "triage_stage_seconds_count", stage=stage) == \
            value(before, "triage_stage_seconds_count", stage=stage) + 1
    # Inference took 10 s in the factory's job.
    assert value(after, "triage_stage_seconds_sum", stage="inference") - \
        value(before, "triage_stage_seconds_sum", stage="inference") == pytest.approx(10.0)
    # No series_complete_at: the completeness stage is not guessed.
    assert value(after, "triage_stage_seconds_count", stage="completeness") == \
        value(before, "triage_stage_seconds_count", stage="completeness")


def test_the_worker_serves_build_info_and_its_events_over_http(tmp_path):
    card = tmp_path / "model_card.json"
    card.write_text(json.dumps({"name": "ich-triage-test", "version": "7", "device_uid": "1.2.3.7"}))
    settings = load_settings(data_dir=tmp_path / "data", model_card=card)
    port = free_port()
    worker_metrics.start_server("127.0.0.1", port, BuildInfo.from_settings(settings))
    worker_metrics.count_try("http-check", "sent")
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    info = [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == "triage_build_info"]
    assert len(info) == 1
    assert info[0].labels["device_uid"] == "1.2.3.7" and info[0].labels["model_version"] == "7"
    assert info[0].labels["operating_point"] == "high_sensitivity" and info[0].labels["version"]
    assert value(text, "triage_delivery_tries_total", destination="http-check", outcome="sent") >= 1


def test_multiprocess_values_of_pool_processes_are_summed(tmp_path):
    """What the worker's server sees with Celery's prefork pool: a child's observations."""
    code = (
        "import os, sys\n"
        "from worker import metrics\n"
        "metrics.enable_multiprocess()\n"
        "from prometheus_client import generate_latest\n"
        "from triage_node.metrics import BuildInfo\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    metrics.count_try('fork-check', 'sent'); os._exit(0)\n"
        "os.waitpid(pid, 0)\n"
        "metrics.count_try('fork-check', 'sent')\n"
        "info = BuildInfo('v', 'm', '1', '1.2', 'balanced')\n"
        "sys.stdout.write(generate_latest(metrics.exposition_registry(info)).decode())\n"
    )
    out = subprocess.run([str(REPO_ROOT / ".venv" / "bin" / "python"), "-c", code], capture_output=True,
                         text=True, timeout=60, cwd=REPO_ROOT, check=True).stdout
    assert value(out, "triage_delivery_tries_total", destination="fork-check", outcome="sent") == 2
    assert "triage_build_info" in out


def test_node_metrics_carry_build_info_positive_rate_and_disk(sqlite_database, tmp_path):
    card = tmp_path / "model_card.json"
    card.write_text(json.dumps({"name": "ich-triage-test", "version": "7", "device_uid": "1.2.3.7",
                                "expected_positive_rate": {"high_sensitivity": {"any": 0.3, "subdural": 0.1}}}))
    api = build_api(sqlite_database, tmp_path / "data", model_card=card, expected_positive_rate={"any": 0.25})
    now = datetime.now(UTC)
    with transaction(sqlite_database.factory) as session:
        for n in range(4):
            add_result(session, add_study(session), {"any": 0.9 if n == 0 else 0.1}, created_at=now)
        # Two days old, and a superseded job: neither counts.
        add_result(session, add_study(session), {"any": 0.9}, created_at=now - timedelta(days=2))
        add_result(session, add_study(session), {"any": 0.9}, state="superseded", created_at=now)
    text = api.client(None).get("/metrics").text
    info = [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == "triage_build_info"]
    assert info and info[0].labels["device_uid"] == "1.2.3.7"
    assert value(text, "triage_results_last_24h") == 4
    assert value(text, "triage_positive_rate", **{"class": "any"}) == 0.25
    assert value(text, "triage_positive_rate", **{"class": "subdural"}) == 0.0
    # The setting wins over the card; the card fills in the other classes.
    assert value(text, "triage_positive_rate_expected", **{"class": "any"}) == 0.25
    assert value(text, "triage_positive_rate_expected", **{"class": "subdural"}) == 0.1
    assert value(text, "triage_positive_rate_low", **{"class": "subdural"}) == pytest.approx(0.05)
    assert value(text, "triage_positive_rate_high", **{"class": "subdural"}) == pytest.approx(0.2)
    assert value(text, "triage_studies_received_total") >= 6
    assert 0 < value(text, "triage_disk_used_percent") <= 100
    assert value(text, "triage_disk_high_watermark_percent") == api.settings.retention_disk_high_percent
    # The stage histogram is the worker's now: the node no longer rebuilds it per scrape.
    assert "triage_stage_seconds" not in text


def test_expected_rate_from_cross_validation_counts():
    report = {"operating_points_out_of_fold": {"balanced": {
        "any": {"tp": 34, "fn": 2, "tn": 25, "fp": 21}, "subdural": {"tp": 1, "fn": 3, "tn": 60, "fp": 18}}}}
    assert expected_rates_from_cv(report, "balanced") == {"any": round(55 / 82, 4), "subdural": round(19 / 82, 4)}
    shipped = REPO_ROOT / "docs" / "model" / "cv_report.json"
    if shipped.is_file():
        rates = expected_rates_from_cv(json.loads(shipped.read_text()), "high_sensitivity")
        assert rates and all(0 < r < 1 for r in rates.values())
        # Accepted as a setting as measured.
        settings = load_settings(expected_positive_rate=rates)
        assert expected_positive_rates(settings, card={}) == rates


# -- rules and dashboard ------------------------------------------------------------------
def _exported_names(sqlite_database, tmp_path) -> set[str]:
    """Sample names of the node's and the worker's /metrics, with every labelled series present."""
    api = build_api(sqlite_database, tmp_path / "data", expected_positive_rate={"any": 0.5})
    with transaction(sqlite_database.factory) as session:
        add_result(session, add_study(session), {"any": 0.9})
    worker_metrics.observe_delivered("names-check", datetime.now(UTC), datetime.now(UTC))
    worker_metrics.count_try("names-check", "sent")
    with sqlite_database.factory() as session:
        worker_metrics.observe_stages(session.query(Job).first())
    text = api.client(None).get("/metrics").text + worker_text(api.settings)
    names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    return names | NOT_EXPORTED


def _expressions() -> list[tuple[str, str]]:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    out = [(f"alert {r['alert']}", r["expr"]) for g in rules["groups"] for r in g["rules"]]
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']}", target["expr"]))
    return out


def _metric_names(expr: str) -> set[str]:
    expr = re.sub(r'"[^"]*"', '""', expr)               # label values
    expr = re.sub(r"\{[^}]*\}", "", expr)               # matchers
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    tokens = set(re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b(?!\s*\()", expr))
    return {t for t in tokens if t.startswith("triage_") or t in NOT_EXPORTED}


def test_every_rule_and_panel_names_exported_metrics(sqlite_database, tmp_path):
    exported = _exported_names(sqlite_database, tmp_path)
    expressions = _expressions()
    assert len(expressions) > 15
    for where, expr in expressions:
        names = _metric_names(expr)
        assert names, f"{where}: no node metric in {expr!r}"
        missing = names - exported
        assert not missing, f"{where}: {sorted(missing)} not exported by the node or the worker"


def test_the_four_required_alerts_are_there():
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    exprs = {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"]}
    assert "hour()" in exprs["TriageNoStudies"] and "triage_studies_received_total" in exprs["TriageNoStudies"]
    assert "triage_positive_rate_low" in exprs["TriagePositiveRateOutOfBand"]
    assert "dead|refused" in exprs["TriageDeadLetters"]
    assert "triage_disk_high_watermark_percent" in exprs["TriageDiskAboveWatermark"]


def test_dashboard_is_provisioned_from_the_mounted_folder():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "ich-triage"
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for wanted in ("studies in", "result at pacs", "queue depth", "outbox", "dead letters", "positive rate",
                   "build"):
        assert wanted in titles, wanted
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    assert "histogram_quantile(0.5," in exprs and "histogram_quantile(0.95," in exprs
    provider = yaml.safe_load((REPO_ROOT / "deploy/grafana/provisioning/dashboards/triage.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    source = yaml.safe_load((REPO_ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert source["datasources"][0]["uid"] == dashboard["panels"][0]["datasource"]["uid"]


def test_scrape_config_reaches_node_with_a_token_and_every_worker():
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert jobs["triage-node"]["authorization"]["credentials_file"] == "/etc/prometheus/node-token"
    assert jobs["triage-node"]["static_configs"][0]["targets"] == ["node:8080"]
    assert jobs["triage-worker"]["dns_sd_configs"][0]["names"] == ["worker"]
    assert jobs["triage-worker"]["dns_sd_configs"][0]["port"] == 9101
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool not installed (apt-get install prometheus; scripts/test.sh does)")
def test_promtool_accepts_rules_and_config(tmp_path):
    rules = subprocess.run(["promtool", "check", "rules", str(PROMETHEUS / "alerts.yml")],
                           capture_output=True, text=True, timeout=60)
    assert rules.returncode == 0, rules.stdout + rules.stderr
    # The config as mounted in the container, with the paths of this checkout.
    token = tmp_path / "node-token"
    token.write_text("tn_example\n")
    text = (PROMETHEUS / "prometheus.yml").read_text()
    text = text.replace("/etc/prometheus/alerts.yml", str(PROMETHEUS / "alerts.yml"))
    text = text.replace("/etc/prometheus/node-token", str(token))
    config = tmp_path / "prometheus.yml"
    config.write_text(text)
    checked = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True, text=True,
                             timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_beat_runs_the_schedule_alone(tmp_path):
    from typer.testing import CliRunner

    from triage_node.cli import build_app
    from worker.worker_cli import beat_argv, worker_argv

    assert beat_argv("INFO", tmp_path)[:3] == ["beat", "-s", str(tmp_path.resolve() / "celerybeat-schedule")]
    assert "-B" not in worker_argv(["stat"], 1, "INFO", "prefork", False, tmp_path)
    result = CliRunner().invoke(build_app(), ["beat", "--help"])
    assert result.exit_code == 0 and "--no-beat" in result.output

