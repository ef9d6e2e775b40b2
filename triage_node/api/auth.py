"""Bearer-token authentication and roles for the API and DICOMweb.

Tokens are random strings shown once (``triage-node token create``); the database
keeps only ``HMAC-SHA256(secret_key, token)`` (`hash_token`), so a copy of the
database does not reveal a usable token and a changed ``secret_key`` invalidates them.

Roles
-----
``viewer``
    Reads the worklist, studies, audit and DICOMweb results.
``sender``
    Stores instances with STOW-RS (a modality or gateway); reads nothing.
``admin``
    Everything, including changes to the worklist.

Every path under ``/api`` and DICOMweb's ``/dicom-web`` (and its alias ``/dicomweb``)
needs a valid token (`AuthGate`, in every environment, development included): 401
without one or with a bad one, 403 when the token's role is not enough
(`require_role`). A browser's CORS preflight (``OPTIONS``, no token) is answered
before the gate, for the origins in ``cors_origins`` only. The API description (``/docs``,
``/redoc``, ``/openapi.json``) needs a valid token too, from the ``Authorization``
header or the web page's login cookie (a browser cannot send the header); a browser
without one is sent to ``/login``. ``/readyz`` and ``/metrics`` are open to loopback
clients only (`triage_node.api.health`); ``/healthz`` (liveness: status and version) is
open to all, so that container and service managers can probe it.

People may sign in to the web page with the hospital's OpenID Connect provider instead
(`triage_node.api.oidc`, when ``oidc_issuer`` is set). Their `Principal` lives in the
signed session cookie (`SESSION_COOKIE`, `principal_from_session`) and is accepted where
the token cookie is: the pages and the API description, never ``/api`` or DICOMweb,
which take bearer tokens only.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import urlencode

import anyio
from fastapi import HTTPException, Request, status
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Receive, Scope, Send

from triage_node.config import Settings
from triage_node.db import audit
from triage_node.db.models import ApiToken
from triage_node.db.session import transaction
from triage_node.logs import get_logger
from triage_node.timeutil import utcnow

log = get_logger(__name__)

TOKEN_PREFIX = "tn_"
#: DICOMweb roots: the conventional one first (PS3.18 examples, OHIF's default), then
#: the node's original one, kept as an alias for clients and peers configured with it.
DICOMWEB_PREFIXES = ("/dicom-web", "/dicomweb")
#: Path prefixes that never admit an anonymous caller.
PROTECTED_PREFIXES = ("/api", *DICOMWEB_PREFIXES)
#: The API description: it maps every route, so it is not given to anonymous callers.
DOC_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")
#: Cookie the web page's login sets (``/login``); also accepted on `DOC_PATHS`.
COOKIE = "triage_token"
#: Signed session cookie of an OpenID Connect sign-in (Starlette's SessionMiddleware).
SESSION_COOKIE = "triage_session"
#: Session key of the signed-in user: ``{"sub", "name", "role", "iss", "exp"}``.
SESSION_USER = "user"
#: Longest a web login lasts (token cookie and OIDC session alike); sign in again after.
SESSION_SECONDS = 12 * 3600


class Role(StrEnum):
    viewer = "viewer"
    sender = "sender"
    admin = "admin"


#: Order of the roles a person can hold on the web page (the highest mapped one wins).
ROLE_RANK = {Role.viewer: 1, Role.admin: 2}


@dataclass(frozen=True)
class Principal:
    """The authenticated caller: an API token, or a person signed in with OpenID Connect.

    ``token_id`` is None for a person; ``source`` is ``"token"`` or ``"oidc"``.
    """

    token_id: int | None
    name: str
    role: Role
    source: str = "token"

    @property
    def actor(self) -> str:
        """Audit actor: ``token:<name>`` or ``oidc:<user name>``."""
        return f"{self.source}:{self.name}"[:64]


def principal_from_session(session: Any, now: float | None = None) -> Principal | None:
    """The signed-in person of an OIDC session (a mapping), or None when absent or expired."""
    user = session.get(SESSION_USER) if session else None
    if not isinstance(user, dict):
        return None
    try:
        if float(user["exp"]) <= (time.time() if now is None else now):
            return None
        return Principal(token_id=None, name=str(user["name"]), role=Role(user["role"]), source="oidc")
    except (KeyError, TypeError, ValueError):
        return None


def login_path(settings: Settings, next_url: str) -> str:
    """Where a browser without a login goes: the provider's sign-in when OIDC is on, else ``/login``."""
    if settings.oidc_issuer:
        return "/auth/login?" + urlencode({"next": next_url})
    return f"/login?next={next_url}"


def hash_token(settings: Settings, token: str) -> str:
    """HMAC-SHA256 of the token keyed with ``settings.secret_key`` (hex)."""
    key = settings.require_secret().encode()
    return hmac.new(key, token.encode(), hashlib.sha256).hexdigest()


def new_token() -> str:
    """A fresh token: prefix plus 256 random bits (URL-safe)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def create_token(
    session: Session, settings: Settings, role: Role | str, name: str, *, actor: str = "cli"
) -> tuple[ApiToken, str]:
    """Add a token row (hash only) and an audit row; return the row and the token.

    The caller commits. The token itself is returned once and never stored.
    """
    role = Role(role)
    name = name.strip()
    if not 1 <= len(name) <= 64:
        raise ValueError("token name must be 1-64 characters")
    token = new_token()
    row = ApiToken(name=name, role=role.value, token_hash=hash_token(settings, token),
                   created_at=utcnow())
    session.add(row)
    session.flush()
    audit.record(session, "token.created", actor=actor, token_id=row.id, name=name,
                 role=role.value)
    return row, token


def revoke_token(session: Session, token_id: int, *, actor: str = "cli") -> bool:
    """Mark a token revoked (it stops working at once); False when unknown or revoked."""
    row = session.get(ApiToken, token_id)
    if row is None or row.revoked_at is not None:
        return False
    row.revoked_at = utcnow()
    audit.record(session, "token.revoked", actor=actor, token_id=row.id, name=row.name)
    return True


def authenticate(
    session_factory: sessionmaker[Session], settings: Settings, token: str
) -> Principal | None:
    """The principal of a valid, unrevoked token, or None."""
    if not token or len(token) > 512:
        return None
    digest = hash_token(settings, token)
    with session_factory() as session:
        row = session.scalar(select(ApiToken).where(ApiToken.token_hash == digest))
    if row is None or row.revoked_at is not None:
        return None
    # Constant-time comparison of what the index lookup found (defence in depth).
    if not hmac.compare_digest(row.token_hash, digest):
        return None
    try:
        role = Role(row.role)
    except ValueError:
        return None
    return Principal(token_id=row.id, name=row.name, role=role)


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (RFC 6750 2.1)."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def _unauthorized_body(detail: str) -> bytes:
    return ('{"detail":"' + detail + '"}').encode()


class AuthGate:
    """ASGI middleware: no anonymous request reaches ``/api`` or DICOMweb.

    A valid token's `Principal` is put in ``request.state.principal`` for
    `require_role`. Other paths (``/healthz``, the web page's static files) pass.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        docs = path in DOC_PATHS
        if not docs and not _protected(path):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        state = scope["app"].state
        token = bearer_token(headers.get("authorization"))
        if token is None and docs and state.settings.web_token_login:
            token = _cookie(headers.get("cookie", ""), COOKIE)
        principal = None
        if token is not None:
            principal = await anyio.to_thread.run_sync(
                authenticate, state.session_factory, state.settings, token
            )
        elif docs:
            # An OIDC session (the session middleware runs first when OIDC is on).
            principal = principal_from_session(scope.get("session"))
        if principal is None:
            reason = "missing bearer token" if token is None else "invalid or revoked token"
            log.warning("auth.unauthorized", path=scope.get("path"), reason=reason)
            if docs and path != "/openapi.json" and "text/html" in headers.get("accept", ""):
                await _redirect_to_login(send, login_path(state.settings, path))
                return
            body = _unauthorized_body("Not authenticated" if token is None else "Invalid token")
            await send({
                "type": "http.response.start",
                "status": status.HTTP_401_UNAUTHORIZED,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b'Bearer realm="triage-node"'),
                ],
            })
            await send({"type": "http.response.body", "body": body})
            return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)


def _cookie(header: str, name: str) -> str | None:
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name and value:
            return value
    return None


async def _redirect_to_login(send: Send, location: str) -> None:
    await send({
        "type": "http.response.start",
        "status": status.HTTP_303_SEE_OTHER,
        "headers": [(b"location", location.encode()), (b"content-length", b"0")],
    })
    await send({"type": "http.response.body", "body": b""})


def _protected(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in PROTECTED_PREFIXES)


def require_role(*roles: Role | str) -> Any:
    """FastAPI dependency: the caller's `Principal` if its role is in ``roles``.

    ``admin`` passes every check. 401 without a valid token, 403 (audited as
    ``auth.forbidden``) with a role that is not enough.

    Examples
    --------
    >>> @router.get("/api/worklist")
    ... def worklist(principal: Principal = Depends(require_role("viewer"))): ...
    """
    allowed = {Role(r) for r in roles} | {Role.admin}

    def dependency(request: Request) -> Principal:
        principal: Principal | None = getattr(request.state, "principal", None)
        if principal is None:
            token = bearer_token(request.headers.get("authorization"))
            if token is not None:
                principal = authenticate(
                    request.app.state.session_factory, request.app.state.settings, token
                )
        if principal is None:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED, "Not authenticated",
                headers={"WWW-Authenticate": 'Bearer realm="triage-node"'},
            )
        if principal.role not in allowed:
            with transaction(request.app.state.session_factory) as session:
                audit.record(
                    session, "auth.forbidden", actor=principal.actor, outcome="denied",
                    path=request.url.path, method=request.method, role=principal.role.value,
                    required=sorted(r.value for r in allowed),
                )
            log.warning("auth.forbidden", path=request.url.path, role=principal.role.value)
            raise HTTPException(status.HTTP_403_FORBIDDEN, "Role not allowed")
        return principal

    dependency.__name__ = f"require_role_{'_'.join(sorted(r.value for r in allowed))}"
    return dependency
