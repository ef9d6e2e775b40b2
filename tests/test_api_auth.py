"""Token authentication and roles on a real HTTP server (uvicorn + httpx), SQLite and
PostgreSQL; the ``triage-node token`` command; request ids."""

from __future__ import annotations

import hashlib
import hmac

import httpx
import pytest
import structlog
from fastapi import APIRouter, Depends
from sqlalchemy import select, text
from typer.testing import CliRunner

from tests.pipeline_helpers import LiveServer, database_url, session_factory  # noqa: F401
from triage_node.api.app import create_app
from triage_node.api.auth import Principal, create_token, require_role
from triage_node.cli.app import app as cli_app
from triage_node.config import load_settings
from triage_node.db.models import ApiToken, AuditEvent
from triage_node.db.session import transaction


@pytest.fixture
def settings(tmp_path, database_url):
    return load_settings(data_dir=tmp_path, database_url=database_url, min_free_disk_mb=0,
                         secret_key="test-secret-key-0123")


@pytest.fixture
def tokens(settings, session_factory):
    out = {}
    with transaction(session_factory) as session:
        for role in ("viewer", "sender", "admin"):
            out[role] = create_token(session, settings, role, f"{role}-test")[1]
    return out


@pytest.fixture
def server(settings, session_factory):
    app = create_app(settings, session_factory)
    probe = APIRouter()

    @probe.get("/api/probe/viewer")
    def viewer_only(principal: Principal = Depends(require_role("viewer"))):
        return {"name": principal.name, "role": principal.role.value,
                "request_id": structlog.contextvars.get_contextvars().get("request_id")}

    @probe.get("/api/probe/admin")
    def admin_only(principal: Principal = Depends(require_role("admin"))):
        return {"name": principal.name}

    app.include_router(probe)
    with LiveServer(app) as live:
        yield live


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_healthz_is_open(server):
    response = httpx.get(server.url + "/healthz")
    assert response.status_code == 200 and response.json()["status"] == "ok"


def test_openapi_docs_need_no_internet(server, tokens):
    """The /docs page and its assets come from the node itself, not from a CDN."""
    import re

    page = httpx.get(server.url + "/docs", headers=bearer(tokens["viewer"]))
    assert page.status_code == 200
    sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sources and not [s for s in sources if s.startswith(("http://", "https://", "//"))]
    for source in sources:
        assert httpx.get(server.url + source).status_code == 200, source
    schema = httpx.get(server.url + "/openapi.json", headers=bearer(tokens["sender"]))
    assert schema.json()["info"]["title"] == "ICH triage node"


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"])
def test_the_api_description_needs_a_token(server, path):
    response = httpx.get(server.url + path)
    assert response.status_code == 401 and "info" not in response.text
    assert httpx.get(server.url + path, headers=bearer("tn_not-a-token")).status_code == 401
    # A browser is sent to the login page, whose cookie then opens the page.
    browser = httpx.get(server.url + path, headers={"Accept": "text/html"})
    if path == "/openapi.json":
        assert browser.status_code == 401
    else:
        assert browser.status_code == 303 and browser.headers["location"] == f"/login?next={path}"


def test_the_login_cookie_opens_the_api_description(server, tokens):
    for path in ("/docs", "/openapi.json"):
        response = httpx.get(server.url + path, cookies={"triage_token": tokens["viewer"]})
        assert response.status_code == 200, path
    assert httpx.get(server.url + "/openapi.json", cookies={"triage_token": "tn_forged"}).status_code == 401
    # The cookie opens only the description: /api still needs the header (no CSRF path).
    assert httpx.get(server.url + "/api/worklist", cookies={"triage_token": tokens["viewer"]}).status_code == 401


def test_readiness_is_open_on_loopback_only(settings, session_factory, tokens):
    from starlette.testclient import TestClient

    app = create_app(settings, session_factory)
    local = TestClient(app, client=("127.0.0.1", 50000)).get("/readyz")
    assert local.status_code in (200, 503) and "checks" in local.json()
    remote = TestClient(app, client=("10.2.3.4", 50000))
    assert remote.get("/readyz").status_code == 401
    assert remote.get("/readyz", headers=bearer(tokens["sender"])).status_code == 403
    assert remote.get("/readyz", headers=bearer(tokens["viewer"])).status_code in (200, 503)
    assert remote.get("/healthz").status_code == 200  # liveness stays open to all


@pytest.mark.parametrize("path", ["/api/probe/viewer", "/api/no-such-route", "/dicomweb/studies",
                                  "/dicomweb"])
def test_no_anonymous_access_to_api_or_dicomweb_even_in_development(server, settings, path):
    assert settings.environment.value == "development"
    response = httpx.get(server.url + path)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert httpx.post(server.url + "/dicomweb/studies", content=b"x").status_code == 401


@pytest.mark.parametrize("header", ["Bearer tn_not-a-real-token", "Basic dXNlcjpwYXNz", "Bearer",
                                    "tn_token-without-scheme"])
def test_bad_tokens_get_401(server, tokens, header):
    response = httpx.get(server.url + "/api/probe/viewer", headers={"Authorization": header})
    assert response.status_code == 401


def test_roles(server, tokens, session_factory):
    url = server.url + "/api/probe/viewer"
    assert httpx.get(url, headers=bearer(tokens["viewer"])).json()["role"] == "viewer"
    assert httpx.get(url, headers=bearer(tokens["admin"])).json()["role"] == "admin"
    assert httpx.get(url, headers=bearer(tokens["sender"])).status_code == 403
    admin_url = server.url + "/api/probe/admin"
    assert httpx.get(admin_url, headers=bearer(tokens["viewer"])).status_code == 403
    assert httpx.get(admin_url, headers=bearer(tokens["admin"])).status_code == 200
    with session_factory() as session:
        denied = session.scalars(
            select(AuditEvent).where(AuditEvent.action == "auth.forbidden").order_by(AuditEvent.id)
        ).all()
    assert [(e.actor, e.detail["path"]) for e in denied] == [
        ("token:sender-test", "/api/probe/viewer"), ("token:viewer-test", "/api/probe/admin")]
    assert all(e.outcome == "denied" for e in denied)


def test_tokens_are_stored_as_keyed_hashes_only(settings, session_factory, tokens):
    with session_factory() as session:
        rows = {r.role: r for r in session.scalars(select(ApiToken))}
        dump = " ".join(
            str(v) for row in session.execute(text("SELECT * FROM api_tokens")) for v in row
        ) + " ".join(
            str(v) for row in session.execute(text("SELECT * FROM audit_events")) for v in row
        )
    for role, token in tokens.items():
        assert token not in dump
        expected = hmac.new(b"test-secret-key-0123", token.encode(), hashlib.sha256).hexdigest()
        assert rows[role].token_hash == expected
        assert rows[role].token_hash != hashlib.sha256(token.encode()).hexdigest()


def test_a_changed_secret_key_invalidates_tokens(tmp_path, database_url, session_factory, tokens):
    other = load_settings(data_dir=tmp_path, database_url=database_url, secret_key="another-key-0123456")
    with LiveServer(create_app(other, session_factory)) as live:
        response = httpx.post(live.url + "/dicomweb/studies", headers=bearer(tokens["admin"]))
    assert response.status_code == 401


def test_request_id_is_bound_and_echoed(server, tokens):
    response = httpx.get(server.url + "/api/probe/viewer", headers=bearer(tokens["viewer"]))
    generated = response.headers["x-request-id"]
    assert len(generated) == 32 and response.json()["request_id"] == generated
    given = {"X-Request-ID": "abc-123", **bearer(tokens["viewer"])}
    response = httpx.get(server.url + "/api/probe/viewer", headers=given)
    assert response.headers["x-request-id"] == "abc-123"
    assert response.json()["request_id"] == "abc-123"
    hostile = {"X-Request-ID": "a b\"<script>", **bearer(tokens["viewer"])}
    assert httpx.get(server.url + "/api/probe/viewer", headers=hostile).headers[
        "x-request-id"] != "a b\"<script>"
    # Refusals carry one too.
    assert httpx.get(server.url + "/api/probe/viewer").headers["x-request-id"]


def test_token_command_creates_a_working_token_then_revoke_stops_it(
    tmp_path, database_url, settings, session_factory, monkeypatch
):
    from triage_node.cli import token as _token_cli  # noqa: F401  (registers the command)

    monkeypatch.setenv("TRIAGE_DATABASE_URL", database_url)
    monkeypatch.setenv("TRIAGE_SECRET_KEY", "test-secret-key-0123")
    runner = CliRunner()
    result = runner.invoke(cli_app, ["token", "create", "--role", "viewer", "--name", "reader",
                                     "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    token = result.stdout.strip().splitlines()[-1]
    assert token.startswith("tn_") and len(token) > 40
    bad = runner.invoke(cli_app, ["token", "create", "--role", "root", "--data-dir", str(tmp_path)])
    assert bad.exit_code != 0
    with LiveServer(create_app(settings, session_factory)) as live:
        url = live.url + "/dicomweb/studies"
        assert httpx.post(url, headers=bearer(token)).status_code == 403  # viewer cannot STOW
        with session_factory() as session:
            row = session.scalars(select(ApiToken).where(ApiToken.name == "reader")).one()
        revoked = runner.invoke(cli_app, ["token", "revoke", str(row.id), "--data-dir",
                                          str(tmp_path)])
        assert revoked.exit_code == 0, revoked.output
        assert httpx.post(url, headers=bearer(token)).status_code == 401
    listing = runner.invoke(cli_app, ["token", "list", "--json", "--data-dir", str(tmp_path)])
    assert '"revoked_at": null' not in listing.stdout and token not in listing.stdout
    with session_factory() as session:
        actions = session.scalars(select(AuditEvent.action).order_by(AuditEvent.id)).all()
    assert "token.created" in actions and "token.revoked" in actions
