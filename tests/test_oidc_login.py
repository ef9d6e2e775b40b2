"""Sign-in with OpenID Connect against a real provider, in a real headless Chromium.

The provider is panva's ``oidc-provider`` (``tests/oidc/provider.mjs``, started by
`tests.oidc_provider.OidcProvider`), with its own login form; the node runs on uvicorn with
``oidc_issuer`` pointing at it. Nothing is mocked: the codes, tokens, keys and UserInfo
answers are the provider's.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
from joserfc.errors import InvalidClaimError
from playwright.sync_api import expect
from sqlalchemy import select

from tests.oidc_provider import OidcProvider
from tests.test_web_browser import browser, new_page  # noqa: F401 (fixture)
from tests.worklist_factory import Api, RunningApp, build_api, sqlite_database  # noqa: F401 (fixture)
from triage_node.api import oidc as oidc_module
from triage_node.api.oidc import claims_options
from triage_node.db.models import AuditEvent

CLIENT_ID = "triage-node"
CLIENT_SECRET = "node-client-secret-" + secrets.token_hex(8)
OTHER_ID = "other-app"
OTHER_SECRET = "other-client-secret-" + secrets.token_hex(8)
#: The provider's people: their groups map to admin, to viewer, and to nothing.
USERS = {
    "alice": {"name": "Alice Admin", "email": "alice@hospital.example", "groups": ["staff", "triage-admins"]},
    "bob": {"name": "Bob Reader", "email": "bob@hospital.example", "groups": ["radiology"]},
    "mallory": {"name": "Mallory Finance", "email": "mallory@hospital.example", "groups": ["finance"]},
}
ROLE_MAP = {"triage-admins": "admin", "radiology": "viewer"}


@dataclass
class SignInSetup:
    provider: OidcProvider
    api: Api
    url: str

    def audit(self, action: str = "auth.login") -> list[AuditEvent]:
        with self.api.db.factory() as session:
            return list(session.scalars(select(AuditEvent).where(AuditEvent.action == action)
                                        .order_by(AuditEvent.id)))


def _client(client_id: str, secret: str, redirect_uri: str) -> dict:
    return {"client_id": client_id, "client_secret": secret, "redirect_uris": [redirect_uri],
            "response_types": ["code"], "grant_types": ["authorization_code"]}


@pytest.fixture
def oidc(sqlite_database, tmp_path) -> Iterator[SignInSetup]:  # noqa: F811
    """The provider, and the node signed up with it as ``triage-node``.

    ``other-app`` is a second client of the same provider; it may also come back to the
    node's callback, as a client registered by someone else could.
    """
    provider = OidcProvider(clients=[], users=USERS)
    api = build_api(
        sqlite_database, tmp_path / "data", oidc_issuer=provider.issuer, oidc_client_id=CLIENT_ID,
        oidc_client_secret=CLIENT_SECRET, oidc_scopes="openid profile email groups",
        oidc_role_map=ROLE_MAP, oidc_display_name="Hospital SSO",
    )
    running = RunningApp(api.app)
    callback = f"{running.url}/auth/callback"
    provider.clients = [_client(CLIENT_ID, CLIENT_SECRET, callback),
                        _client(OTHER_ID, OTHER_SECRET, callback)]
    provider.clients[1]["redirect_uris"].append(f"{running.url}/elsewhere")
    with provider, running:
        yield SignInSetup(provider=provider, api=api, url=running.url)


def in_thread(coroutine):
    """Run ``coroutine`` to its end in a thread of its own (Playwright's loop holds this one)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def sign_in_at_provider(page, login: str) -> None:
    """The provider's own form: login and any password, then consent."""
    page.fill("input[name=login]", login)
    page.fill("input[name=password]", "any password")
    page.click("button.login-submit")
    page.click("button.login-submit:has-text('Continue')")


def test_a_browser_without_a_login_signs_in_at_the_provider_and_gets_its_mapped_role(oidc, browser):  # noqa: F811
    page = new_page(browser)
    page.goto(f"{oidc.url}/worklist?sort=waiting&order=desc")
    assert page.url.startswith(f"{oidc.provider.issuer}/interaction/"), page.url
    sign_in_at_provider(page, "alice")

    # Back on the page first asked for, as an admin (her "triage-admins" group).
    expect(page).to_have_url(f"{oidc.url}/worklist?sort=waiting&order=desc")
    expect(page.locator(".who")).to_have_text("alice (admin)")
    [event] = oidc.audit()
    assert (event.actor, event.outcome) == ("oidc:alice", "ok")
    assert event.detail["role"] == "admin" and event.detail["sub"] == "alice"

    # The session opens the other pages and the API description, as the token cookie does;
    # /api keeps bearer tokens only.
    page.goto(f"{oidc.url}/audit")
    expect(page.locator("h1")).to_contain_text("Audit")
    assert page.request.get(f"{oidc.url}/openapi.json").status == 200
    assert page.request.get(f"{oidc.url}/api/worklist").status == 401
    cookies = {c["name"]: c for c in page.context.cookies()}
    assert cookies["triage_session"]["httpOnly"] and cookies["triage_session"]["sameSite"] == "Lax"

    # Logging out ends the node's session; the login page offers the provider again.
    page.click(".logout button")
    expect(page).to_have_url(f"{oidc.url}/login")
    expect(page.locator("#oidc-login")).to_have_text("Sign in with Hospital SSO")
    assert page.request.get(f"{oidc.url}/worklist", max_redirects=0).status == 303
    assert [e.actor for e in oidc.audit("auth.logout")] == ["oidc:alice"]

    # A reader whose group maps to viewer, in another browser.
    reader = new_page(browser)
    reader.goto(f"{oidc.url}/login?next=%2Ffeedback")
    reader.click("#oidc-login")
    sign_in_at_provider(reader, "bob")
    expect(reader).to_have_url(f"{oidc.url}/feedback")
    expect(reader.locator(".who")).to_have_text("bob (viewer)")


def test_a_user_whose_groups_map_to_no_role_is_refused_and_audited(oidc, browser):  # noqa: F811
    page = new_page(browser)
    page.goto(f"{oidc.url}/worklist")
    sign_in_at_provider(page, "mallory")

    expect(page.locator(".error")).to_contain_text("none of your 'groups' values gives access")
    expect(page.locator(".who")).to_have_count(0)
    # No session: the worklist still sends this browser to the provider.
    response = page.request.get(f"{oidc.url}/worklist", max_redirects=0)
    assert response.status == 303 and response.headers["location"].startswith("/auth/login?")
    [event] = oidc.audit()
    assert (event.actor, event.outcome) == ("oidc:mallory", "denied")
    assert event.detail["reason"] == "no mapped role" and event.detail["values"] == ["finance"]


def test_a_forged_or_replayed_state_makes_no_session(oidc, browser):  # noqa: F811
    page = new_page(browser)
    page.goto(f"{oidc.url}/worklist")
    with page.expect_request(lambda r: r.url.startswith(f"{oidc.url}/auth/callback")) as answer:
        sign_in_at_provider(page, "alice")
    callback = answer.value.url
    expect(page.locator(".who")).to_have_text("alice (admin)")

    # Another browser that started its own sign-in is handed alice's answer (login CSRF).
    other = new_page(browser)
    other.goto(f"{oidc.url}/auth/login?next=%2Fworklist")
    response = other.goto(callback)
    assert response.status == 400
    expect(other.locator(".error")).to_contain_text("Please sign in again")
    assert other.request.get(f"{oidc.url}/worklist", max_redirects=0).status == 303

    # A made-up state, and alice's own answer once more after logging out (a replay).
    response = other.goto(f"{oidc.url}/auth/callback?" + urlencode({"code": "forged", "state": "forged"}))
    assert response.status == 400
    page.click(".logout button")
    assert page.goto(callback).status == 400
    assert page.request.get(f"{oidc.url}/worklist", max_redirects=0).status == 303

    events = oidc.audit()
    assert [(e.actor, e.outcome) for e in events][0] == ("oidc:alice", "ok")
    # Refusals of unknown callers are rate-summarised per address: the first one is written.
    refused = [e for e in events if e.outcome != "ok"]
    assert refused and refused[0].actor == "oidc:unknown" and refused[0].detail["reason"] == "state mismatch"


def test_a_code_issued_to_another_client_makes_no_session(oidc, browser):  # noqa: F811
    """The node's request is turned into one for ``other-app`` on its way to the provider:
    the code that comes back is refused when the node redeems it as ``triage-node``."""
    page = new_page(browser)
    # The node's redirect to the provider (its state, nonce and PKCE challenge are in this
    # browser's session cookie), with the client id changed.
    start = page.request.get(f"{oidc.url}/auth/login?next=%2Fworklist", max_redirects=0)
    assert start.status == 302
    parts = urlsplit(start.headers["location"])
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    assert query["client_id"] == CLIENT_ID and query["code_challenge_method"] == "S256"
    page.goto(parts._replace(query=urlencode(query | {"client_id": OTHER_ID})).geturl())
    sign_in_at_provider(page, "alice")
    expect(page.locator(".error")).to_contain_text("refused the sign-in")
    assert page.request.get(f"{oidc.url}/worklist", max_redirects=0).status == 303
    [event] = oidc.audit()
    assert event.outcome == "failed" and event.detail["reason"] == "token request refused: invalid_grant"


def test_an_id_token_issued_to_another_client_fails_the_audience_check(oidc, browser):  # noqa: F811
    """A real ID token for ``other-app`` (signed by the provider, right nonce) is refused by
    the node's ID-token check for its wrong ``aud``; the same check passes it for ``other-app``."""
    verifier, nonce = secrets.token_urlsafe(48), secrets.token_urlsafe(16)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    redirect = f"{oidc.url}/elsewhere"
    page = new_page(browser)
    page.goto(f"{oidc.provider.issuer}/auth?" + urlencode({
        "client_id": OTHER_ID, "response_type": "code", "scope": "openid", "redirect_uri": redirect,
        "state": "s", "nonce": nonce, "code_challenge": challenge, "code_challenge_method": "S256",
    }))
    with page.expect_request(lambda r: r.url.startswith(redirect)) as answer:
        sign_in_at_provider(page, "alice")
    code = parse_qs(urlsplit(answer.value.url).query)["code"][0]
    token = httpx.post(f"{oidc.provider.issuer}/token", auth=(OTHER_ID, OTHER_SECRET), data={
        "grant_type": "authorization_code", "code": code, "redirect_uri": redirect, "code_verifier": verifier,
    }).raise_for_status().json()

    # The check the node's callback makes (triage_node.api.oidc._finish).
    node_client = oidc.api.app.state.oidc
    options = claims_options(oidc.api.settings, oidc.provider.discovery())
    with pytest.raises(InvalidClaimError, match="aud"):
        in_thread(node_client.parse_id_token(token, nonce=nonce, claims_options=options))

    from authlib.integrations.starlette_client import OAuth

    oauth = OAuth()
    oauth.register("other", client_id=OTHER_ID, client_secret=OTHER_SECRET,
                   server_metadata_url=f"{oidc.provider.issuer}/.well-known/openid-configuration")
    options["aud"]["values"] = [OTHER_ID]
    claims = in_thread(oauth.create_client("other").parse_id_token(token, nonce=nonce, claims_options=options))
    assert claims["sub"] == "alice" and claims["aud"] == OTHER_ID


def test_a_sign_in_that_took_too_long_makes_no_session(oidc, browser, monkeypatch):  # noqa: F811
    monkeypatch.setattr(oidc_module, "LOGIN_TIMEOUT_S", -1)
    page = new_page(browser)
    page.goto(f"{oidc.url}/worklist")
    sign_in_at_provider(page, "alice")
    expect(page.locator(".error")).to_contain_text("took too long")
    assert page.request.get(f"{oidc.url}/worklist", max_redirects=0).status == 303
    [event] = oidc.audit()
    assert event.outcome == "failed" and event.detail["reason"] == "state expired"


def test_token_login_can_be_turned_off(sqlite_database, tmp_path):  # noqa: F811
    """With ``web_token_login = false`` the page offers the provider only, and a token (even a
    valid one) opens no page; the API still takes it as a bearer token."""
    api = build_api(sqlite_database, tmp_path / "data", oidc_issuer="https://sso.hospital.example/realms/h",
                    oidc_client_id=CLIENT_ID, oidc_role_map=ROLE_MAP, web_token_login=False)
    anonymous = api.client(role=None)
    page = anonymous.get("/login")
    assert 'id="oidc-login"' in page.text and "sso.hospital.example" in page.text and 'id="token"' not in page.text
    refused = anonymous.post("/login", data={"token": api.tokens["admin"], "next": "/worklist"})
    assert refused.status_code == 403 and "triage_token" not in refused.cookies
    anonymous.cookies.set("triage_token", api.tokens["admin"])
    for path in ("/worklist", "/docs"):
        response = anonymous.get(path, headers={"Accept": "text/html"})
        assert response.status_code == 303, path
        assert response.headers["location"] == "/auth/login?" + urlencode({"next": path})
    assert api.client("viewer").get("/api/worklist").status_code == 200


@pytest.mark.parametrize(("overrides", "needle"), [
    ({"oidc_client_id": ""}, "needs oidc_client_id"),
    ({"oidc_role_map": {}}, "needs oidc_role_map"),
    ({"oidc_scopes": "profile email"}, "must include openid"),
    ({"oidc_issuer": "http://sso.hospital.example", "environment": "production"}, "https:// in production"),
    ({"oidc_role_map": {"staff": "sender"}}, "'viewer' or 'admin'"),
])
def test_incomplete_oidc_settings_are_refused_at_start(overrides, needle, tmp_path):
    from triage_node.config import SettingsError, load_settings

    values = {"oidc_issuer": "https://sso.hospital.example", "oidc_client_id": CLIENT_ID,
              "oidc_role_map": ROLE_MAP, "data_dir": tmp_path} | overrides
    with pytest.raises(SettingsError, match=needle):
        load_settings(**values)
