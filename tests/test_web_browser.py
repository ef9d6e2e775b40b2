"""The web page in a real headless Chromium (Debian's, driven by Playwright).

Rows are written straight into the database (no worker); the app runs on uvicorn.
The screenshots in ``docs/images/`` come from this test.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from tests.worklist_factory import (  # noqa: F401 (fixtures)
    RunningApp,
    add_result,
    add_study,
    sqlite_api,
    sqlite_database,
    write_result_objects,
)
from triage_node.api import web
from triage_node.config import REPO_ROOT
from triage_node.db.session import transaction
from triage_node.worklist.priority import compute_priority

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
IMAGES = REPO_ROOT / "docs" / "images"
NOW = datetime.now(UTC)


@pytest.fixture
def browser():
    if not CHROMIUM.exists():
        pytest.fail("Debian chromium is missing: apt-get install -y chromium")
    with sync_playwright() as p:
        instance = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield instance
        finally:
            instance.close()


def seed(api, tmp_path) -> dict[str, str]:
    with transaction(api.db.factory) as session:
        old_neg = add_study(session, received_at=NOW - timedelta(hours=3, minutes=12),
                            patient_name="Moreau^Claire", description="CT HEAD WO CONTRAST")
        add_result(session, old_neg, {"any": 0.06, "subdural": 0.03})
        new_neg = add_study(session, received_at=NOW - timedelta(minutes=25), patient_name="Okafor^Ben")
        add_result(session, new_neg, {"any": 0.11, "subarachnoid": 0.08})
        pending = add_study(session, received_at=NOW - timedelta(minutes=2), patient_name="Lindqvist^Eva",
                            description="CT HEAD TRAUMA")
        positive = add_study(session, received_at=NOW - timedelta(minutes=4), patient_name="Novak^Adam",
                             description="CT HEAD WO CONTRAST")
        objects = write_result_objects(tmp_path / "results" / "pos", positive, n_overlays=2, size=256)
        add_result(session, positive, {"any": 0.97, "subdural": 0.94, "intraparenchymal": 0.58,
                                       "subarachnoid": 0.31}, **objects)
        for s in (old_neg, new_neg, pending, positive):
            compute_priority(session, s, api.settings, actor="node", reason="seed")
        return {"old_neg": old_neg.study_uid, "new_neg": new_neg.study_uid,
                "pending": pending.study_uid, "positive": positive.study_uid}


def row_order(page) -> list[str]:
    return page.locator("tr.entry").evaluate_all("rows => rows.map(r => r.dataset.studyUid)")


def test_worklist_lists_positive_first_and_opens_its_study_page(sqlite_api, tmp_path, browser, monkeypatch):
    monkeypatch.setattr(web, "REFRESH_SECONDS", 1)
    uids = seed(sqlite_api, tmp_path)
    with RunningApp(sqlite_api.app) as running:
        page = browser.new_page(viewport={"width": 1360, "height": 760})
        # Not logged in: the page asks for the token, a wrong one is refused.
        page.goto(f"{running.url}/worklist")
        expect(page).to_have_url(f"{running.url}/login?next=%2Fworklist")
        page.fill("#token", "tn_wrong")
        page.click("#login-button")
        expect(page.locator(".error")).to_contain_text("not valid")
        page.fill("#token", sqlite_api.tokens["viewer"])
        page.click("#login-button")
        expect(page).to_have_url(f"{running.url}/worklist")

        order = row_order(page)
        assert order[0] == uids["positive"]
        assert order.index(uids["positive"]) < order.index(uids["new_neg"]) < len(order)
        assert order.index(uids["positive"]) < order.index(uids["old_neg"])
        top = page.locator("tr.entry").first
        expect(top.locator(".prio")).to_have_text("STAT-AI")
        expect(top.locator(".badge.subtype")).to_have_text(["intraparenchymal", "subdural"])
        thumb = top.locator("td.thumb img")
        expect(thumb).to_be_visible()
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=thumb.element_handle())
        width = top.locator(".bar[title^='subdural'] .fill").evaluate("e => e.style.width")
        assert width == "94%"
        expect(page.locator(f"tr[data-study-uid='{uids['old_neg']}'] td.wait")).to_contain_text("3 h")

        # Auto-refresh: a new positive study appears without a reload, at the top.
        with transaction(sqlite_api.db.factory) as session:
            late = add_study(session, patient_name="Silva^Rui")
            add_result(session, late, {"any": 0.99, "epidural": 0.98})
            compute_priority(session, late, sqlite_api.settings)
            late_uid = late.study_uid
        expect(page.locator(f"tr[data-study-uid='{late_uid}']")).to_be_visible(timeout=10_000)
        assert row_order(page)[0] == late_uid
        expect(page.locator("#total")).to_have_text("5")
        IMAGES.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(IMAGES / "worklist.png"), full_page=True)

        # Clicking the positive study opens its page, with the overlays.
        page.locator(f"tr[data-study-uid='{uids['positive']}'] td.finding").click()
        expect(page).to_have_url(f"{running.url}/studies/{uids['positive']}")
        expect(page.locator("#study-title")).to_contain_text("Novak, Adam")
        expect(page.locator(".verdict")).to_have_text("Intracranial hemorrhage suspected")
        overlays = page.locator(".overlays img")
        expect(overlays).to_have_count(2)
        for i in range(2):
            page.wait_for_function("img => img.complete && img.naturalWidth == 256",
                                   arg=overlays.nth(i).element_handle())
        page.screenshot(path=str(IMAGES / "study.png"), full_page=True)

        # Marking it as being read is audited under the token's name, shown on the audit page.
        page.click("form.inline button[value='reading']")
        expect(page.locator(".summary .status")).to_have_text("reading")
        page.goto(f"{running.url}/audit?action=worklist.status")
        expect(page.locator("table.audit tbody tr")).to_have_count(1)
        expect(page.locator("table.audit tbody tr").first).to_contain_text("token:viewer-user")
        page.goto(f"{running.url}/audit?study={uids['positive']}")
        expect(page.locator("table.audit tbody tr")).to_have_count(2)  # priority, then status
        page.screenshot(path=str(IMAGES / "audit.png"), full_page=True)
        page.close()


def test_pages_and_images_need_the_login_cookie(sqlite_api, tmp_path):
    uids = seed(sqlite_api, tmp_path)
    anonymous = sqlite_api.client(None)
    for path in ("/worklist", f"/studies/{uids['positive']}", "/audit", "/audit.csv", "/worklist/rows"):
        response = anonymous.get(path)
        assert response.status_code == 303 and response.headers["location"].startswith("/login"), path
    assert anonymous.get("/static/app.js").status_code == 200  # static files are public
    sender = anonymous.post("/login", data={"token": sqlite_api.tokens["sender"], "next": "/worklist"})
    assert sender.status_code == 401 and "set-cookie" not in sender.headers  # STOW-only token
    response = anonymous.post("/login", data={"token": sqlite_api.tokens["viewer"], "next": "//evil.example"})
    assert response.status_code == 303 and response.headers["location"] == "/worklist"
    cookie = response.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
