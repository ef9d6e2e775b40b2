"""Webhooks against a real HTTP receiver; HL7 over MLLP against a real listener.

The receiver checks the HMAC signature itself; the MLLP listener parses with the
independent ``hl7`` package and answers with the ACK that package builds.
"""

from __future__ import annotations

import json
import socketserver
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import hl7
import pytest
from sqlalchemy import select

from tests.worklist_factory import add_result, add_study, sqlite_database  # noqa: F401
from triage_node.config import load_settings
from triage_node.db.models import AuditEvent, Job, JobState
from triage_node.db.session import transaction
from triage_node.notify import EVENT_FAILED, EVENT_POSITIVE, notify_job
from triage_node.notify.hl7 import HL7Error, PriorityUpdate, send_priority_update
from triage_node.notify.webhook import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    post_event,
    sign,
    verify_signature,
)
from triage_node.worklist.priority import compute_priority

SECRET = "test-secret-for-webhooks"


class Receiver:
    """HTTP server that records signed POSTs; answers ``fail_first`` requests with 503."""

    def __init__(self, fail_first: int = 0, status: int = 503) -> None:
        self.requests: list[dict] = []
        self.fail_first = fail_first
        self.status = status
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append({"headers": dict(self.headers), "body": body})
                code = receiver.status if len(receiver.requests) <= receiver.fail_first else 204
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class MLLPListener(socketserver.ThreadingTCPServer):
    """A RIS stand-in: parses each MLLP-framed message with ``hl7`` and ACKs it."""

    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, ack_code: str = "AA") -> None:
        self.messages: list[hl7.Message] = []
        self.ack_code = ack_code
        listener = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                buffer = b""
                while b"\x1c\r" not in buffer:
                    chunk = self.request.recv(65536)
                    if not chunk:
                        return
                    buffer += chunk
                text = buffer[buffer.index(b"\x0b") + 1 : buffer.index(b"\x1c\r")].decode()
                message = hl7.parse(text)
                listener.messages.append(message)
                ack = message.create_ack(ack_code=listener.ack_code)
                self.request.sendall(b"\x0b" + str(ack).encode() + b"\x1c\r")

        super().__init__(("127.0.0.1", 0), Handler)
        self.port = self.server_address[1]
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    def __enter__(self) -> MLLPListener:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver(fail_first=2) as r:
        yield r


def test_signature_round_trip_and_tamper_detection():
    body = b'{"event": "x"}'
    sig = sign(SECRET, "1700000000", body)
    assert verify_signature(SECRET, "1700000000", body, sig, max_age_s=None)
    assert not verify_signature(SECRET, "1700000000", body + b" ", sig, max_age_s=None)
    assert not verify_signature("other", "1700000000", body, sig, max_age_s=None)
    assert not verify_signature(SECRET, "1700000000", body, sig)  # too old


def test_webhook_retries_with_backoff_until_the_receiver_accepts(receiver):
    waits: list[float] = []
    outcome = post_event(receiver.url, "ich.positive", {"study_uid": "1.2.3"}, SECRET,
                         attempts=4, sleep=waits.append)
    assert outcome.delivered and outcome.attempts == 3 and outcome.status_code == 204
    assert waits == [0.5, 1.0]
    assert len(receiver.requests) == 3
    for request in receiver.requests:
        headers = request["headers"]
        assert verify_signature(SECRET, headers[TIMESTAMP_HEADER], request["body"],
                                headers[SIGNATURE_HEADER])
    assert json.loads(receiver.requests[-1]["body"]) == {"event": "ich.positive", "study_uid": "1.2.3"}


def test_webhook_gives_up_on_a_client_error_and_on_a_dead_receiver():
    with Receiver(fail_first=10, status=400) as r:
        outcome = post_event(r.url, "job.failed", {}, SECRET, attempts=4, sleep=lambda s: None)
    assert not outcome.delivered and outcome.attempts == 1 and outcome.error == "HTTP 400"
    outcome = post_event(r.url, "job.failed", {}, SECRET, attempts=2, sleep=lambda s: None)
    assert not outcome.delivered and outcome.attempts == 2 and "Connect" in (outcome.error or "")


def test_positive_result_sends_signed_webhook_and_hl7_stat_update(sqlite_database, receiver):
    with MLLPListener() as ris:
        settings = load_settings(
            secret_key=SECRET, webhook_urls=[receiver.url], hl7_host="127.0.0.1", hl7_port=ris.port
        )
        with transaction(sqlite_database.factory) as session:
            study = add_study(session, patient_name="Doe^Jane")
            result = add_result(session, study, {"any": 0.95, "subdural": 0.91})
            compute_priority(session, study, settings)
            job_id, study_uid = result.job_id, study.study_uid
        report = notify_job(settings, sqlite_database.factory, job_id, sleep=lambda s: None)
        assert report.event == EVENT_POSITIVE
        assert report.webhooks[0].delivered and report.hl7_ack == "AA"
        body = json.loads(receiver.requests[-1]["body"])
        assert body["study_uid"] == study_uid and body["positive_classes"] == ["subdural"]
        assert body["priority_class"] == "STAT-AI"
        assert "Doe" not in receiver.requests[-1]["body"].decode()  # no patient name
        (message,) = ris.messages
        assert str(message.segment("MSH")[9]) == "ORM^O01^ORM_O01"
        assert str(message.segment("ORC")[1]) == "XO"
        assert message["ORC.F7.R1.C6"] == "S" and message["OBR.F27.R1.C6"] == "S"
        assert message["PID.F5.R1.C1"] == "Doe" and message["PID.F5.R1.C2"] == "Jane"
        assert message["ZDS.F1.R1.C1"] == study_uid
        assert "subdural 0.91" in str(message.segment("NTE")[3])
    with sqlite_database.factory() as session:
        rows = session.scalars(
            select(AuditEvent).where(AuditEvent.action.like("notify.%")).order_by(AuditEvent.id)
        ).all()
    assert [(r.action, r.outcome) for r in rows] == [("notify.webhook", "ok"), ("notify.hl7", "ok")]
    assert rows[0].detail["attempts"] == 3


def test_failed_job_sends_failure_webhook_and_negative_sends_nothing(sqlite_database):
    with Receiver() as r:
        settings = load_settings(secret_key=SECRET, webhook_urls=[r.url])
        with transaction(sqlite_database.factory) as session:
            study = add_study(session)
            negative = add_result(session, study, {"any": 0.1})
            failed = add_result(session, study, {"any": 0.0}, state=JobState.failed.value)
            session.get(Job, failed.job_id).error = "spool file unreadable"
        report = notify_job(settings, sqlite_database.factory, negative.job_id)
        assert report.event is None and r.requests == []
        report = notify_job(settings, sqlite_database.factory, failed.job_id)
        assert report.event == EVENT_FAILED and report.webhooks[0].delivered
        body = json.loads(r.requests[0]["body"])
        assert body["event"] == "job.failed" and body["error"] == "spool file unreadable"


def test_hl7_reject_is_reported_not_retried():
    update = PriorityUpdate("1.2.3", "A1", "P1", "X^Y", "STAT-AI", "CT HEAD", "note")
    with MLLPListener(ack_code="AR") as ris:
        settings = load_settings(hl7_host="127.0.0.1", hl7_port=ris.port)
        with pytest.raises(HL7Error, match="AR"):
            send_priority_update(settings, update, attempts=3, sleep=lambda s: None)
        assert len(ris.messages) == 1
    assert send_priority_update(load_settings(), update) is None  # no RIS configured


def test_manual_priority_change_through_the_api_reaches_the_ris(sqlite_database, tmp_path):
    from tests.worklist_factory import build_api

    with MLLPListener() as ris:
        api = build_api(sqlite_database, tmp_path / "data", hl7_host="127.0.0.1", hl7_port=ris.port)
        with transaction(sqlite_database.factory) as session:
            study = add_study(session, patient_name="Roe^Rita")
            entry_id = compute_priority(session, study, api.settings).id
            uid = study.study_uid
        response = api.client("admin").patch(
            f"/api/worklist/{entry_id}", json={"manual_priority_class": "STAT-order", "reason": "ED call"}
        )
        assert response.status_code == 200
        # Only a change of class is sent: setting the same class again sends nothing.
        api.client("admin").patch(f"/api/worklist/{entry_id}", json={"status": "reading"})
        (message,) = ris.messages
        assert message["ORC.F7.R1.C6"] == "S" and message["ZDS.F1.R1.C1"] == uid
        assert "ED call" in str(message.segment("NTE")[3])
    with sqlite_database.factory() as session:
        event = session.scalars(select(AuditEvent).where(AuditEvent.action == "notify.hl7")).one()
    assert event.outcome == "ok" and event.detail["trigger"] == "manual priority"


def test_no_patient_identifier_reaches_a_log_line(sqlite_database, receiver):
    from structlog.testing import capture_logs

    with MLLPListener() as ris:
        settings = load_settings(secret_key=SECRET, webhook_urls=[receiver.url], hl7_host="127.0.0.1",
                                 hl7_port=ris.port)
        with transaction(sqlite_database.factory) as session:
            study = add_study(session, patient_name="Secretname^Hidden")
            result = add_result(session, study, {"any": 0.9, "epidural": 0.9})
            with capture_logs() as logs:
                compute_priority(session, study, settings)
            patient_id = study.patient_id
        with capture_logs() as more:
            notify_job(settings, sqlite_database.factory, result.job_id, sleep=lambda s: None)
        assert "Secretname" in str(ris.messages[0])  # the RIS does get it
    text = repr(logs + more)
    assert "Secretname" not in text and patient_id not in text and "ACC1" not in text
    assert any(e["event"] == "hl7.acknowledged" for e in more)


def test_hl7_escaping_leaves_no_mllp_framing_byte_in_a_value():
    from triage_node.notify.hl7 import END_BLOCK, START_BLOCK, PriorityUpdate, build_orm, escape

    hostile = "A\x0bB\x1c\rMSH|^~\\&|FORGED\x1c\x0dC\x00\x7f\tD\nE"
    assert escape(hostile) == "AB MSH\\F\\\\S\\\\R\\\\E\\\\T\\\\F\\FORGED C D E"
    update = PriorityUpdate(study_uid="1.2.3", accession_number=hostile, patient_id=hostile,
                            patient_name=f"{hostile}^Given", priority_class="stat_ai",
                            procedure=hostile, note=hostile)
    message, _ = build_orm(update, sending_application="TRIAGE_NODE")
    framed = START_BLOCK + message.encode() + END_BLOCK
    assert framed.count(b"\x0b") == 1 and framed.count(b"\x1c") == 1
    assert [s[:3] for s in message.split("\r") if s] == ["MSH", "PID", "ORC", "OBR", "ZDS", "NTE"]
    assert not any(ord(c) < 0x20 and c != "\r" for c in message)
