"""The FastAPI application: middleware, token gate, and the routers.

`create_app` builds one app per process; ``triage-node serve`` runs it with uvicorn
beside the DICOM listener. Routers of other parts (worklist, audit, DICOMweb read
side, health) are added in `create_app` next to the STOW-RS router.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

import structlog
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi_offline import FastAPIOffline
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from triage_node import __version__
from triage_node.api import stow
from triage_node.api.auth import DICOMWEB_PREFIXES, AuthGate
from triage_node.config import Settings
from triage_node.logs import get_logger

log = get_logger(__name__)

REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class RequestIdMiddleware:
    """Bind a request id (the caller's ``X-Request-ID`` if well-formed, else a new
    one) into structlog's context for the request, and echo it in the response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = ""
        for key, value in scope["headers"]:
            if key.lower() == REQUEST_ID_HEADER.encode():
                given = value.decode("latin-1")
                break
        request_id = given if _REQUEST_ID_OK.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((REQUEST_ID_HEADER.encode(), request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        # The client address is the request's ``peer``, as the listener binds it: the
        # log scrubber keeps identifier values per peer (triage_node.log_scrub).
        client = scope.get("client")
        tokens = structlog.contextvars.bind_contextvars(
            request_id=request_id, http_method=scope.get("method"), http_path=scope.get("path"),
            peer=client[0] if client else None,
        )
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            structlog.contextvars.reset_contextvars(**tokens)


def create_app(
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: Any = None,
    tracker: Any = None,
) -> FastAPI:
    """Build the node's HTTP application.

    Parameters
    ----------
    settings : Settings
        The node's settings (``secret_key`` salts token hashes).
    session_factory : sessionmaker
        Database sessions (built once per process).
    store : InstanceStore, optional
        Where STOW-RS stores instances; default a new
        `triage_node.ingest.store.InstanceStore` that notifies ``tracker``.
    tracker : CompletenessTracker, optional
        Told about stored instances and about the end of each STOW-RS request
        (like an association release).

    Returns
    -------
    FastAPI
    """
    if store is None:
        from triage_node.ingest.store import InstanceStore

        store = InstanceStore(
            settings, session_factory,
            on_stored=tracker.instance_stored if tracker is not None else None,
        )
    # FastAPIOffline serves the Swagger UI and ReDoc assets itself: hospital networks
    # often have no internet, and the stock /docs page loads them from a CDN.
    app = FastAPIOffline(
        title="ICH triage node",
        version=__version__,
        description="Worklist, audit and DICOMweb (STOW-RS, QIDO-RS, WADO-RS) of the triage node. "
        "Every /api and /dicom-web path (and the /dicomweb alias), and this description, needs "
        "`Authorization: Bearer <token>`.",
    )
    app.state.settings = settings
    app.state.session_factory = session_factory
    app.state.store = store
    app.state.tracker = tracker
    # Starlette runs the middleware added last first: the request id wraps the gate,
    # so refusals are logged with it.
    app.add_middleware(AuthGate)
    if settings.oidc_issuer:
        # Web sign-in with the hospital's OpenID Connect provider: its session middleware
        # goes right outside the gate, which reads the session on the API description.
        from triage_node.api import oidc

        oidc.install(app, settings)
    app.add_middleware(RequestIdMiddleware)
    if settings.cors_origins:
        # Outermost, so a browser's preflight (which carries no token) is answered
        # before the gate, and refusals (401, 403) still carry the CORS headers a page
        # needs to read them. Tokens travel in the Authorization header, never cookies.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Accept", "Content-Type", REQUEST_ID_HEADER],
            expose_headers=["Content-Location", "Content-Type", REQUEST_ID_HEADER, "WWW-Authenticate"],
            allow_credentials=False,
            max_age=600,
        )

    @app.get("/healthz", tags=["health"], summary="Liveness (no token needed)")
    def healthz() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    # DICOMweb under its conventional root and the node's original one; the alias is
    # left out of the API description.
    from triage_node.api import dicomweb_pixels, dicomweb_read

    for dicomweb_router in (stow.router, dicomweb_read.router, dicomweb_pixels.router):
        for i, prefix in enumerate(DICOMWEB_PREFIXES):
            app.include_router(dicomweb_router, prefix=prefix, include_in_schema=i == 0)
    # Worklist, studies, audit, readiness/metrics and the web page.
    from triage_node.api import web

    web.install(app)
    return app
