"""The web page in a real headless Chromium (Debian's, driven by Playwright).

Rows are written straight into the database (no worker); the app runs on uvicorn.
The screenshots in ``docs/images/`` come from this test.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

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
from triage_node.db.models import AuditEvent
from triage_node.db.session import transaction
from triage_node.worklist.priority import compute_priority

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
IMAGES = REPO_ROOT / "docs" / "images"
NOW = datetime.now(UTC)
#: Where the reading room is: the page shows its times there, whatever the server's zone.
ZONE = "America/New_York"
#: Stands in for the Web Audio API (headless Chromium has no sound card): counts beeps.
FAKE_AUDIO = """
window.__beeps = 0;
window.AudioContext = function () {
  this.state = "running"; this.currentTime = 0; this.destination = {};
  this.resume = function () {};
  this.createGain = function () {
    return { gain: { setValueAtTime: function () {}, exponentialRampToValueAtTime: function () {} },
             connect: function () {} };
  };
  this.createOscillator = function () {
    return { frequency: {}, connect: function () {}, start: function () { window.__beeps += 1; },
             stop: function () {} };
  };
};
"""


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


def new_page(browser, zone: str = ZONE, width: int = 1360):
    """A page in a browser context set to ``zone``, with the fake audio installed."""
    context = browser.new_context(viewport={"width": width, "height": 760}, timezone_id=zone, locale="en-US")
    context.add_init_script(FAKE_AUDIO)
    return context.new_page()


def login(page, url: str, token: str) -> None:
    page.goto(f"{url}/login?next=%2Fworklist")
    page.fill("#token", token)
    page.click("#login-button")
    expect(page).to_have_url(f"{url}/worklist")


def local(when: datetime, zone: str = ZONE, seconds: bool = False) -> str:
    """What the page should show for ``when``: ``2026-01-31 09:05 EST``."""
    at = when.astimezone(ZoneInfo(zone))
    return at.strftime("%Y-%m-%d %H:%M" + (":%S" if seconds else "")) + " " + at.tzname()


def test_worklist_lists_positive_first_and_opens_its_study_page(sqlite_api, tmp_path, browser, monkeypatch):
    monkeypatch.setattr(web, "REFRESH_SECONDS", 1)
    uids = seed(sqlite_api, tmp_path)
    with RunningApp(sqlite_api.app) as running:
        page = new_page(browser)
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

        # The reader turns the STAT alert on; a quick "agree" on the positive row.
        page.check("#stat-alert")
        page.locator(f"tr[data-study-uid='{uids['positive']}'] button.fb-agree").click()
        expect(page.locator(f"tr[data-study-uid='{uids['positive']}'] button.fb-agree")).to_have_class(
            re.compile(r"\bchosen\b"))

        # Auto-refresh: a new positive study appears without a reload, at the top, with the alert.
        with transaction(sqlite_api.db.factory) as session:
            late = add_study(session, patient_name="Silva^Rui")
            add_result(session, late, {"any": 0.99, "epidural": 0.98})
            compute_priority(session, late, sqlite_api.settings)
            late_uid = late.study_uid
        expect(page.locator(f"tr[data-study-uid='{late_uid}']")).to_be_visible(timeout=10_000)
        assert row_order(page)[0] == late_uid
        expect(page.locator("#total")).to_have_text("5")
        expect(page).to_have_title("(1) STAT · Worklist · ICH triage node")
        expect(page.locator(f"tr[data-study-uid='{late_uid}']")).to_have_class(re.compile(r"\bnew-stat\b"))
        page.keyboard.press("j")  # selects the new row, and the alert counts as seen
        expect(page.locator("tr.entry.selected")).to_have_attribute("data-study-uid", late_uid)
        expect(page).to_have_title("Worklist · ICH triage node")
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
        # The row's "agree" is listed; a comment is added below it.
        expect(page.locator("table.feedback-list tbody tr")).to_have_count(1)
        page.fill("#feedback-comment", "Subdural confirmed; the parenchymal call is a beam-hardening artefact.")
        page.click("#feedback-comment-only")
        expect(page.locator("table.feedback-list tbody tr")).to_have_count(2)
        expect(page.locator("table.feedback-list tbody tr").first).to_contain_text("beam-hardening")
        page.screenshot(path=str(IMAGES / "study.png"), full_page=True)

        # Marking it as being read is audited under the token's name, shown on the audit page.
        page.click("form.inline button[value='reading']")
        expect(page.locator(".summary .status")).to_have_text("reading")
        page.goto(f"{running.url}/audit?action=worklist.status")
        expect(page.locator("table.audit tbody tr")).to_have_count(1)
        expect(page.locator("table.audit tbody tr").first).to_contain_text("token:viewer-user")
        page.goto(f"{running.url}/audit?study={uids['positive']}")
        # priority, two feedbacks, then status
        expect(page.locator("table.audit tbody tr")).to_have_count(4)
        expect(page.locator("table.audit th")).to_contain_text([re.compile(f"Time.*{ZONE}")])
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


def names(page) -> list[str]:
    return page.locator("tr.entry td.patient a.study-link").all_inner_texts()


def test_worklist_sorts_searches_filters_and_moves_by_keyboard_in_local_time(sqlite_api, tmp_path, browser):
    seed(sqlite_api, tmp_path)
    received = NOW - timedelta(days=3, hours=2)
    with transaction(sqlite_api.db.factory) as session:
        mr = add_study(session, received_at=received, patient_name="Berg^Ida", modality="MR",
                       description="MR HEAD")
        add_result(session, mr, {"any": 0.62, "subarachnoid": 0.71})
        compute_priority(session, mr, sqlite_api.settings)
        mr_uid = mr.study_uid
    with RunningApp(sqlite_api.app) as running:
        page = new_page(browser)
        login(page, running.url, sqlite_api.tokens["viewer"])

        # Times in the browser's zone, the zone named; the server sent UTC.
        expect(page.locator("#zone")).to_contain_text(f"Times in {ZONE} (")
        cell = page.locator(f"tr[data-study-uid='{mr_uid}'] td.received time")
        expect(cell).to_have_text(local(received))
        assert cell.get_attribute("datetime").endswith("+00:00")
        expect(page.locator("#refreshed")).to_have_text(re.compile(r"^\d\d:\d\d:\d\d E[SD]T$"))

        # Sort by patient, then the other way; the URL keeps the view.
        page.click("th[data-sort='patient'] a")
        expect(page.locator("tr.entry td.patient a.study-link").first).to_have_text("Berg, Ida")
        assert names(page) == ["Berg, Ida", "Lindqvist, Eva", "Moreau, Claire", "Novak, Adam", "Okafor, Ben"]
        expect(page.locator("th[data-sort='patient']")).to_have_attribute("aria-sort", "ascending")
        page.click("th[data-sort='patient'] a")
        expect(page.locator("tr.entry td.patient a.study-link").first).to_have_text("Okafor, Ben")
        assert "sort=patient" in page.url and "order=desc" in page.url
        page.click("th[data-sort='probability'] a")  # most probable first, pending last
        expect(page.locator("tr.entry td.patient a.study-link").first).to_have_text("Novak, Adam")
        assert names(page)[-1] == "Lindqvist, Eva"
        page.click("th[data-sort='waiting'] a")  # longest waiting first
        expect(page.locator("tr.entry td.patient a.study-link").first).to_have_text("Berg, Ida")
        expect(page.locator("th[data-sort='waiting']")).to_have_attribute("aria-sort", "descending")
        page.click("th[data-sort='received'] a")  # earliest first, the same order
        expect(page.locator("th[data-sort='received']")).to_have_attribute("aria-sort", "ascending")
        assert names(page)[0] == "Berg, Ida" and names(page)[-1] == "Lindqvist, Eva"
        page.click("th[data-sort='status'] a")
        expect(page.locator("th[data-sort='status']")).to_have_attribute("aria-sort", "ascending")
        page.click("th[data-sort='study'] a")
        expect(page.locator("tr.entry td.patient a.study-link").first).to_have_text("Lindqvist, Eva")  # CT HEAD TRAUMA
        assert names(page)[-1] == "Berg, Ida"  # MR HEAD

        # "/" goes to the search; patient name, PatientID or accession.
        page.keyboard.press("/")
        expect(page.locator("#search")).to_be_focused()
        page.keyboard.type("novak")
        expect(page.locator("tr.entry")).to_have_count(1)
        expect(page.locator("#total")).to_have_text("1")
        page.keyboard.press("Escape")
        expect(page.locator("#search")).not_to_be_focused()
        page.fill("#search", "")
        expect(page.locator("tr.entry")).to_have_count(5)

        # Filters: finding, priority, modality, dates (days in the browser's zone).
        page.select_option("#finding", "subarachnoid")
        expect(page.locator("tr.entry")).to_have_count(1)
        expect(page.locator("tr.entry")).to_have_attribute("data-study-uid", mr_uid)
        page.select_option("#finding", "pending")
        expect(page.locator("tr.entry td.patient a.study-link")).to_have_text(["Lindqvist, Eva"])
        page.select_option("#finding", "any")
        expect(page.locator("tr.entry")).to_have_count(2)
        page.select_option("#finding", "")
        page.check("input[name='priority'][value='STAT-AI']")
        expect(page.locator("tr.entry")).to_have_count(2)
        expect(page.locator("tr.entry .prio")).to_have_text(["STAT-AI", "STAT-AI"])
        page.uncheck("input[name='priority'][value='STAT-AI']")
        page.select_option("#modality", "MR")
        expect(page.locator("tr.entry")).to_have_count(1)
        page.select_option("#modality", "")
        day = received.astimezone(ZoneInfo(ZONE)).date().isoformat()
        page.fill("#date-from", day)
        page.fill("#date-to", day)
        expect(page.locator("tr.entry")).to_have_count(1)
        expect(page.locator("tr.entry")).to_have_attribute("data-study-uid", mr_uid)
        assert f"from={day}" in page.url and "tz=America%2FNew_York" in page.url
        page.fill("#date-from", "")
        page.fill("#date-to", "")
        expect(page.locator("tr.entry")).to_have_count(5)

        # Keyboard: j/k and the arrows move the selection, Enter opens the study.
        order = row_order(page)
        page.locator("h1").click()
        page.keyboard.press("j")
        expect(page.locator("tr.entry.selected")).to_have_attribute("data-study-uid", order[0])
        page.keyboard.press("j")
        page.keyboard.press("ArrowDown")
        expect(page.locator("tr.entry.selected")).to_have_attribute("data-study-uid", order[2])
        page.keyboard.press("k")
        expect(page.locator("tr.entry.selected")).to_have_attribute("data-study-uid", order[1])
        expect(page.locator("tr.entry.selected")).to_have_attribute("aria-selected", "true")
        expect(page.locator("tr.entry.selected")).to_have_count(1)
        expect(page.locator("#keys")).to_contain_text("Enter")
        page.keyboard.press("Enter")
        expect(page).to_have_url(f"{running.url}/studies/{order[1]}")
        expect(page.locator(".summary time")).to_have_text(re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d E[SD]T$"))

        # A bookmarked view is served sorted and filtered as it was left.
        page.goto(f"{running.url}/worklist?sort=patient&order=desc&finding=any")
        assert names(page) == ["Novak, Adam", "Berg, Ida"]
        page.close()


def test_stat_alert_is_opt_in_and_remembered(sqlite_api, tmp_path, browser, monkeypatch):
    monkeypatch.setattr(web, "REFRESH_SECONDS", 1)
    seed(sqlite_api, tmp_path)

    def stat_arrives() -> str:
        with transaction(sqlite_api.db.factory) as session:
            study = add_study(session, patient_name="Ito^Ken")
            add_result(session, study, {"any": 0.97, "subdural": 0.95})
            compute_priority(session, study, sqlite_api.settings)
            return study.study_uid

    with RunningApp(sqlite_api.app) as running:
        page = new_page(browser)
        login(page, running.url, sqlite_api.tokens["viewer"])
        title = page.title()
        expect(page.locator("#stat-alert")).not_to_be_checked()
        # Off: a new STAT-AI changes nothing.
        first = stat_arrives()
        expect(page.locator(f"tr[data-study-uid='{first}']")).to_be_visible(timeout=10_000)
        page.wait_for_timeout(1500)
        assert page.title() == title and page.evaluate("window.__beeps") == 0

        # On: remembered by this browser across a reload.
        page.check("#stat-alert")
        assert page.evaluate("localStorage.getItem('triage.statAlert')") == "on"
        page.reload()
        expect(page.locator("#stat-alert")).to_be_checked()
        second, third = stat_arrives(), stat_arrives()
        expect(page).to_have_title(f"(2) STAT · {title}", timeout=10_000)
        assert page.evaluate("window.__beeps") == 1  # one beep for one refresh
        expect(page.locator("tr.entry.new-stat")).to_have_count(2)
        # Still unseen after another refresh; seen at the next key or click.
        page.wait_for_timeout(1500)
        expect(page).to_have_title(f"(2) STAT · {title}")
        page.mouse.click(5, 300)
        expect(page).to_have_title(title)
        expect(page.locator("tr.entry.new-stat")).to_have_count(0)
        assert {second, third} <= set(row_order(page))
        page.close()


def test_feedback_agree_disagree_and_comment_from_rows_and_the_study_page(sqlite_api, tmp_path, browser):
    uids = seed(sqlite_api, tmp_path)
    with RunningApp(sqlite_api.app) as running:
        page = new_page(browser)
        login(page, running.url, sqlite_api.tokens["viewer"])
        # Rows without a result have nothing to judge.
        expect(page.locator(f"tr[data-study-uid='{uids['pending']}'] button.fb")).to_have_count(0)
        positive = page.locator(f"tr[data-study-uid='{uids['positive']}']")
        positive.locator("button.fb-disagree").click()
        expect(positive.locator("button.fb-disagree")).to_have_attribute("aria-pressed", "true")
        positive.locator("button.fb-agree").click()  # a change of mind
        expect(positive.locator("button.fb-agree")).to_have_attribute("aria-pressed", "true")
        expect(positive.locator("button.fb-disagree")).to_have_attribute("aria-pressed", "false")
        assert page.url == f"{running.url}/worklist"  # the buttons do not open the study
        negative = page.locator(f"tr[data-study-uid='{uids['new_neg']}']")
        negative.locator("button.fb-disagree").click()
        expect(negative.locator("button.fb-disagree")).to_have_attribute("aria-pressed", "true")
        page.reload()  # the latest verdict is shown by the server too
        expect(page.locator(f"tr[data-study-uid='{uids['positive']}'] button.fb-agree")).to_have_class(
            re.compile(r"\bchosen\b"))

        page.goto(f"{running.url}/studies/{uids['old_neg']}")
        page.fill("#feedback-comment", "Tiny SDH along the falx, missed.")
        page.click("#feedback-disagree")
        expect(page).to_have_url(f"{running.url}/studies/{uids['old_neg']}#feedback")
        row = page.locator("table.feedback-list tbody tr").first
        expect(row).to_contain_text("disagree")
        expect(row).to_contain_text("Tiny SDH along the falx, missed.")
        expect(row).to_contain_text("token:viewer-user")
        expect(row.locator("time")).to_have_text(re.compile(r"E[SD]T$"))
        page.click("#feedback-comment-only")  # an empty comment without a verdict is refused
        expect(page.locator("body")).to_contain_text("needs some text")

        # The feedback page: PPV as readers judge it (the positive row: agreed, latest verdict).
        page.goto(f"{running.url}/feedback")
        expect(page.locator("#ppv")).to_have_text("100.0 %")
        expect(page.locator("#npv")).to_have_text("0.0 %")
        expect(page.locator("table.feedback-list tbody tr")).to_have_count(4)
        with page.expect_download() as download:
            page.click("#feedback-csv")
        lines = Path(download.value.path()).read_text().splitlines()
        assert lines[0].startswith("time_utc,study_uid,accession_number,verdict,comment,model_version")
        assert len(lines) == 5 and "patient_name" not in lines[0] and "Novak" not in "".join(lines)
        page.close()
    with sqlite_api.db.factory() as session:
        events = session.query(AuditEvent).filter_by(action="result.feedback").order_by(AuditEvent.id).all()
    assert [e.detail["verdict"] for e in events] == ["disagree", "agree", "disagree", "disagree"]
    assert {e.actor for e in events} == {"token:viewer-user"}
    assert events[0].detail["positive_classes"] == ["intraparenchymal", "subdural"]
    assert events[0].job_id is not None and events[0].detail["model_version"] == "0.1.0"


def test_page_filter_reads_days_in_the_browsers_zone_and_forgives_odd_values():
    from starlette.datastructures import QueryParams

    flt, shown = web.page_filter(QueryParams("from=2026-03-08&to=2026-03-08&tz=America/New_York&sort=x&finding=y"))
    # The day DST starts in New York: 23 hours long, from 05:00 UTC to 04:00 UTC the next day.
    assert flt.since == datetime(2026, 3, 8, 5, tzinfo=UTC) and flt.until == datetime(2026, 3, 9, 4, tzinfo=UTC)
    assert flt.sort == "priority" and flt.finding is None and flt.status == ("new", "reading")
    assert shown["tz"] == "America/New_York"
    flt, _ = web.page_filter(QueryParams("from=2026-03-08&tz=../../etc/passwd&status=done&priority=STAT-AI"))
    assert flt.since == datetime(2026, 3, 8, tzinfo=UTC) and flt.status == ("done",)
    assert flt.priority_class == ("STAT-AI",)
    for bad in ("from=yesterday", "to=9999-12-31"):
        with pytest.raises(web.HTTPException):
            web.page_filter(QueryParams(bad))
