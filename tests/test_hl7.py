"""HL7 v2 to a RIS over MLLP, against a real listener: python-hl7's asyncio MLLP server.

The listener (`Ris`) runs ``hl7.mllp.start_hl7_server`` on its own event loop in a
thread, parses each message with python-hl7 and answers with the ACK python-hl7 builds
(``AA``, or ``AE``/``AR`` with an ERR segment), or answers nothing at all. Plain TCP, or
TLS with certificates made by openssl in the test.
"""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import hl7
import pytest
from hl7.mllp import start_hl7_server
from sqlalchemy import select
from structlog.testing import capture_logs

from tests.worklist_factory import add_result, add_study, database, sqlite_database  # noqa: F401
from triage_node.config import load_settings
from triage_node.db.models import AuditEvent, HL7OutboxItem, OutboxState
from triage_node.db.session import transaction
from triage_node.notify import notify_job, report_result
from triage_node.notify.hl7 import END_BLOCK, START_BLOCK, Envelope, build_oru
from triage_node.notify.outbox import deliver_due
from triage_node.peers import free_port
from triage_node.worklist.priority import compute_priority

SECRET = "test-secret-for-hl7-notifications"


class Ris:
    """A RIS stand-in: parses what arrives, answers ``ack_code`` (or nothing when silent)."""

    def __init__(self, ack_code: str = "AA", *, silent: bool = False, error_text: str | None = None,
                 port: int = 0, ssl_context: ssl.SSLContext | None = None) -> None:
        self.ack_code, self.silent, self.error_text = ack_code, silent, error_text
        self.port, self.ssl_context = port, ssl_context
        self.messages: list[hl7.Message] = []
        self.peer_certificates: list[dict | None] = []
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    async def _handle(self, reader, writer) -> None:  # noqa: ANN001 - hl7.mllp streams
        self.peer_certificates.append(writer.get_extra_info("peercert"))
        try:
            while True:
                message = await reader.readmessage()
                self.messages.append(message)
                if self.silent:
                    continue
                ack = message.create_ack(ack_code=self.ack_code, application="RIS_TEST")
                if self.error_text:
                    err = ack.create_segment([ack.create_field(["ERR"])])
                    err.assign_field("207", 3, 1, 1)
                    err.assign_field("Application internal error", 3, 1, 2)
                    err.assign_field("HL70357", 3, 1, 3)
                    err.assign_field("E", 4)
                    err.assign_field(ack.escape(self.error_text), 8)
                    ack.append(err)
                writer.writemessage(ack)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(start_hl7_server(
            self._handle, "127.0.0.1", self.port, encoding="utf-8", ssl=self.ssl_context,
        ))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    def __enter__(self) -> Ris:
        self._thread.start()
        assert self._ready.wait(10), "MLLP listener did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            assert self._server is not None
            self._server.close()
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def ris_settings(port: int, **overrides):  # noqa: ANN201
    values = dict(
        secret_key=SECRET, hl7_host="127.0.0.1", hl7_port=port, hl7_timeout_s=2.0,
        hl7_sending_application="ICH_TRIAGE", hl7_sending_facility="RADIOLOGY",
        hl7_receiving_application="RIS_PROD", hl7_receiving_facility="GENERAL_HOSPITAL",
        delivery_backoff_base_s=5.0, delivery_backoff_cap_s=60.0,
    )
    return load_settings(**{**values, **overrides})


def positive_job(db, settings, *, patient_name: str = "Doe^Jane") -> tuple[int, str, str]:  # noqa: ANN001
    with transaction(db.factory) as session:
        study = add_study(session, patient_name=patient_name)
        result = add_result(session, study, {"any": 0.95, "subdural": 0.91})
        compute_priority(session, study, settings)
        return result.job_id, study.study_uid, study.patient_id


def rows(db) -> list[HL7OutboxItem]:  # noqa: ANN001
    with db.factory() as session:
        return list(session.scalars(select(HL7OutboxItem).order_by(HL7OutboxItem.id)))


def audits(db, prefix: str = "notify.hl7") -> list[AuditEvent]:  # noqa: ANN001
    with db.factory() as session:
        return list(session.scalars(
            select(AuditEvent).where(AuditEvent.action.like(f"{prefix}%")).order_by(AuditEvent.id)
        ))


def obx(message: hl7.Message) -> dict[str, list[str]]:
    """OBX-3.1 -> [OBX-2, OBX-4, OBX-5 (unescaped), OBX-11]."""
    return {
        str(seg(3)(1)(1)): [str(seg(2)), str(seg(4)), message.unescape(str(seg(5))), str(seg(11))]
        for seg in message.segments("OBX")
    }


def later(minutes: float) -> datetime:
    return datetime.now(UTC) + timedelta(minutes=minutes)


def test_orm_and_oru_reach_the_ris_with_the_configured_envelope(sqlite_database):
    with Ris() as ris:
        settings = ris_settings(ris.port)
        job_id, study_uid, patient_id = positive_job(sqlite_database, settings)
        with capture_logs() as logs:
            assert notify_job(settings, sqlite_database.factory, job_id).hl7_ack == "AA"
            assert report_result(settings, sqlite_database.factory, job_id) == ("AA", None)
        orm, oru = ris.messages
    stored = rows(sqlite_database)
    assert [(r.message_type, r.state, r.ack_code, r.attempts) for r in stored] == [
        ("ORM^O01", "delivered", "AA", 1), ("ORU^R01", "delivered", "AA", 1)]
    for message, row, kind in ((orm, stored[0], "ORM^O01^ORM_O01"), (oru, stored[1], "ORU^R01^ORU_R01")):
        assert [str(message[f"MSH.F{n}"]) for n in (3, 4, 5, 6)] == [
            "ICH_TRIAGE", "RADIOLOGY", "RIS_PROD", "GENERAL_HOSPITAL"]
        assert str(message.segment("MSH")(9)) == kind
        assert message["MSH.F10"] == row.control_id and message["MSH.F12"] == "2.5.1"
        assert message["MSH.F18"] == "UNICODE UTF-8"
        assert message["PID.F3"] == patient_id and message["PID.F5.R1.C1"] == "Doe"
        assert message["OBR.F2"] == message["OBR.F3"] == "ACC1" and message["ORC.F2"] == "ACC1"
        assert message["ZDS.F1.R1.C1"] == study_uid
    assert message is oru
    assert orm["ORC.F1"] == "XO" and orm["ORC.F7.R1.C6"] == "S" and orm["OBR.F27.R1.C6"] == "S"
    assert oru["ORC.F1"] == "RE" and oru["OBR.F25"] == "P"
    results = obx(oru)
    assert results["ICH-AI"][2] == (
        "AI triage: intracranial hemorrhage suspected (subdural 0.91); not a diagnosis")
    assert results["ICH-SUBDURAL"][:3] == ["CWE", results["ICH-SUBDURAL-P"][1], "52101004^Present^SCT"]
    assert results["ICH-SUBDURAL-P"][0] == "NM" and results["ICH-SUBDURAL-P"][2] == "0.910"
    assert results["ICH-EPIDURAL"][2] == "2667000^Absent^SCT"
    assert results["ICH-ANY"][2] == "52101004^Present^SCT" and results["ICH-ANY-P"][2] == "0.950"
    assert results["ICH-AI-MODEL"][2].startswith("ich_sequence 0.1.0, operating point")
    assert results["ICH-AI-NOTICE"][2].startswith(
        "Model ich_sequence 0.1.0: research use only. Not a medical device, not for clinical use")
    assert {v[3] for v in results.values()} == {"P"}  # preliminary: unverified, as the SR says
    events = audits(sqlite_database)
    assert [(e.action, e.outcome, e.detail["message_type"]) for e in events] == [
        ("notify.hl7", "ok", "ORM^O01"), ("notify.hl7", "ok", "ORU^R01")]
    text = repr(logs)
    assert "Doe" not in text and patient_id not in text and "ACC1" not in text
    assert sum(e["event"] == "hl7.acknowledged" for e in logs) == 2


def test_negative_result_sends_an_oru_with_every_class_absent_and_no_orm(sqlite_database):
    with Ris() as ris:
        settings = ris_settings(ris.port)
        with transaction(sqlite_database.factory) as session:
            study = add_study(session)
            job_id = add_result(session, study, {"any": 0.12, "subdural": 0.08}).job_id
        assert notify_job(settings, sqlite_database.factory, job_id).event is None
        assert report_result(settings, sqlite_database.factory, job_id) == ("AA", None)
        (oru,) = ris.messages
    results = obx(oru)
    assert str(oru.segment("MSH")(9)) == "ORU^R01^ORU_R01"
    assert results["ICH-AI"][2].startswith("AI triage: no intracranial hemorrhage suspected (highest any 0.12)")
    assert all(v[2] == "2667000^Absent^SCT" for k, v in results.items() if v[0] == "CWE")


@pytest.mark.parametrize("code", ["AE", "AR"])
def test_ae_or_ar_ack_is_recorded_as_refused_with_the_ris_error_text(sqlite_database, code):
    with Ris(ack_code=code, error_text="Order ACC1 not found | unknown") as ris:
        settings = ris_settings(ris.port)
        job_id, study_uid, _ = positive_job(sqlite_database, settings)
        ack, error = report_result(settings, sqlite_database.factory, job_id)
        assert (ack, error) == (code, f"{code}: Order ACC1 not found | unknown")
        # Set aside at once: a later delivery round sends nothing more.
        assert deliver_due(sqlite_database.factory, settings, later(600)).as_dict()["sent"] == 0
        assert len(ris.messages) == 1
    (row,) = rows(sqlite_database)
    assert row.state == OutboxState.refused and row.attempts == 1 and row.ack_code == code
    assert "Order ACC1 not found" in (row.last_error or "")
    events = audits(sqlite_database)
    assert [(e.action, e.outcome) for e in events] == [
        ("notify.hl7", "refused"), ("notify.hl7.dead_letter", "refused")]
    assert events[0].detail["ack"] == code and events[0].study_uid == study_uid
    assert "Order ACC1 not found" in events[0].detail["error"]


def test_silent_ris_is_retried_with_backoff_then_dead_lettered(sqlite_database, tmp_path):
    from typer.testing import CliRunner

    from triage_node.cli import build_app

    with Ris(silent=True) as ris:
        settings = ris_settings(ris.port, hl7_timeout_s=0.3, hl7_max_attempts=3)
        job_id, _, _ = positive_job(sqlite_database, settings)
        ack, error = report_result(settings, sqlite_database.factory, job_id)
        assert ack is None and error == "no ACK within 0.3 s"
        first = rows(sqlite_database)[0].next_attempt_at
        now = datetime.now(UTC)
        assert deliver_due(sqlite_database.factory, settings, now).as_dict()["sent"] == 0  # not due yet
        for minutes in (1, 2):
            report = deliver_due(sqlite_database.factory, settings, now + timedelta(minutes=minutes))
        assert report.as_dict() == {"sent": 0, "retrying": 0, "refused": 0, "dead": 1}
        # Each try is the same message: a RIS can tell a repeat by its MSH-10.
        assert len(ris.messages) == 3 and len({m["MSH.F10"] for m in ris.messages}) == 1
    (row,) = rows(sqlite_database)
    assert row.state == OutboxState.dead and row.attempts == 3 and row.ack_code is None
    assert first.replace(tzinfo=UTC) - now < timedelta(seconds=6)  # backoff base 5 s after try 1
    events = audits(sqlite_database)
    assert [(e.action, e.outcome) for e in events] == [("notify.hl7", "unreachable")] * 3 + [
        ("notify.hl7.dead_letter", "dead")]
    assert [e.detail["attempts"] for e in events[:3]] == [1, 2, 3]

    cli = CliRunner()
    listed = cli.invoke(build_app(), ["hl7", "list", "--state", "dead", "--json", "--data-dir", str(tmp_path)])
    assert listed.exit_code == 0, listed.output
    assert f'"control_id": "{row.control_id}"' in listed.output and "Doe" not in listed.output
    retried = cli.invoke(build_app(), ["hl7", "retry", "--dead", "--data-dir", str(tmp_path)])
    assert retried.exit_code == 0 and "requeued 1" in retried.output
    (row,) = rows(sqlite_database)
    assert row.state == OutboxState.pending and row.attempts == 0
    assert audits(sqlite_database, "notify.hl7.requeued")[0].actor == "cli"


def test_ris_that_comes_up_late_receives_the_message_exactly_once(database):
    """On SQLite and PostgreSQL: the claim and the per-job uniqueness hold on both."""
    port = free_port()
    settings = ris_settings(port)
    job_id, _, _ = positive_job(database, settings)
    ack, error = report_result(settings, database.factory, job_id)
    assert ack is None and "ConnectionRefusedError" in (error or "")
    with Ris(port=port) as ris:
        assert deliver_due(database.factory, settings, later(1)).as_dict()["sent"] == 1
        assert deliver_due(database.factory, settings, later(60)).as_dict()["sent"] == 0
        # The job's notification task run again (a redelivered Celery message) stores nothing new.
        assert report_result(settings, database.factory, job_id) == (None, None)
        assert deliver_due(database.factory, settings, later(120)).as_dict()["sent"] == 0
        assert len(ris.messages) == 1
    (row,) = rows(database)
    assert row.state == OutboxState.delivered and row.attempts == 2
    assert [e.outcome for e in audits(database)] == ["unreachable", "ok"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a RIS certificate for 127.0.0.1 and a node certificate signed by it, and a
    second CA the node must not trust."""
    d = tmp_path_factory.mktemp("hl7-pki")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    for ca in ("ca", "rogue"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key", "-out",
                f"{ca}.crt", "-days", "2", "-subj", f"/CN=hl7 test {ca}")
    for name, san in (("ris", "IP:127.0.0.1"), ("node", "DNS:triage-node")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}")
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")
    return d


def test_mllp_over_tls_with_the_node_certificate(sqlite_database, pki):
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "ca.crt"))
    server.verify_mode = ssl.CERT_REQUIRED  # the RIS wants the node's certificate
    server.load_cert_chain(str(pki / "ris.crt"), str(pki / "ris.key"))
    with Ris(ssl_context=server) as ris:
        node_cert = dict(tls_cert=pki / "node.crt", tls_key=pki / "node.key")
        rogue = ris_settings(ris.port, hl7_tls=True, hl7_tls_ca=pki / "rogue.crt", **node_cert)
        job_id, _, _ = positive_job(sqlite_database, rogue)
        ack, error = report_result(rogue, sqlite_database.factory, job_id)
        assert ack is None and "CERTIFICATE_VERIFY_FAILED" in (error or "")
        assert ris.messages == []
        good = ris_settings(ris.port, hl7_tls=True, hl7_tls_ca=pki / "ca.crt", **node_cert)
        assert deliver_due(sqlite_database.factory, good, later(1)).as_dict()["sent"] == 1
        (oru,) = ris.messages
    assert str(oru.segment("MSH")(9)) == "ORU^R01^ORU_R01"
    subject = dict(item for rdn in ris.peer_certificates[-1]["subject"] for item in rdn)
    assert subject["commonName"] == "node"


def test_oru_values_are_escaped_and_keep_no_mllp_framing_byte(sqlite_database):
    from triage_node.notify.hl7 import ClassFinding, ResultReport

    hostile = "A\x0bB\x1c\rMSH|^~\\&|FORGED\x1c\x0dC"
    report = ResultReport(
        study_uid="1.2.3", accession_number=hostile, patient_id=hostile,
        patient_name="Müller|Smith^Zoë", procedure=hostile, model_name=hostile, model_version="1",
        operating_point="default", device_uid="2.25.1",
        findings=(ClassFinding("any", True, 0.9),), observed_at=datetime.now(UTC),
    )
    message, _ = build_oru(report, envelope=Envelope(sending_application=hostile))
    framed = START_BLOCK + message.encode() + END_BLOCK
    assert framed.count(b"\x0b") == 1 and framed.count(b"\x1c") == 1
    assert not any(ord(c) < 0x20 and c != "\r" for c in message)
    parsed = hl7.parse(message)
    assert [str(s[0]) for s in parsed] == ["MSH", "PID", "ORC", "OBR", "ZDS", "OBX", "OBX", "OBX", "OBX", "OBX"]
    # python-hl7's accessors unescape the delimiters; non-ASCII stays UTF-8 (MSH-18).
    assert parsed["PID.F5.R1.C1"] == "Müller|Smith" and parsed["PID.F5.R1.C2"] == "Zoë"
    assert parsed["ORC.F2"] == "AB MSH|^~\\&|FORGED C"
    assert "\\F\\" in str(parsed.segment("ORC")(2))
    with pytest.raises(ValueError, match="probability of 'any'"):
        ClassFinding("any", True, 1.5)
