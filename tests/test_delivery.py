"""Outbox delivery to real peers: Orthanc (DIMSE and STOW-RS), DCMTK storescp, a refusing
pynetdicom SCP, a closed port; retries, refusals and dead letters in the database."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import Comprehensive3DSRStorage, SecondaryCaptureImageStorage
from sqlalchemy import select

from tests.test_sr import make_ct_series, make_prediction, make_report
from tests.worklist_factory import Database, add_study, database, migrated_database  # noqa: F401
from triage_node.config import load_settings
from triage_node.db.models import AuditEvent, Job, OutboxItem, OutboxState
from triage_node.db.session import transaction
from triage_node.outbox import enqueue_outbox
from triage_node.peers import free_port
from worker.pipeline.delivery import deliver_due, requeue
from worker.pipeline.delivery_policy import DeliveryPolicy

T0 = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[Database]:
    yield from migrated_database(f"sqlite:///{tmp_path / 'triage.db'}")


@pytest.fixture(scope="module")
def report_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[tuple[str, Path]]]:
    """An SR and its overlays written to disk: (study UID, [(SOP UID, path), ...])."""
    folder = tmp_path_factory.mktemp("results")
    series = make_ct_series(n=8, size=64)
    sr, overlays, _ = make_report(series, make_prediction(len(series)), k=1)
    objects = []
    for n, ds in enumerate([sr, *overlays]):
        path = folder / f"{n}.dcm"
        ds.save_as(path)
        objects.append((ds.SOPInstanceUID, path))
    return series[0].StudyInstanceUID, objects


def dimse(name: str, port: int, ae: str) -> dict:
    return {"name": name, "kind": "dimse", "ae_title": ae, "host": "127.0.0.1", "port": port, "timeout_s": 10}


def settings_for(tmp_path: Path, *destinations: dict, **kw):
    return load_settings(data_dir=tmp_path / "data", destinations=list(destinations), **kw)


def enqueue(db: Database, report_files, settings, job_id: int | None = None) -> None:
    study_uid, objects = report_files
    with transaction(db.factory) as session:
        enqueue_outbox(session, job_id, study_uid, objects, settings.destinations, now=T0)


def rows(db: Database, destination: str | None = None) -> list[OutboxItem]:
    with db.factory() as session:
        query = select(OutboxItem).order_by(OutboxItem.id)
        if destination:
            query = query.where(OutboxItem.destination == destination)
        return list(session.scalars(query))


def audits(db: Database, action: str) -> list[AuditEvent]:
    with db.factory() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.action == action)))


def orthanc_sop_uids(orthanc) -> set[str]:
    uids = set()
    for ident in orthanc.instances():
        tags = orthanc.get(f"/instances/{ident}/simplified-tags").json()
        uids.add(tags["SOPInstanceUID"])
    return uids


def test_sr_and_overlays_reach_orthanc_and_storescp_over_dimse(database, tmp_path, report_files, orthanc, storescp):
    scp = storescp(aet="ARCHIVE")
    settings = settings_for(tmp_path, dimse("pacs", orthanc.dicom_port, orthanc.aet), dimse("archive", scp.port, "ARCHIVE"))
    enqueue(database, report_files, settings)
    report = deliver_due(database.factory, settings, T0)
    _, objects = report_files
    assert report.sent == 2 * len(objects) and report.retrying == report.dead == 0
    assert orthanc_sop_uids(orthanc) == {uid for uid, _ in objects}
    assert len(scp.files()) == len(objects)
    # Orthanc knows the SR as a Comprehensive 3D SR in the source study.
    study_uid = report_files[0]
    found = httpx.get(f"{orthanc.dicomweb_url}/studies/{study_uid}/series", params={"Modality": "SR"}).json()
    assert len(found) == 1
    assert all(r.state == OutboxState.delivered and r.attempts == 1 for r in rows(database))
    assert len(audits(database, "delivery.sent")) == 2 * len(objects)
    # Nothing is due any more: a second pass sends nothing.
    assert deliver_due(database.factory, settings, T0 + timedelta(hours=1)).attempted == 0


def test_stow_rs_to_orthanc_checked_by_qido(sqlite_db, tmp_path, report_files, orthanc):
    web = {"name": "web", "kind": "dicomweb", "url": orthanc.dicomweb_url, "token": "t0k3n"}
    settings = settings_for(tmp_path, web)
    enqueue(sqlite_db, report_files, settings)
    report = deliver_due(sqlite_db.factory, settings, T0)
    study_uid, objects = report_files
    assert report.sent == len(objects)
    instances = httpx.get(f"{orthanc.dicomweb_url}/studies/{study_uid}/instances").json()
    assert {i["00080018"]["Value"][0] for i in instances} == {uid for uid, _ in objects}
    classes = {i["00080016"]["Value"][0] for i in instances}
    assert classes == {Comprehensive3DSRStorage, SecondaryCaptureImageStorage}


def test_a_closed_port_retries_with_backoff_while_the_other_destination_delivers(
    sqlite_db, tmp_path, report_files, storescp
):
    scp = storescp(aet="ARCHIVE")
    settings = settings_for(
        tmp_path,
        dimse("archive", scp.port, "ARCHIVE"),
        dimse("down", free_port(), "NOBODY"),
        delivery_max_attempts=3,
        delivery_backoff_base_s=10,
        delivery_backoff_cap_s=15,
    )
    enqueue(sqlite_db, report_files, settings)
    n = len(report_files[1])
    report = deliver_due(sqlite_db.factory, settings, T0)
    assert report.by_destination["archive"]["sent"] == n
    assert report.by_destination["down"]["retrying"] == n
    down = rows(sqlite_db, "down")
    assert all(r.state == OutboxState.pending and r.attempts == 1 for r in down)
    assert all(r.last_error.startswith("unreachable") for r in down)
    assert {r.next_attempt_at.replace(tzinfo=UTC) for r in down} == {T0 + timedelta(seconds=10)}
    failed = audits(sqlite_db, "delivery.failed")
    assert {e.outcome for e in failed} == {"unreachable"}
    # Not due yet; then due twice more (backoff 10 s, then capped at 15 s) and dead.
    assert deliver_due(sqlite_db.factory, settings, T0 + timedelta(seconds=5)).attempted == 0
    assert deliver_due(sqlite_db.factory, settings, T0 + timedelta(seconds=10)).retrying == n
    assert {r.next_attempt_at.replace(tzinfo=UTC) for r in rows(sqlite_db, "down")} == {
        T0 + timedelta(seconds=25)
    }
    assert deliver_due(sqlite_db.factory, settings, T0 + timedelta(seconds=25)).dead == n
    assert all(r.state == OutboxState.dead for r in rows(sqlite_db, "down"))
    assert len(audits(sqlite_db, "delivery.dead_letter")) == n
    assert len(scp.files()) == n  # the good peer got everything exactly once

    # `outbox retry --dead` puts them back for a fresh series of tries.
    with transaction(sqlite_db.factory) as session:
        assert requeue(session, dead=True, now=T0 + timedelta(minutes=1)) == n
    assert all(r.state == OutboxState.pending and r.attempts == 0 for r in rows(sqlite_db, "down"))


def test_orthanc_down_then_up_gets_each_object_exactly_once(database, tmp_path, report_files, orthanc):
    settings = settings_for(tmp_path, dimse("pacs", orthanc.dicom_port, orthanc.aet), delivery_backoff_base_s=30)
    with transaction(database.factory) as session:
        study = add_study(session)
        job = Job(study_id=study.id, series_id=study.series[0].id, version=1)
        session.add(job)
        session.flush()
        job_id = job.id
    enqueue(database, report_files, settings, job_id=job_id)
    n = len(report_files[1])
    orthanc.stop()
    assert deliver_due(database.factory, settings, T0).retrying == n
    orthanc.start()
    assert deliver_due(database.factory, settings, T0 + timedelta(seconds=10)).attempted == 0  # backoff
    assert deliver_due(database.factory, settings, T0 + timedelta(seconds=30)).sent == n
    assert deliver_due(database.factory, settings, T0 + timedelta(hours=2)).attempted == 0
    assert len(orthanc.instances()) == n
    assert len(audits(database, "delivery.sent")) == n
    assert {e.job_id for e in audits(database, "delivery.sent")} == {job_id}


class RefusingSCP:
    """A pynetdicom storage SCP that answers every C-STORE with one failure status."""

    def __init__(self, status: int, ae_title: str = "REFUSER") -> None:
        self.ae = AE(ae_title=ae_title)
        self.ae.require_called_aet = True
        self.ae.add_supported_context(Comprehensive3DSRStorage)
        self.ae.add_supported_context(SecondaryCaptureImageStorage)
        self.port = free_port()
        self.calls = 0
        self.lock = threading.Lock()

        def handle(event):
            with self.lock:
                self.calls += 1
            return status

        self.server = self.ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle)]
        )

    def stop(self) -> None:
        self.server.shutdown()


@pytest.mark.parametrize("status", [0xA700, 0x0122])
def test_a_refusing_peer_is_recorded_as_refused_not_unreachable(sqlite_db, tmp_path, report_files, status):
    scp = RefusingSCP(status)
    try:
        settings = settings_for(tmp_path, dimse("refuser", scp.port, "REFUSER"), delivery_refused_max_attempts=2)
        enqueue(sqlite_db, report_files, settings)
        n = len(report_files[1])
        first = deliver_due(sqlite_db.factory, settings, T0)
        assert first.retrying == n and first.sent == 0
        assert all(r.last_error.startswith(f"refused: C-STORE status 0x{status:04X}") for r in rows(sqlite_db))
        failed = audits(sqlite_db, "delivery.failed")
        assert {(e.outcome, e.detail["status"]) for e in failed} == {("refused", status)}
        second = deliver_due(sqlite_db.factory, settings, T0 + timedelta(hours=1))
        assert second.refused == n
        assert all(r.state == OutboxState.refused for r in rows(sqlite_db))
        dead = audits(sqlite_db, "delivery.dead_letter")
        assert {(e.outcome, e.detail["reason"]) for e in dead} == {("refused", "refused")}
        assert scp.calls == 2 * n
    finally:
        scp.stop()


def test_wrong_called_ae_is_a_permanent_refusal(sqlite_db, tmp_path, report_files):
    scp = RefusingSCP(0x0000, ae_title="RIGHT_AE")
    try:
        settings = settings_for(tmp_path, dimse("misconfigured", scp.port, "WRONG_AE"), delivery_refused_max_attempts=1)
        enqueue(sqlite_db, report_files, settings)
        report = deliver_due(sqlite_db.factory, settings, T0)
        assert report.refused == len(report_files[1])
        assert all("association rejected (permanent)" in r.last_error for r in rows(sqlite_db))
        assert scp.calls == 0
    finally:
        scp.stop()


def test_http_4xx_is_refused_and_http_unreachable_is_retried(sqlite_db, tmp_path, report_files, orthanc):
    wrong_path = {"name": "bad-path", "kind": "dicomweb", "url": orthanc.http_url + "/no-such-root"}
    nobody = {"name": "nobody", "kind": "dicomweb", "url": f"http://127.0.0.1:{free_port()}/dicom-web", "timeout_s": 5}
    settings = settings_for(tmp_path, wrong_path, nobody, delivery_refused_max_attempts=1)
    enqueue(sqlite_db, report_files, settings)
    n = len(report_files[1])
    report = deliver_due(sqlite_db.factory, settings, T0)
    assert report.by_destination["bad-path"]["refused"] == n
    assert report.by_destination["nobody"]["retrying"] == n
    assert all(r.last_error == "refused: HTTP 404" for r in rows(sqlite_db, "bad-path"))
    assert all(r.last_error.startswith("unreachable") for r in rows(sqlite_db, "nobody"))


def test_enqueue_is_idempotent_and_unknown_destinations_are_left_alone(sqlite_db, tmp_path, report_files):
    settings = settings_for(tmp_path, dimse("a", 9, "A"), dimse("b", 9, "B"))
    enqueue(sqlite_db, report_files, settings)
    enqueue(sqlite_db, report_files, settings)
    assert len(rows(sqlite_db)) == 2 * len(report_files[1])
    report = deliver_due(sqlite_db.factory, [], T0)
    assert report.unknown_destination == 2 * len(report_files[1]) and report.attempted == 0
    assert all(r.attempts == 0 for r in rows(sqlite_db))


def test_backoff_is_exponential_and_capped():
    policy = DeliveryPolicy(backoff_base_s=5, backoff_cap_s=60)
    assert [policy.backoff(a).total_seconds() for a in (1, 2, 3, 4, 5, 6)] == [5, 10, 20, 40, 60, 60]


def test_unreadable_file_is_dead_lettered_at_once(sqlite_db, tmp_path):
    settings = settings_for(tmp_path, dimse("a", 9, "A"))
    missing = tmp_path / "gone.dcm"
    with transaction(sqlite_db.factory) as session:
        enqueue_outbox(session, None, "1.2.3", [("1.2.3.4", missing)], settings.destinations, now=T0)
    report = deliver_due(sqlite_db.factory, settings, T0)
    assert report.dead == 1
    assert rows(sqlite_db)[0].last_error.startswith("invalid: cannot read file")


def test_outbox_cli_lists_retries_and_delivers(tmp_path, report_files, storescp, monkeypatch):
    import json

    from typer.testing import CliRunner

    from triage_node.cli import build_app
    from triage_node.db import schema

    data_dir = tmp_path / "data"
    url = f"sqlite:///{(data_dir / 'triage.db').resolve()}"
    schema.upgrade(url)
    scp = storescp(aet="ARCHIVE")
    down = dimse("archive", free_port(), "ARCHIVE")
    monkeypatch.setenv("TRIAGE_DESTINATIONS", json.dumps([down]))
    monkeypatch.setenv("TRIAGE_DELIVERY_MAX_ATTEMPTS", "1")
    runner, app = CliRunner(), build_app()
    db = next(migrated_database(url))
    enqueue(db, report_files, load_settings(data_dir=data_dir))
    n = len(report_files[1])

    result = runner.invoke(app, ["outbox", "deliver", "--json", "--data-dir", str(data_dir)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["dead"] == n

    listed = runner.invoke(app, ["outbox", "list", "--json", "--state", "dead", "--data-dir", str(data_dir)])
    rows_json = json.loads(listed.stdout)
    assert len(rows_json) == n and all(r["last_error"].startswith("unreachable") for r in rows_json)
    assert "DOE" not in listed.output and "PID0001234" not in listed.output

    one = runner.invoke(app, ["outbox", "retry", "--id", str(rows_json[0]["id"]), "--data-dir", str(data_dir)])
    assert one.exit_code == 0 and "requeued 1" in one.output
    assert runner.invoke(app, ["outbox", "retry", "--data-dir", str(data_dir)]).exit_code == 2

    # The peer comes up where the settings point: requeue the rest and deliver them.
    monkeypatch.setenv("TRIAGE_DESTINATIONS", json.dumps([dimse("archive", scp.port, "ARCHIVE")]))
    again = runner.invoke(app, ["outbox", "retry", "--dead", "--data-dir", str(data_dir)])
    assert f"requeued {n - 1}" in again.output
    sent = runner.invoke(app, ["outbox", "deliver", "--json", "--data-dir", str(data_dir)])
    assert json.loads(sent.stdout)["sent"] == n
    assert len(scp.files()) == n
    table = runner.invoke(app, ["outbox", "list", "--data-dir", str(data_dir)])
    assert table.exit_code == 0 and "delivered" in table.output
    assert len(audits(db, "delivery.requeued")) == n


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate signed by it, plus a
    second CA that the node must not trust."""
    import subprocess

    d = tmp_path_factory.mktemp("pki")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    for ca in ("ca", "rogue"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key", "-out",
                f"{ca}.crt", "-days", "2", "-subj", f"/CN={ca}")
    for name, san in (("server", "IP:127.0.0.1,DNS:localhost"), ("client", "DNS:triage-node")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}")
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")
    return d


def test_dicom_tls_destination_with_client_certificate(sqlite_db, tmp_path, report_files, pki):
    import ssl

    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "ca.crt"))
    server_ctx.verify_mode = ssl.CERT_REQUIRED  # the PACS wants the node's certificate
    server_ctx.load_cert_chain(str(pki / "server.crt"), str(pki / "server.key"))
    ae = AE(ae_title="TLS_PACS")
    ae.add_supported_context(Comprehensive3DSRStorage)
    ae.add_supported_context(SecondaryCaptureImageStorage)
    received: list[str] = []

    def handle(event):
        received.append(event.request.AffectedSOPInstanceUID)
        return 0x0000

    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, ssl_context=server_ctx,
                             evt_handlers=[(evt.EVT_C_STORE, handle)])
    try:
        good = {**dimse("tls-pacs", port, "TLS_PACS"), "tls": True, "tls_ca": str(pki / "ca.crt")}
        rogue = {**good, "name": "rogue-ca", "tls_ca": str(pki / "rogue.crt")}
        settings = settings_for(tmp_path, good, rogue, tls_cert=pki / "client.crt", tls_key=pki / "client.key")
        enqueue(sqlite_db, report_files, settings)
        report = deliver_due(sqlite_db.factory, settings, T0)
        _, objects = report_files
        assert report.by_destination["tls-pacs"]["sent"] == len(objects)
        assert sorted(received) == sorted(uid for uid, _ in objects)
        # A peer whose certificate the configured CA does not sign gets nothing.
        assert report.by_destination["rogue-ca"]["sent"] == 0
        assert all(r.state == OutboxState.pending for r in rows(sqlite_db, "rogue-ca"))
    finally:
        server.shutdown()
