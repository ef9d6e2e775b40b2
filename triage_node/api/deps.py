"""Small FastAPI dependencies that read what `create_app` put on ``app.state``.

``app.state`` holds ``settings``, ``session_factory``, ``store`` (the ingest
`InstanceStore`) and ``tracker`` (the `CompletenessTracker`, or None).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, status
from sqlalchemy.orm import Session, sessionmaker

from triage_node.api.auth import Principal, require_role
from triage_node.config import Settings


def app_settings(request: Request) -> Settings:
    return request.app.state.settings


def session_factory(request: Request) -> sessionmaker[Session]:
    return request.app.state.session_factory


def db_session(request: Request) -> Iterator[Session]:
    """A session per request; routes that write commit themselves."""
    with request.app.state.session_factory() as session:
        yield session


def instance_store(request: Request) -> Any:
    store = getattr(request.app.state, "store", None)
    if store is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "instance store not configured")
    return store


def completeness_tracker(request: Request) -> Any:
    """The tracker, or None when the app runs without one (a read-only API)."""
    return getattr(request.app.state, "tracker", None)


SettingsDep = Annotated[Settings, Depends(app_settings)]
SessionDep = Annotated[Session, Depends(db_session)]
SessionFactoryDep = Annotated[sessionmaker[Session], Depends(session_factory)]
Viewer = Annotated[Principal, Depends(require_role("viewer"))]
Sender = Annotated[Principal, Depends(require_role("sender"))]
Admin = Annotated[Principal, Depends(require_role("admin"))]
