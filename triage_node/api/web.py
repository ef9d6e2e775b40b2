"""The web page: worklist, study page with overlays, audit page (server-rendered Jinja2).

Login is a bearer token entered once (``/login``) and kept in an HttpOnly,
SameSite=Strict cookie; every page and image checks it as the API checks the
``Authorization`` header. When ``oidc_issuer`` is set, people sign in with the hospital's
OpenID Connect provider instead (`triage_node.api.oidc`): a browser without a login is sent
there, and comes back with a signed session cookie that the pages accept in the same way. The page refreshes its worklist rows every few seconds with
a small script shipped in ``static/`` (no CDN: the node may have no internet).
The audit page is in `triage_node.api.web_audit`, the feedback forms and page in
`triage_node.api.web_feedback`.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlencode, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fastapi import APIRouter, Depends, Form, HTTPException, Query, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates

from triage_node import CLASSES, SUBTYPES
from triage_node.api import auth
from triage_node.api.auth import Role, authenticate
from triage_node.api.deps import SessionDep, SettingsDep
from triage_node.api.studies_api import find_object, get_study, render_png
from triage_node.api.worklist import actor_of, item_from_row
from triage_node.db import audit
from triage_node.db.models import PriorityClass, WorklistEntry, WorklistStatus
from triage_node.db.session import transaction
from triage_node.timeutil import utcnow
from triage_node.worklist.feedback import latest_verdicts, list_feedback
from triage_node.worklist.priority import set_status
from triage_node.worklist.priority_rules import PriorityError
from triage_node.worklist.queries import (
    FINDINGS,
    SORT_KEYS,
    WorklistFilter,
    list_worklist,
    worklist_modalities,
)

HERE = Path(__file__).resolve().parent
TEMPLATES = Jinja2Templates(directory=str(HERE / "templates"))
STATIC_DIR = HERE / "static"
COOKIE = auth.COOKIE
REFRESH_SECONDS = 10

#: Usual abbreviations of the subtypes, for the compact probability bars.
ABBREVIATIONS = {
    "epidural": "EDH",
    "intraparenchymal": "IPH",
    "intraventricular": "IVH",
    "subarachnoid": "SAH",
    "subdural": "SDH",
}

router = APIRouter(include_in_schema=False)


def person_name(value: str | None) -> str:
    """DICOM PN ``Family^Given^Middle`` as ``Family, Given Middle`` for display."""
    if not value:
        return ""
    family, _, rest = value.split("=", 1)[0].partition("^")
    given = " ".join(part for part in rest.split("^")[:2] if part)
    return f"{family}, {given}" if given else family


def iso_utc(value: datetime | None) -> str:
    """ISO 8601 with offset, in UTC, for ``<time datetime>`` (the page's script shows local time)."""
    if value is None:
        return ""
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).astimezone(UTC).isoformat(timespec="seconds")


TEMPLATES.env.filters["pn"] = person_name
TEMPLATES.env.filters["iso"] = iso_utc
TEMPLATES.env.globals["abbreviations"] = ABBREVIATIONS


class LoginRequired(Exception):
    """No valid token cookie: the page redirects to /login."""

    def __init__(self, next_url: str) -> None:
        self.next_url = next_url


def login_redirect(request: Request, exc: LoginRequired) -> RedirectResponse:
    """Exception handler ``create_app`` installs for `LoginRequired`: to the provider's
    sign-in when OIDC is on, else to ``/login``."""
    if request.app.state.settings.oidc_issuer:
        return RedirectResponse(auth.login_path(request.app.state.settings, exc.next_url), status_code=303)
    return RedirectResponse("/login?" + urlencode({"next": exc.next_url}), status_code=303)


#: Roles that may read the pages (a STOW-RS "sender" token may not).
READER_ROLES = frozenset({Role.viewer, Role.admin})


def principal_from_token(request: Request, token: str | None) -> Any:
    """The principal (name, role) of a token that may read the pages, or None.

    Uses the API's own token check (`triage_node.api.auth.authenticate`).
    """
    if not token or not request.app.state.settings.web_token_login:
        return None
    principal = authenticate(request.app.state.session_factory, request.app.state.settings, token)
    return principal if principal is not None and principal.role in READER_ROLES else None


def web_user(request: Request) -> Any:
    """Dependency: the logged-in principal (token cookie, else OIDC session), or a redirect to the login page."""
    principal = principal_from_token(request, request.cookies.get(COOKIE))
    if principal is None:
        principal = auth.principal_from_session(request.scope.get("session"))
    if principal is None or principal.role not in READER_ROLES:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise LoginRequired(target)
    return principal


WebUser = Annotated[Any, Depends(web_user)]


def _human_wait(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min"
    if seconds < 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    return f"{seconds // 86400} d {seconds % 86400 // 3600} h"


def viewer_url(settings: Any, study_uid: str) -> str | None:
    """The study's link in the configured viewer (``viewer_url_template``), or None."""
    template = settings.viewer_url_template
    return template.replace("{study_uid}", quote(study_uid, safe="")) if template else None


def safe_next(value: str | None) -> str:
    """``value`` when it is a path on this node, else ``/worklist`` (no open redirect)."""
    if value and value.startswith("/") and not value.startswith(("//", "/\\")):
        return value
    return "/worklist"


def provider_name(settings: Any) -> str:
    """The OIDC provider's name on the login button: ``oidc_display_name``, else the issuer's host."""
    return settings.oidc_display_name or urlsplit(settings.oidc_issuer).hostname or "your identity provider"


def login_page(request: Request, next_url: str | None, error: str | None, status: int = 200) -> Response:
    """The login page: "Sign in with <provider>" when OIDC is on, the token form when allowed."""
    settings = request.app.state.settings
    return TEMPLATES.TemplateResponse(
        request, "login.html",
        {"next": safe_next(next_url), "error": error, "user": None,
         "oidc": provider_name(settings) if settings.oidc_issuer else None,
         "token_login": settings.web_token_login},
        status_code=status,
    )


# -- login --------------------------------------------------------------------------
@router.get("/", response_class=HTMLResponse)
def index() -> RedirectResponse:
    return RedirectResponse("/worklist", status_code=303)


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str | None = None, error: str | None = None) -> Response:  # noqa: A002
    return login_page(request, next, error)


@router.post("/login")
def login(request: Request, token: Annotated[str, Form()], next: Annotated[str, Form()] = "/worklist") -> Response:  # noqa: A002
    if not request.app.state.settings.web_token_login:
        return login_page(request, next, "Token login is turned off; sign in with your identity provider.",
                          status=403)
    principal = principal_from_token(request, token.strip())
    if principal is None:
        return login_page(request, next, "That token is not valid.", status=401)
    response = RedirectResponse(safe_next(next), status_code=303)
    response.set_cookie(
        COOKIE, token.strip(), httponly=True, samesite="strict", secure=request.url.scheme == "https",
        max_age=auth.SESSION_SECONDS,
    )
    if "session" in request.scope:
        request.session.pop(auth.SESSION_USER, None)  # one login at a time
    return response


@router.post("/logout")
def logout(request: Request) -> Response:
    """Ends the node's login (token cookie and OIDC session); the provider's own session stays."""
    principal = principal_from_token(request, request.cookies.get(COOKIE))
    if "session" in request.scope:
        principal = principal or auth.principal_from_session(request.session)
        request.session.clear()
        if principal is not None and principal.source == "oidc":
            with transaction(request.app.state.session_factory) as session:
                audit.record(session, "auth.logout", actor=principal.actor, method="oidc")
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE)
    return response


# -- worklist -----------------------------------------------------------------------
#: Sortable columns and the direction of the first click (longest waiting first, most
#: probable first); the heat map has no order.
FIRST_ORDER = {key: "asc" for key in SORT_KEYS} | {"probability": "desc", "finding": "desc", "waiting": "desc"}
PAGE_PARAMS = ("status", "priority", "finding", "modality", "q", "from", "to", "tz", "sort", "order")


def _zone(name: str | None) -> ZoneInfo:
    try:
        return ZoneInfo(name) if name else ZoneInfo("UTC")
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def _local_day(value: str | None, zone: ZoneInfo, days: int = 0) -> datetime | None:
    """Midnight of a ``YYYY-MM-DD`` day (plus ``days``) in the browser's zone, as UTC."""
    if not value:
        return None
    try:
        day = date.fromisoformat(value) + timedelta(days=days)
    except (ValueError, OverflowError):
        raise HTTPException(422, f"not a date (YYYY-MM-DD): {value!r}") from None
    return datetime.combine(day, time(0), zone).astimezone(UTC)


def page_filter(params: Any) -> tuple[WorklistFilter, dict[str, Any]]:
    """The worklist filter of the page's query string, and the values to show in its form.

    Dates are days in the browser's time zone (``tz``, an IANA name the script sends);
    ``to`` includes its whole day. Unknown sort keys and findings fall back to the default.
    """
    status = [s for s in params.getlist("status") if s in {w.value for w in WorklistStatus}]
    status = status or [WorklistStatus.new.value, WorklistStatus.reading.value]
    priority = [p for p in params.getlist("priority") if p in {c.value for c in PriorityClass}]
    finding = params.get("finding") if params.get("finding") in FINDINGS else None
    sort = params.get("sort") if params.get("sort") in SORT_KEYS else "priority"
    order = "desc" if params.get("order") == "desc" else "asc"
    zone = _zone(params.get("tz"))
    flt = WorklistFilter(
        status=tuple(status), priority_class=tuple(priority), modality=params.get("modality") or None,
        search=(params.get("q") or "").strip()[:200] or None, finding=finding,
        since=_local_day(params.get("from"), zone), until=_local_day(params.get("to"), zone, days=1),
        sort=sort, descending=order == "desc", limit=200,
    )
    shown = {"status": status, "priority": priority, "finding": finding or "", "sort": sort, "order": order,
             **{k: params.get(k) or "" for k in ("modality", "q", "from", "to", "tz")}}
    return flt, shown


def sort_links(shown: dict[str, Any]) -> dict[str, str]:
    """Per sortable column, the page's URL sorted by it (the other direction if it is the current one)."""
    base = [(k, v) for k in PAGE_PARAMS if k not in ("sort", "order")
            for v in (shown[k] if isinstance(shown[k], list) else [shown[k]]) if v]
    links = {}
    for key in SORT_KEYS:
        order = FIRST_ORDER[key]
        if key == shown["sort"]:
            order = "desc" if shown["order"] == "asc" else "asc"
        links[key] = "/worklist?" + urlencode(base + [("sort", key), ("order", order)])
    return links


def _worklist_context(session: Any, settings: Any, params: Any) -> dict[str, Any]:
    flt, shown = page_filter(params)
    rows, total = list_worklist(session, settings, flt)
    verdicts = latest_verdicts(session, [row.study.study_uid for row in rows])
    items = []
    for row in rows:
        item = item_from_row(row)
        web_thumb = None
        if item.thumbnail_url and row.result is not None:
            web_thumb = f"/web/objects/{item.study_uid}/{row.result.overlay_sop_uids[0]}.png?size=96"
        items.append({"item": item, "wait": _human_wait(item.waiting_seconds), "thumb": web_thumb,
                      "viewer_url": viewer_url(settings, item.study_uid),
                      "verdict": verdicts.get(item.study_uid)})
    return {
        "items": items,
        "total": total,
        "statuses": shown["status"],
        "shown": shown,
        "sort_links": sort_links(shown),
        "subtypes": SUBTYPES,
        "findings": FINDINGS,
        "priority_classes": [p.value for p in PriorityClass],
        "refresh": REFRESH_SECONDS,
        "now": utcnow(),
    }


@router.get("/worklist", response_class=HTMLResponse)
def worklist_page(request: Request, session: SessionDep, settings: SettingsDep, user: WebUser) -> Response:
    """Filters and sort come from the query string (see `page_filter`), so a view can be bookmarked."""
    context = _worklist_context(session, settings, request.query_params)
    context["modalities"] = worklist_modalities(session)
    return TEMPLATES.TemplateResponse(request, "worklist.html", {**context, "user": user})


@router.get("/worklist/rows", response_class=HTMLResponse)
def worklist_rows(request: Request, session: SessionDep, settings: SettingsDep, _user: WebUser) -> Response:
    """The table body alone, for the page's script (refresh, sort, filters); the total in a header."""
    context = _worklist_context(session, settings, request.query_params)
    return TEMPLATES.TemplateResponse(request, "_rows.html", context,
                                      headers={"X-Total-Count": str(context["total"])})


# -- study --------------------------------------------------------------------------
@router.get("/studies/{study_uid}", response_class=HTMLResponse)
def study_page(study_uid: str, request: Request, session: SessionDep, settings: SettingsDep,
               user: WebUser) -> Response:
    study = get_study(study_uid, session, user)
    current = next((r for r in study.results if r.state != "superseded" and r.positive is not None), None)
    feedback = list_feedback(session, study_uid=study_uid)
    return TEMPLATES.TemplateResponse(
        request,
        "study.html",
        {
            "study": study,
            "current": current,
            "classes": CLASSES,
            "statuses": [s.value for s in WorklistStatus],
            "priority_classes": [p.value for p in PriorityClass],
            "user": user,
            "viewer_url": viewer_url(settings, study_uid),
            "feedback": list(reversed(feedback)),
        },
    )


@router.post("/studies/{study_uid}/status")
def study_status(study_uid: str, session: SessionDep, user: WebUser,
                 status: Annotated[str, Form()], reason: Annotated[str, Form()] = "") -> Response:
    from sqlalchemy import select

    from triage_node.db.models import Study

    entry = session.scalars(
        select(WorklistEntry).join(Study, Study.id == WorklistEntry.study_id).where(Study.study_uid == study_uid)
    ).one_or_none()
    if entry is None:
        raise HTTPException(404, "study not on the worklist")
    try:
        set_status(session, entry, status, actor=actor_of(user), reason=reason or "web page")
        session.commit()
    except PriorityError as exc:
        raise HTTPException(422, str(exc)) from None
    return RedirectResponse(f"/studies/{study_uid}", status_code=303)


@router.get("/web/objects/{study_uid}/{sop_uid}.png")
def web_object_png(study_uid: str, sop_uid: str, session: SessionDep, _user: WebUser,
                   size: Annotated[int | None, Query(ge=16, le=2048)] = None) -> Response:
    ref = find_object(session, study_uid, sop_uid)
    return Response(render_png(ref.path, size), media_type="image/png",
                    headers={"Cache-Control": "private, max-age=3600"})


def install(app: Any) -> None:
    """Add the worklist engineer's routers, static files and login redirect to ``app``."""
    from fastapi.staticfiles import StaticFiles

    from triage_node.api import audit_api, feedback_api, health, studies_api, web_audit, web_feedback, worklist

    for module in (health, worklist, studies_api, audit_api, feedback_api):
        app.include_router(module.router)
    app.include_router(router)
    app.include_router(web_feedback.router)
    app.include_router(web_audit.router)
    app.mount("/static", StaticFiles(directory=str(STATIC_DIR)), name="static")
    app.add_exception_handler(LoginRequired, login_redirect)
