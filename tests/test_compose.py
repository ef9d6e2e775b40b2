"""docker-compose.yml checked against the code and by `docker-compose config` (no Docker engine runs here)."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest
import yaml
from pydantic import ValidationError

from triage_node.config import REPO_ROOT, Settings
from triage_node.peers import require_binary

COMPOSE = REPO_ROOT / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return env


def test_services_of_a_site_are_there(compose):
    assert set(compose["services"]) >= {
        "postgres",
        "redis",
        "triton",
        "orthanc",
        "node",
        "worker",
        "beat",
        "flower",
        "migrate",
        "prometheus",
        "grafana",
    }


def test_every_triage_variable_is_a_setting(compose):
    fields = {f"TRIAGE_{name.upper()}" for name in Settings.model_fields}
    used = set()
    for name, service in compose["services"].items():
        for key in _env(service):
            if key.startswith("TRIAGE_"):
                assert key in fields, f"{name}: {key} is not a Settings field"
                used.add(key)
    example = (REPO_ROOT / ".env.example").read_text()
    for key in re.findall(r"^(TRIAGE_[A-Z_]+)=", example, flags=re.M):
        assert key in fields, f".env.example: {key} is not a Settings field"
    assert "TRIAGE_DATABASE_URL" in used and "TRIAGE_BROKER_URL" in used


def test_production_values_pass_validation(compose):
    env = _env(compose["services"]["node"])
    values = {
        key[len("TRIAGE_") :].lower(): re.sub(r"\$\{[^}]*\}", "x", str(value))
        for key, value in env.items()
        if key.startswith("TRIAGE_")
    }
    values["allowed_callers"] = ["*@172.16.0.0/12"]
    values["secret_key"] = "a-real-site-secret"
    settings = Settings(**values)
    assert settings.environment.value == "production"
    assert settings.inference_backend.value == "triton"


def test_model_repository_and_mounts_exist(compose):
    triton = compose["services"]["triton"]
    assert any(v.startswith("./deploy/triton:/repo") for v in triton["volumes"])
    assert "--model-repository=/repo/models-gpu" in triton["command"]
    assert (REPO_ROOT / "deploy" / "triton" / "models-gpu").is_dir()
    assert (REPO_ROOT / "deploy" / "triton" / "models").is_dir()
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (REPO_ROOT / source).exists(), f"{name}: {source} missing"
            else:
                assert source in compose["volumes"], f"{name}: volume {source} not declared"
    assert (REPO_ROOT / "deploy" / "Dockerfile").is_file()


def test_node_and_worker_share_the_spool(compose):
    def data_volume(service: str) -> str:
        return next(
            v.split(":")[0]
            for v in compose["services"][service]["volumes"]
            if v.split(":")[1] == "/data"
        )

    assert data_volume("node") == data_volume("worker")


def test_commands_are_real_cli_commands(compose):
    from typer.testing import CliRunner

    from triage_node.cli import build_app

    app = build_app()
    runner = CliRunner()
    for name in ("migrate", "node", "worker", "beat", "proxy-cert"):
        argv = compose["services"][name]["command"]
        assert argv[0] == "triage-node"
        result = runner.invoke(app, [*argv[1:], "--help"])
        assert result.exit_code == 0, f"{name}: {argv}: {result.output}"


BIND = "${NODE_BIND_ADDRESS:-127.0.0.1}:"
PROXY_BIND = "${PROXY_BIND_ADDRESS:-127.0.0.1}:"


def _default(value: str) -> str:
    """What ``${VAR:-default}`` becomes when VAR is unset (no other form is used here)."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def test_nothing_is_published_beyond_this_host_unless_asked(compose):
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert _default(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every address"
            assert name in ("node", "proxy") or port.startswith("127.0.0.1:"), \
                f"{name}: only the node's DICOM port and the HTTPS proxy may be opened"
    # plain HTTP stays on this host: users come through the proxy
    assert compose["services"]["node"]["ports"] == [f"{BIND}11112:11112", "127.0.0.1:8080:8080"]
    assert compose["services"]["proxy"]["ports"] == [f"{PROXY_BIND}80:80", f"{PROXY_BIND}443:443"]


def test_the_proxy_fronts_the_node_on_its_own_network(compose):
    proxy, node = compose["services"]["proxy"], compose["services"]["node"]
    assert proxy["networks"] == ["edge"] and "edge" in node["networks"]
    assert _env(proxy)["NODE_UPSTREAM"] == "node:8080"
    assert "./deploy/proxy/templates:/etc/nginx/templates:ro" in proxy["volumes"]
    subnet = compose["networks"]["edge"]["ipam"]["config"][0]["subnet"]
    assert _default(_env(node)["TRIAGE_HTTP_TRUSTED_PROXIES"]) == _default(subnet)
    variables = set(re.findall(r"\$\{([A-Z_]+)\}", (REPO_ROOT / "deploy/proxy/templates/triage.conf.template").read_text()))
    assert variables <= set(_env(proxy)), f"template variables the proxy does not set: {variables - set(_env(proxy))}"
    argv = compose["services"]["proxy-cert"]["command"]
    assert argv[:3] == ["triage-node", "tls", "self-signed"]


def test_no_caller_is_allowed_until_the_site_lists_its_own(compose):
    value = _env(compose["services"]["node"])["TRIAGE_ALLOWED_CALLERS"]
    assert _default(value) == "[]"
    assert Settings(allowed_callers=json.loads(_default(value)), secret_key="a-real-site-secret").allowed_callers == []
    example = (REPO_ROOT / ".env.example").read_text()
    assert re.search(r"^TRIAGE_ALLOWED_CALLERS=\[\]$", example, flags=re.M)
    assert "172.16" not in COMPOSE.read_text() + example


def test_secrets_have_no_default(compose):
    text = COMPOSE.read_text()
    for name in ("TRIAGE_SECRET_KEY", "POSTGRES_PASSWORD", "GRAFANA_ADMIN_PASSWORD"):
        uses = re.findall(r"\$\{" + name + r"(:?[-?=+]?)", text)
        assert uses and set(uses) == {":?"}, f"{name} must be required (${{{name}:?...}})"
    # The example's placeholder is refused, so a copied .env cannot start a node.
    example = dict(re.findall(r"^([A-Z_]+)=(.*)$", (REPO_ROOT / ".env.example").read_text(), flags=re.M))
    with pytest.raises(ValidationError, match="secret_key"):
        Settings(secret_key=example["TRIAGE_SECRET_KEY"])


def test_ports_do_not_collide(compose):
    published = [
        p.rsplit(":", 1)[0] for s in compose["services"].values() for p in s.get("ports", [])
    ]
    assert len(published) == len(set(published))


def test_one_scheduler_however_many_workers(compose):
    services = compose["services"]
    beats = [n for n, s in services.items() if s.get("command", [])[:2] == ["triage-node", "beat"]]
    assert beats == ["beat"]
    assert "replicas" not in services["beat"].get("deploy", {})
    workers = [n for n, s in services.items() if s.get("command", [])[:2] == ["triage-node", "worker"]]
    assert workers
    for name in workers:
        assert "--no-beat" in services[name]["command"], f"{name} runs an embedded beat"


def test_prometheus_and_grafana_on_the_monitoring_network(compose):
    services = compose["services"]
    assert "monitoring" in compose["networks"]
    assert services["prometheus"]["networks"] == ["monitoring"]
    assert services["grafana"]["networks"] == ["monitoring"]
    for name in ("node", "worker"):
        assert "monitoring" in services[name]["networks"] and "default" in services[name]["networks"]
    for name in ("postgres", "redis", "triton", "orthanc"):
        assert "monitoring" not in services[name].get("networks", [])
    # The workers' /metrics (no token) listens inside the container, published nowhere.
    env = _env(services["worker"])
    assert env["TRIAGE_WORKER_METRICS_PORT"] == "9101" and env["TRIAGE_WORKER_METRICS_HOST"] == "0.0.0.0"
    assert not services["worker"].get("ports")
    mounts = services["prometheus"]["volumes"] + services["grafana"]["volumes"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in mounts
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in mounts
    assert "./deploy/grafana/dashboards:/var/lib/grafana/dashboards:ro" in mounts
    # The node labels build_info with the model it serves.
    assert "./deploy/triton/model_card.json:/model_card.json:ro" in services["node"]["volumes"]


def _compose_config(env: dict[str, str]) -> subprocess.CompletedProcess:
    """``docker-compose config -q``: the Compose schema and the variables, no engine needed."""
    binary = require_binary("docker-compose", "/usr/bin")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("TRIAGE_", "POSTGRES_", "GRAFANA_"))}
    return subprocess.run([binary, "-f", str(COMPOSE), "config", "-q"], env={**base, **env},
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def test_docker_compose_config_passes():
    proc = _compose_config({"TRIAGE_SECRET_KEY": "a-real-site-secret", "POSTGRES_PASSWORD": "pw",
                            "GRAFANA_ADMIN_PASSWORD": "pw"})
    assert proc.returncode == 0, proc.stderr


def test_docker_compose_config_refuses_to_run_without_the_secrets():
    proc = _compose_config({"POSTGRES_PASSWORD": "pw", "GRAFANA_ADMIN_PASSWORD": "pw"})
    assert proc.returncode != 0 and "set TRIAGE_SECRET_KEY" in proc.stderr
