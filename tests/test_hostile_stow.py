"""Slow STOW-RS senders against a running node: at most ``max_stow_requests`` requests
are received at once; one more is answered at once with HTTP 503 and Retry-After,
logged and audited, and the slots come back when the held requests end."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import httpx
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from tests.ingest_support import ct_dataset, part10
from tests.node_process import NodeProcess
from tests.pipeline_helpers import multipart_related
from triage_node.api.stow import BUSY_RETRY_AFTER_S
from triage_node.db.models import AuditEvent, Instance
from triage_node.peers import wait_until

SLOTS = 2
BOUNDARY = "slow-boundary"
STOW_TYPE = f'multipart/related; type="application/dicom"; boundary="{BOUNDARY}"'


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    env = {"TRIAGE_MAX_STOW_REQUESTS": str(SLOTS)}
    with NodeProcess(tmp_path_factory.mktemp("stow-slots") / "data", env=env) as running:
        yield running


def valid_part() -> bytes:
    return part10(ct_dataset(generate_uid(), generate_uid(), 0))


def hold_request(node: NodeProcess, token: str) -> socket.socket:
    """A STOW-RS request whose body stops after its first part (stored) and a few bytes
    of the second: the node holds it open, waiting for the rest of Content-Length."""
    head = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    body = head + valid_part() + b"\r\n" + head + b"\x00" * 64
    request = (
        f"POST /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1:{node.http_port}\r\n"
        f"Authorization: Bearer {token}\r\nContent-Type: {STOW_TYPE}\r\n"
        f"Content-Length: {len(body) + 50_000_000}\r\n\r\n"
    ).encode()
    sock = socket.create_connection(("127.0.0.1", node.http_port), timeout=10)
    sock.sendall(request + body)
    return sock


def instances(node: NodeProcess) -> int:
    with node.session_factory() as session:
        return session.scalar(select(func.count()).select_from(Instance))


def stow_audit(node: NodeProcess) -> list[AuditEvent]:
    with node.session_factory() as session:
        return list(session.scalars(
            select(AuditEvent).where(AuditEvent.action == "stow.request").order_by(AuditEvent.id)
        ).all())


def post(node: NodeProcess, token: str) -> httpx.Response:
    return httpx.post(node.url + "/dicomweb/studies", timeout=30,
                      content=multipart_related([valid_part()], boundary=BOUNDARY),
                      headers={"Authorization": f"Bearer {token}", "Content-Type": STOW_TYPE,
                               "Accept": "application/dicom+json"})


def test_one_request_over_max_stow_requests_gets_503_at_once_and_the_slots_come_back(
    node: NodeProcess,
) -> None:
    token = node.token("sender", "slow-sender")
    held = [hold_request(node, token) for _ in range(SLOTS)]
    try:
        # Each held request has stored its first part: both are inside the endpoint.
        wait_until(lambda: instances(node) == SLOTS, "held requests' first parts", timeout=30)
        started = time.monotonic()
        busy = post(node, token)
        elapsed = time.monotonic() - started
        assert busy.status_code == 503, busy.text
        assert busy.headers["Retry-After"] == str(BUSY_RETRY_AFTER_S)
        assert "max_stow_requests" in busy.json()["detail"]
        assert elapsed < 3, f"the refusal took {elapsed:.1f} s"
        assert instances(node) == SLOTS
        [refused] = [e for e in stow_audit(node) if e.detail["http_status"] == 503]
        assert refused.actor.endswith("slow-sender") and refused.outcome == "error"
        assert "stow.busy" in node.log_text()
    finally:
        for sock in held:
            sock.close()
    # The held requests end (audited: their first parts stay stored) and free their slots.
    wait_until(lambda: sum("disconnected" in (e.detail.get("error") or "") for e in stow_audit(node))
               == SLOTS, "held requests audited", timeout=30)
    # a request gives its slot back just after its audit row is committed: under load the
    # first try can still meet the old count, so the slots must come back within seconds
    wait_until(lambda: post(node, token).status_code == 200, "a slot back", timeout=10, interval=0.5)
    assert instances(node) == SLOTS + 1
    assert node.alive
