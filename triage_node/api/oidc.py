"""Sign-in to the web page with the hospital's OpenID Connect provider.

The authorization code flow with PKCE (OpenID Connect Core 1.0 3.1, RFC 7636, ``S256``),
through Authlib's Starlette client. ``/auth/login`` sends the browser to the provider with
a fresh ``state``, ``nonce`` and code verifier, kept in the signed session cookie;
``/auth/callback`` checks ``state`` (and the ``iss`` response parameter, RFC 9207, when
the provider sends one), exchanges the code, and has Authlib validate the ID token: its
signature against the provider's JWKS, ``iss``, ``aud`` (our client id, `claims_options`),
``exp``, ``iat`` and ``nonce``. The discovery document must name the configured issuer (OpenID Connect
Discovery 1.0 4.3).

The role comes from one claim (``oidc_role_claim``, from the ID token, else from the
UserInfo response for the same ``sub``) through ``oidc_role_map``; the highest mapped
role wins, and a user with no mapped value is refused, never given a default role. A
signed-in user is kept in the session cookie (`triage_node.api.auth.SESSION_USER`) for
`triage_node.api.auth.SESSION_SECONDS` at most; the pages and the API description
accept it as they accept the token cookie. ``/api`` and DICOMweb keep bearer tokens.

Every outcome is audited: ``auth.login`` with outcome ``ok``, or ``denied`` and a
reason. A refusal before the user is known (a forged, replayed or expired ``state``, an
error from the provider) is rate-summarised per client address (`audit.record_refusal`).
"""

from __future__ import annotations

import hashlib
import hmac
import time
import warnings
from typing import Any

import httpx
from authlib.common.errors import AuthlibBaseError
from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse
from joserfc.errors import JoseError
from starlette.middleware.sessions import SessionMiddleware

from triage_node.api.auth import COOKIE, ROLE_RANK, SESSION_COOKIE, SESSION_SECONDS, SESSION_USER, Role
from triage_node.api.web import login_page, provider_name, safe_next
from triage_node.config import Settings
from triage_node.db import audit
from triage_node.db.session import transaction
from triage_node.logs import get_logger

with warnings.catch_warnings():
    # Authlib asks for httpx2 and falls back to httpx, which the node uses everywhere else.
    import authlib.deprecate  # noqa: F401 (it sets its warnings to "always" when imported)

    warnings.filterwarnings("ignore", message="The httpx module is deprecated")
    from authlib.integrations.starlette_client import OAuth

log = get_logger(__name__)

CALLBACK_PATH = "/auth/callback"
#: Authlib's name for the one registered provider (session keys start with ``_state_oidc_``).
CLIENT_NAME = "oidc"
#: Session key of the page the user first asked for, while a sign-in is under way.
NEXT_KEY = "login_next"
#: Session key of when that sign-in started (epoch seconds).
STARTED_KEY = "login_started"
#: Seconds a sign-in may take from the redirect to the provider to the callback.
LOGIN_TIMEOUT_S = 600
#: Seconds allowed for the calls to the provider (discovery, token, JWKS, UserInfo).
PROVIDER_TIMEOUT_S = 10.0

router = APIRouter(include_in_schema=False)


class LoginRefused(Exception):
    """A sign-in that must not make a session; ``reason`` is audited, ``message`` shown."""

    def __init__(self, reason: str, message: str, *, status: int = 400,
                 user: str | None = None, **detail: Any) -> None:
        super().__init__(reason)
        self.reason = reason
        self.message = message
        self.status = status
        self.user = user
        self.detail = detail


def session_key(settings: Settings) -> str:
    """Key that signs the session cookie: derived from ``secret_key``, never the key itself."""
    return hmac.new(settings.require_secret().encode(), b"triage-node web session", hashlib.sha256).hexdigest()


def install(app: Any, settings: Settings) -> None:
    """Register the provider, the session cookie and the ``/auth`` routes on ``app``.

    Called by `triage_node.api.app.create_app` right after the token gate is added, so
    the session middleware runs before the gate (which reads the session on the API
    description's paths).
    """
    oauth = OAuth()
    issuer = settings.oidc_issuer.rstrip("/")
    oauth.register(
        CLIENT_NAME,
        client_id=settings.oidc_client_id,
        client_secret=(settings.oidc_client_secret.get_secret_value()
                       if settings.oidc_client_secret is not None else None),
        server_metadata_url=f"{issuer}/.well-known/openid-configuration",
        client_kwargs={"scope": settings.oidc_scopes, "code_challenge_method": "S256",
                       "timeout": PROVIDER_TIMEOUT_S},
    )
    app.state.oidc = oauth.create_client(CLIENT_NAME)
    app.add_middleware(
        SessionMiddleware, secret_key=session_key(settings), session_cookie=SESSION_COOKIE,
        max_age=SESSION_SECONDS, same_site="lax",
        https_only=settings.oidc_redirect_base_url.startswith("https://"),
    )
    app.include_router(router)


def callback_url(request: Request, settings: Settings) -> str:
    """The redirect URI registered at the provider: ``<oidc_redirect_base_url>/auth/callback``."""
    base = settings.oidc_redirect_base_url.rstrip("/") or str(request.base_url).rstrip("/")
    return base + CALLBACK_PATH


async def _metadata(client: Any, settings: Settings) -> dict[str, Any]:
    metadata = await client.load_server_metadata()
    if str(metadata.get("issuer", "")).rstrip("/") != settings.oidc_issuer.rstrip("/"):
        # Discovery 4.3: a document that names another issuer is not this provider's.
        client.server_metadata.clear()
        raise LoginRefused("issuer mismatch", "The identity provider's configuration names another issuer.",
                           status=502, issuer=str(metadata.get("issuer", ""))[:200])
    return metadata


def claims_options(settings: Settings, metadata: dict[str, Any]) -> dict[str, Any]:
    """What the ID token must say (Core 3.1.3.7): the discovered issuer, our client id in ``aud``.

    Given to Authlib, which checks the signature, ``exp``, ``iat``, ``nonce`` and ``azp``
    itself; without these options it would check ``aud`` only through ``azp``.
    """
    return {"iss": {"essential": True, "values": [metadata["issuer"]]},
            "aud": {"essential": True, "values": [settings.oidc_client_id]}}


def claim_values(claims: Any, path: str) -> list[str] | None:
    """The values of the claim at ``path`` (dots reach into objects); None when it is absent.

    A string claim gives one value, a list its strings; anything else gives none.
    """
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


def mapped_role(settings: Settings, values: list[str]) -> Role | None:
    """The highest role ``oidc_role_map`` gives any of ``values``, or None."""
    roles = [Role(settings.oidc_role_map[v]) for v in values if v in settings.oidc_role_map]
    return max(roles, key=ROLE_RANK.__getitem__) if roles else None


def _user_name(claims: Any) -> str:
    for key in ("preferred_username", "email", "sub"):
        if isinstance(claims.get(key), str) and claims[key]:
            return claims[key][:120]
    return "unknown"


async def _finish(request: Request, settings: Settings) -> dict[str, Any]:
    """Validate the provider's answer and return the session user; `LoginRefused` otherwise."""
    client = request.app.state.oidc
    given_iss = request.query_params.get("iss")
    if given_iss is not None and given_iss.rstrip("/") != settings.oidc_issuer.rstrip("/"):
        raise LoginRefused("issuer mismatch", "The answer came from another identity provider.")
    if request.query_params.get("error"):
        error = request.query_params["error"][:64]
        raise LoginRefused(f"provider error: {error}", "The identity provider did not sign you in.",
                           status=403 if error in ("access_denied", "login_required") else 400)
    started = request.session.get(STARTED_KEY)
    if isinstance(started, (int, float)) and time.time() - started > LOGIN_TIMEOUT_S:
        # Authlib keeps a state as long as the session cookie lasts; a sign-in is shorter.
        request.session.clear()
        raise LoginRefused("state expired", "This sign-in took too long. Please sign in again.")
    try:
        metadata = await _metadata(client, settings)
        token = await client.authorize_access_token(request, claims_options=claims_options(settings, metadata))
    except AuthlibBaseError as exc:
        reason = getattr(exc, "error", None) or type(exc).__name__
        if reason == "mismatching_state":
            raise LoginRefused("state mismatch", "This sign-in link is stale or was not started "
                               "in this browser. Please sign in again.") from None
        raise LoginRefused(f"token request refused: {reason}"[:120],
                           "The identity provider refused the sign-in. Please sign in again.") from None
    except JoseError as exc:
        raise LoginRefused(f"ID token invalid: {exc.error}: {exc.description}"[:160],
                           "The identity provider's answer could not be verified.") from None
    except httpx.HTTPError as exc:
        log.warning("oidc.provider_unreachable", error=type(exc).__name__)
        raise LoginRefused("provider unreachable", "The identity provider cannot be reached.",
                           status=502) from None
    claims = token.get("userinfo")
    if not claims:
        raise LoginRefused("no ID token", "The identity provider sent no ID token.")
    user = _user_name(claims)
    values = claim_values(claims, settings.oidc_role_claim)
    if values is None:
        # Many providers release groups or roles from UserInfo only (OpenID Connect Core 5.3).
        try:
            info = await client.userinfo(token=token)
        except (AuthlibBaseError, httpx.HTTPError) as exc:
            raise LoginRefused(f"userinfo failed: {type(exc).__name__}",
                               "Your roles could not be read from the identity provider.",
                               status=502, user=user) from None
        if info.get("sub") != claims["sub"]:  # Core 5.3.2: must match the ID token's sub
            raise LoginRefused("userinfo sub mismatch", "The identity provider's answer could not be verified.",
                               user=user)
        user = _user_name({**info, **claims})
        values = claim_values(info, settings.oidc_role_claim) or []
    role = mapped_role(settings, values)
    if role is None:
        raise LoginRefused(
            "no mapped role",
            f"You are signed in at {provider_name(settings)} as {user}, but none of your "
            f"'{settings.oidc_role_claim}' values gives access to the triage node. Ask your "
            "administrator to add you to a group or role that is mapped (oidc_role_map).",
            status=403, user=user, sub=claims["sub"], values=values[:20],
        )
    return {"sub": claims["sub"], "name": user, "role": role.value, "iss": claims["iss"],
            "exp": int(time.time()) + SESSION_SECONDS}


def _audit_refusal(request: Request, refusal: LoginRefused) -> None:
    factory = request.app.state.session_factory
    peer = request.client.host if request.client else "unknown"
    if refusal.user is None:
        audit.record_refusal(factory, "auth.login", peer=peer, reason=refusal.reason, actor="oidc:unknown",
                             method="oidc", **refusal.detail)
    else:
        with transaction(factory) as session:
            audit.record(session, "auth.login", actor=f"oidc:{refusal.user}"[:64], outcome="denied",
                         method="oidc", reason=refusal.reason, peer=peer, **refusal.detail)
    log.warning("auth.login_refused", method="oidc", reason=refusal.reason)


@router.get("/auth/login")
async def start_login(request: Request, next: str | None = None) -> Response:  # noqa: A002
    """Send the browser to the provider; ``next`` is where it comes back to afterwards."""
    settings = request.app.state.settings
    request.session.pop(SESSION_USER, None)
    request.session[NEXT_KEY] = safe_next(next)
    request.session[STARTED_KEY] = int(time.time())
    try:
        await _metadata(request.app.state.oidc, settings)
        return await request.app.state.oidc.authorize_redirect(request, callback_url(request, settings))
    except LoginRefused as refusal:
        _audit_refusal(request, refusal)
        return login_page(request, next, refusal.message, status=refusal.status)
    except httpx.HTTPError as exc:
        log.warning("oidc.provider_unreachable", error=type(exc).__name__)
        return login_page(request, next, f"{provider_name(settings)} cannot be reached; try again shortly.",
                          status=502)


@router.get(CALLBACK_PATH)
async def callback(request: Request) -> Response:
    """The provider's answer: a session and a redirect to the first page, or a refusal page."""
    settings = request.app.state.settings
    next_url = safe_next(request.session.get(NEXT_KEY))
    try:
        user = await _finish(request, settings)
    except LoginRefused as refusal:
        _audit_refusal(request, refusal)
        request.session.pop(SESSION_USER, None)
        return login_page(request, next_url, refusal.message, status=refusal.status)
    # A new session: nothing of the sign-in (state, nonce, verifier) outlives it.
    request.session.clear()
    request.session[SESSION_USER] = user
    with transaction(request.app.state.session_factory) as session:
        audit.record(session, "auth.login", actor=f"oidc:{user['name']}"[:64], method="oidc",
                     sub=user["sub"], role=user["role"],
                     peer=request.client.host if request.client else "unknown")
    log.info("auth.login", method="oidc", role=user["role"])
    response = RedirectResponse(next_url, status_code=303)
    response.delete_cookie(COOKIE)  # one login at a time: the token cookie would win otherwise
    return response
