"""``triage-node destination test`` and ``triage-node echo`` against real peers, and DICOMweb
delivery with basic auth.

Orthanc runs with HTTP basic auth on and checks the called AE title, like a hospital PACS;
each wrong setting a team gets wrong on day one (port, AE title, password) must come back
as a failed step that says which, with exit status 1.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.test_sr import make_ct_series, make_prediction, make_report
from tests.worklist_factory import Database, migrated_database
from triage_node.cli import build_app
from triage_node.config import SettingsError, load_settings
from triage_node.db.models import OutboxItem, OutboxState
from triage_node.db.session import transaction
from triage_node.outbox import enqueue_outbox
from triage_node.peers import OrthancServer
from worker.pipeline.delivery import deliver_due
from worker.pipeline.destination_check import TEST_PATIENT_ID

USER, PASSWORD = "triage", "correct-horse-battery"


@pytest.fixture(scope="module")
def pacs() -> Iterator[OrthancServer]:
    server = OrthancServer(aet="PACS_AE", users={USER: PASSWORD}, config={"DicomCheckCalledAet": True})
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


def dimse(pacs: OrthancServer, **kw) -> dict:
    return {"name": "pacs", "kind": "dimse", "ae_title": pacs.aet, "host": "127.0.0.1",
            "port": pacs.dicom_port, "timeout_s": 5, **kw}


def web(pacs: OrthancServer, **kw) -> dict:
    return {"name": "pacs-web", "kind": "dicomweb", "url": pacs.dicomweb_url, "username": USER,
            "password": PASSWORD, "timeout_s": 5, **kw}


def run(tmp_path: Path, monkeypatch, destinations: list[dict], *args: str) -> tuple[int, list[dict]]:
    monkeypatch.setenv("TRIAGE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("TRIAGE_DESTINATIONS", json.dumps(destinations))
    result = CliRunner().invoke(build_app(), [*args, "--json"])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, json.loads(result.stdout)


def failed(steps: list[dict]) -> dict:
    (step,) = [s for s in steps if not s["ok"]]
    return step


def test_dimse_destination_passes_and_stores_a_findable_test_object(tmp_path, monkeypatch, pacs) -> None:
    code, steps = run(tmp_path, monkeypatch, [dimse(pacs)], "destination", "test", "pacs", "--store-test-object")
    assert code == 0, steps
    assert [s["name"] for s in steps] == ["connect", "association", "c-echo", "c-store"]
    ids = {pacs.get(f"/instances/{i}/simplified-tags").json()["PatientID"] for i in pacs.instances()}
    assert TEST_PATIENT_ID in ids


def test_wrong_port_says_nothing_listens(tmp_path, monkeypatch, pacs) -> None:
    from triage_node.peers import free_port

    code, steps = run(tmp_path, monkeypatch, [dimse(pacs, port=free_port())], "destination", "test", "pacs")
    assert code == 1
    assert failed(steps)["name"] == "connect"
    assert "nothing listens" in failed(steps)["detail"]


def test_wrong_called_ae_title_is_named(tmp_path, monkeypatch, pacs) -> None:
    code, steps = run(tmp_path, monkeypatch, [dimse(pacs, ae_title="NOT_THE_PACS")], "destination", "test", "pacs")
    assert code == 1
    step = failed(steps)
    assert step["name"] == "association"
    assert "called AE title 'NOT_THE_PACS'" in step["detail"] and "check ae_title" in step["detail"]


def test_dicomweb_with_basic_auth_searches_and_stores(tmp_path, monkeypatch, pacs) -> None:
    code, steps = run(tmp_path, monkeypatch, [web(pacs)], "destination", "test", "pacs-web", "--store-test-object")
    assert code == 0, steps
    assert [s["name"] for s in steps] == ["qido", "stow"]


def test_wrong_password_is_named(tmp_path, monkeypatch, pacs) -> None:
    code, steps = run(tmp_path, monkeypatch, [web(pacs, password="wrong-password")], "destination", "test", "pacs-web")
    assert code == 1
    assert failed(steps)["detail"].startswith("HTTP 401: the peer refused the credentials")


def test_wrong_dicomweb_path_is_named(tmp_path, monkeypatch, pacs) -> None:
    code, steps = run(tmp_path, monkeypatch, [web(pacs, url=pacs.http_url + "/no-such-root")],
                      "destination", "test", "pacs-web")
    assert code == 1
    assert "HTTP 404" in failed(steps)["detail"]


def test_echo_any_ae(tmp_path, monkeypatch, pacs) -> None:
    code, steps = run(tmp_path, monkeypatch, [], "echo", "127.0.0.1", str(pacs.dicom_port), "--aec", pacs.aet)
    assert code == 0 and steps[-1] == {"name": "c-echo", "ok": True, "detail": "C-ECHO status 0x0000"}


def test_unknown_destination_exits_2(tmp_path, monkeypatch, pacs) -> None:
    monkeypatch.setenv("TRIAGE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("TRIAGE_DESTINATIONS", json.dumps([dimse(pacs)]))
    result = CliRunner().invoke(build_app(), ["destination", "test", "nope"])
    assert result.exit_code == 2 and "configured: pacs" in result.output


def test_basic_auth_settings_are_checked_and_masked() -> None:
    with pytest.raises(SettingsError, match="username and password go together"):
        load_settings(destinations=[{"name": "w", "kind": "dicomweb", "url": "http://x/dicom-web", "username": "u"}])
    with pytest.raises(SettingsError, match="not both"):
        load_settings(destinations=[{"name": "w", "kind": "dicomweb", "url": "http://x/dicom-web", "username": "u",
                                     "password": "p", "token": "t"}])
    settings = load_settings(destinations=[{"name": "w", "kind": "dicomweb", "url": "http://x/dicom-web",
                                            "username": "u", "password": "secret-password"}])
    assert "secret-password" not in json.dumps(settings.destinations[0].masked())


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[Database]:
    yield from migrated_database(f"sqlite:///{tmp_path / 'triage.db'}")


def test_outbox_delivers_by_stow_rs_with_basic_auth_and_a_wrong_password_is_refused(tmp_path, sqlite_db, pacs) -> None:
    series = make_ct_series(n=6, size=64)
    sr, overlays, _ = make_report(series, make_prediction(len(series)), k=1)
    objects = []
    for n, ds in enumerate([sr, *overlays]):
        ds.save_as(tmp_path / f"{n}.dcm")
        objects.append((ds.SOPInstanceUID, tmp_path / f"{n}.dcm"))
    good = web(pacs)
    bad = web(pacs, name="wrong-password", password="not-it")
    settings = load_settings(data_dir=tmp_path / "data", destinations=[good, bad], delivery_refused_max_attempts=1)
    with transaction(sqlite_db.factory) as session:
        enqueue_outbox(session, None, series[0].StudyInstanceUID, objects, settings.destinations)
    deliver_due(sqlite_db.factory, settings, datetime.now(UTC))
    with sqlite_db.factory() as session:
        rows = session.query(OutboxItem).all()
    assert {r.state for r in rows if r.destination == "pacs-web"} == {OutboxState.delivered}
    bad_rows = [r for r in rows if r.destination == "wrong-password"]
    assert {r.state for r in bad_rows} == {OutboxState.refused}
    assert all("401" in (r.last_error or "") for r in bad_rows)
