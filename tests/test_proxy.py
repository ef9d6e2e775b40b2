"""The HTTPS proxy of docker-compose.yml: its template in a real nginx, in front of a real node.

deploy/proxy/templates/triage.conf.template is rendered as the nginx image renders it
(envsubst of the variables compose sets), included in a minimal nginx.conf, and served by
Debian's nginx on free ports with a certificate from `triage-node tls self-signed`.
"""

from __future__ import annotations

import os
import re
import ssl
import subprocess

import httpx
import pytest

from tests.node_process import NodeProcess
from tests.pipeline_helpers import ct_series_files, multipart_related
from triage_node.cli.tls import write_self_signed
from triage_node.config import REPO_ROOT
from triage_node.peers import free_port, port_open, require_binary, wait_until

TEMPLATE = REPO_ROOT / "deploy" / "proxy" / "templates" / "triage.conf.template"
STOW_CT = 'multipart/related; type="application/dicom"; boundary="triage-boundary-1"'


def render(template: str, values: dict[str, str]) -> str:
    """envsubst as the nginx image runs it: only the given ${VAR}s, nginx's $vars untouched."""
    missing = set(re.findall(r"\$\{([A-Z_]+)\}", template)) - set(values)
    assert not missing, f"unset template variables: {missing}"
    return re.sub(r"\$\{([A-Z_]+)\}", lambda m: values[m.group(1)], template)


@pytest.fixture
def node(tmp_path):
    with NodeProcess(tmp_path / "data") as running:
        yield running


@pytest.fixture
def proxy(tmp_path, node):
    nginx = require_binary("nginx", "/usr/sbin")
    certs = tmp_path / "certs"
    write_self_signed(certs, ["localhost", "127.0.0.1"])
    http_port, https_port = free_port(), free_port()
    conf_dir = tmp_path / "nginx"
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi", "logs"):
        (conf_dir / sub).mkdir(parents=True)
    (conf_dir / "triage.conf").write_text(render(TEMPLATE.read_text(), {
        "NODE_UPSTREAM": f"127.0.0.1:{node.http_port}", "PROXY_SERVER_NAME": "localhost",
        "PROXY_HTTP_PORT": str(http_port), "PROXY_HTTPS_PORT": str(https_port),
        "PROXY_CERT_DIR": str(certs), "PROXY_MAX_BODY": "64m",
    }))
    user = "user root;\n" if os.geteuid() == 0 else ""
    (conf_dir / "nginx.conf").write_text(
        f"{user}daemon off;\nworker_processes 1;\npid {conf_dir}/nginx.pid;\nerror_log {conf_dir}/logs/error.log warn;\n"
        "events { worker_connections 64; }\n"
        f"http {{\n  access_log off;\n  client_body_temp_path {conf_dir}/body;\n  proxy_temp_path {conf_dir}/proxy;\n"
        f"  fastcgi_temp_path {conf_dir}/fastcgi;\n  uwsgi_temp_path {conf_dir}/uwsgi;\n  scgi_temp_path {conf_dir}/scgi;\n"
        f"  include {conf_dir}/triage.conf;\n}}\n")
    argv = [nginx, "-p", str(conf_dir), "-e", str(conf_dir / "logs" / "error.log"), "-c", str(conf_dir / "nginx.conf")]
    check = subprocess.run([*argv, "-t"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: port_open(https_port), timeout=15, what="nginx")
        yield {"http": f"http://127.0.0.1:{http_port}", "https": f"https://localhost:{https_port}",
               "cafile": ssl.create_default_context(cafile=str(certs / "cert.pem"))}
    finally:
        process.terminate()
        process.wait(timeout=15)


def test_plain_http_only_redirects_to_https(proxy):
    response = httpx.get(proxy["http"] + "/worklist?q=1", follow_redirects=False)
    assert response.status_code == 301
    assert response.headers["location"].startswith("https://127.0.0.1:") and response.headers["location"].endswith("/worklist?q=1")


def test_https_with_hsts_and_no_server_version(proxy):
    response = httpx.get(proxy["https"] + "/healthz", verify=proxy["cafile"])
    assert response.status_code == 200 and response.json()["status"] == "ok"
    assert response.headers["strict-transport-security"].startswith("max-age=31536000")
    assert response.headers["x-content-type-options"] == "nosniff"
    assert re.fullmatch(r"nginx", response.headers.get("server", "nginx")), "server_tokens must be off"


def test_metrics_are_refused_through_the_proxy(proxy, node):
    assert httpx.get(proxy["https"] + "/metrics", verify=proxy["cafile"]).status_code == 403
    # the node itself serves them (to loopback here, to the monitoring network in compose)
    assert httpx.get(node.url + "/metrics").status_code == 200


def test_api_needs_its_token_through_the_proxy_too(proxy):
    assert httpx.get(proxy["https"] + "/api/worklist", verify=proxy["cafile"]).status_code == 401


def test_stow_through_the_proxy_gets_https_retrieve_urls(proxy, node):
    token = node.token("sender")
    body = multipart_related(ct_series_files(3))
    response = httpx.post(proxy["https"] + "/dicom-web/studies", content=body, verify=proxy["cafile"],
                          headers={"Authorization": f"Bearer {token}", "Content-Type": STOW_CT,
                                   "Accept": "application/dicom+json"}, timeout=60)
    assert response.status_code == 200, response.text
    url = response.json()["00081190"]["Value"][0]
    # the node believed the proxy's X-Forwarded-Proto (it is a trusted proxy): links say https
    assert url.startswith(proxy["https"] + "/dicom-web/studies/"), url


def test_an_untrusted_proxy_is_not_believed(tmp_path):
    with NodeProcess(tmp_path / "data", env={"TRIAGE_HTTP_TRUSTED_PROXIES": "10.255.255.1"}) as node:
        token = node.token("sender")
        response = httpx.post(node.url + "/dicom-web/studies", content=multipart_related(ct_series_files(1)),
                              headers={"Authorization": f"Bearer {token}", "Content-Type": STOW_CT,
                                       "X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.9"}, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["00081190"]["Value"][0].startswith(node.url + "/dicom-web/")
