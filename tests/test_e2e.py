"""End to end with real peers: DCMTK storescu -> `triage-node serve` -> Celery on Redis ->
`triage-node worker` (ONNX Runtime or a real Triton server) -> Orthanc as the PACS.

Checked through Orthanc's QIDO-RS: the SR and the overlay series arrive in the study;
every object the worker wrote passes dciodvfy. With Orthanc down when the result is
ready, delivery retries and, once Orthanc is back, each object is delivered exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import func, select

from tests.worker_support import build_small_repository, shipped_model, write_ct_series
from triage_node.config import load_settings
from triage_node.db import schema
from triage_node.db.models import AuditEvent, Job, JobState, OutboxItem, OutboxState, Result
from triage_node.db.session import make_engine, make_sessionmaker
from triage_node.notify.webhook import verify_signature
from triage_node.peers import dciodvfy, free_port, storescu, wait_until

TRIAGE_NODE = str(Path(sys.executable).parent / "triage-node")
NODE_AE = "TRIAGE_NODE"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(repository, card): the shipped model when exported, else a small one (threshold 0.3)."""
    shipped = shipped_model()
    if shipped is not None:
        return shipped
    card = build_small_repository(tmp_path_factory.mktemp("model"), threshold=0.3)
    return card.parent / "models", card


class Site:
    """A node and a worker as subprocesses, sharing a data directory and Redis."""

    def __init__(self, tmp_path: Path, model: tuple[Path, Path], redis_url: str, orthanc,  # type: ignore[no-untyped-def]
                 database_url: str | None = None, **extra: str) -> None:
        self.tmp = tmp_path
        self.data_dir = tmp_path / "data"
        self.dicom_port = free_port()
        destination = {"name": "orthanc", "kind": "dimse", "ae_title": orthanc.aet, "host": "127.0.0.1",
                       "port": orthanc.dicom_port, "timeout_s": 5}
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
        self.env.update({
            "TRIAGE_DATA_DIR": str(self.data_dir),
            "TRIAGE_BROKER_URL": redis_url,
            "TRIAGE_DICOM_PORT": str(self.dicom_port),
            "TRIAGE_AE_TITLE": NODE_AE,
            "TRIAGE_ALLOWED_CALLERS": '["*@127.0.0.1/32"]',
            "TRIAGE_DESTINATIONS": json.dumps([destination]),
            "TRIAGE_MODEL_REPOSITORY": str(model[0]),
            "TRIAGE_MODEL_CARD": str(model[1]),
            "TRIAGE_KEY_SLICES_PER_CLASS": "1",
            "TRIAGE_INFERENCE_THREADS": "1",
            "TRIAGE_DELIVERY_BACKOFF_BASE_S": "1",
            "TRIAGE_LOG_FORMAT": "json",
            "OMP_NUM_THREADS": "1",
            "TRIAGE_SECRET_KEY": os.environ["TRIAGE_SECRET_KEY"],
            **extra,
        })
        if database_url:
            self.env["TRIAGE_DATABASE_URL"] = database_url
        settings = load_settings(data_dir=self.data_dir, database_url=database_url)
        schema.upgrade(settings.effective_database_url)
        self.engine = make_engine(settings.effective_database_url)
        self.session_factory = make_sessionmaker(self.engine)
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, *args: str) -> None:
        with open(self.tmp / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen([TRIAGE_NODE, *args], env=self.env, stdout=log,
                                                stderr=subprocess.STDOUT, start_new_session=True)

    def start_all(self) -> None:
        self.start("worker", "worker", "--concurrency", "1")
        self.start("serve", "serve", "--no-api")
        wait_until(lambda: _listening(self.dicom_port), "node SCP", timeout=30,
                   process=self.procs["serve"], log=self.tmp / "serve.log")

    def job(self) -> Job | None:
        with self.session_factory() as session:
            return session.scalars(select(Job).order_by(Job.id)).first()

    def wait(self, check, what: str, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
        wait_until(check, what, timeout=timeout, interval=0.2, process=self.procs["worker"],
                   log=self.tmp / "worker.log")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.engine.dispose()


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _qido(orthanc, path: str) -> list[dict]:  # type: ignore[no-untyped-def]
    response = orthanc.get(f"/dicom-web/{path}", headers={"Accept": "application/dicom+json"})
    response.raise_for_status()
    return response.json() if response.content else []


def _series_in_orthanc(orthanc, study_uid: str) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """Modality -> number of instances, per QIDO-RS (PS3.18 10.6)."""
    out: dict[str, int] = {}
    for series in _qido(orthanc, f"studies/{study_uid}/series"):
        modality = series["00080060"]["Value"][0]
        uid = series["0020000E"]["Value"][0]
        out[modality] = out.get(modality, 0) + len(_qido(orthanc, f"studies/{study_uid}/series/{uid}/instances"))
    return out


@pytest.mark.parametrize(("backend", "database"), [("onnx", "sqlite"), ("triton", "sqlite"),
                                                   ("onnx", "postgresql")])
def test_study_from_storescu_comes_back_to_orthanc_as_sr_and_overlays(
    backend: str, database: str, tmp_path: Path, model: tuple[Path, Path], redis_url: str, orthanc,  # type: ignore[no-untyped-def]
    triton_server, request: pytest.FixtureRequest,
) -> None:
    extra = {"TRIAGE_INFERENCE_BACKEND": backend}
    if backend == "triton":
        extra["TRIAGE_TRITON_URL"] = triton_server(model[0]).grpc_url
    database_url = request.getfixturevalue("postgres_db") if database == "postgresql" else None
    hook = WebhookReceiver()
    extra["TRIAGE_WEBHOOK_URLS"] = json.dumps([hook.url])
    extra["TRIAGE_SECRET_KEY"] = "e2e-webhook-secret"
    site = Site(tmp_path, model, redis_url, orthanc, database_url, **extra)
    try:
        site.start_all()
        files = write_ct_series(tmp_path / "study", bleed=True, size=256, slices=16)
        study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
        sent = storescu(tmp_path / "study", "127.0.0.1", site.dicom_port, NODE_AE, calling_aet="CT01")
        assert sent.returncode == 0, sent.stdout + sent.stderr
        site.wait(lambda: (j := site.job()) is not None and j.delivered_at is not None, "job delivered")
        with site.session_factory() as session:
            result = session.scalars(select(Result)).one()
            job = session.get(Job, result.job_id)
            assert job.state == JobState.done
            started = session.scalars(select(AuditEvent).where(AuditEvent.action == "job.started")).one()
            assert started.detail["backend"] == backend
        in_pacs = _series_in_orthanc(orthanc, study_uid)
        assert in_pacs.get("SR") == 1
        assert in_pacs.get("OT", 0) == len(result.overlay_sop_uids) >= 1
        assert in_pacs.get("CT") is None  # the node sends results, not the source images
        sr = orthanc.get(f"/dicom-web/studies/{study_uid}/series/{result.sr_series_uid}/instances/"
                         f"{result.sr_sop_uid}/metadata", headers={"Accept": "application/dicom+json"}).json()
        assert sr[0]["0040A493"]["Value"] == ["UNVERIFIED"]
        for path in sorted(Path(result.output_dir).glob("*.dcm")):
            check = dciodvfy(path)
            assert check.ok, f"{path.name}: {check.errors}"
        # The worker announced the positive finding: one signed webhook, audited.
        site.wait(lambda: len(hook.requests) >= 1, "webhook for the positive result")
        (request_,) = hook.requests
        headers, body = request_["headers"], request_["body"]
        assert headers["X-Triage-Event"] == "ich.positive"
        assert verify_signature("e2e-webhook-secret", headers["X-Triage-Timestamp"], body,
                                headers["X-Triage-Signature"])
        assert json.loads(body)["study_uid"] == study_uid
    finally:
        site.stop()
        hook.close()


class WebhookReceiver:
    """A real HTTP endpoint that records POSTs (the hospital's notification service)."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        requests = self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                requests.append({"headers": dict(self.headers), "body": body})
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_orthanc_down_then_up_gets_each_object_exactly_once(
    tmp_path: Path, model: tuple[Path, Path], redis_url: str, orthanc  # type: ignore[no-untyped-def]
) -> None:
    site = Site(tmp_path, model, redis_url, orthanc)
    try:
        orthanc.stop()
        site.start_all()
        files = write_ct_series(tmp_path / "study", bleed=True, size=128, slices=12)
        study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
        assert storescu(files, "127.0.0.1", site.dicom_port, NODE_AE, calling_aet="CT01").returncode == 0

        def retried() -> bool:
            with site.session_factory() as session:
                items = session.scalars(select(OutboxItem)).all()
                return bool(items) and all(i.state == OutboxState.pending and i.attempts >= 1 for i in items)

        site.wait(retried, "outbox retrying while the PACS is down")
        assert site.job().state == JobState.done and site.job().delivered_at is None
        orthanc.start()
        site.wait(lambda: site.job().delivered_at is not None, "delivered after the PACS came back")
        with site.session_factory() as session:
            items = session.scalars(select(OutboxItem)).all()
            assert all(i.state == OutboxState.delivered for i in items)
            sent = session.scalar(select(func.count()).select_from(AuditEvent)
                                  .where(AuditEvent.action == "delivery.sent"))
            assert sent == len(items)
        time.sleep(2)  # a further beat tick must not send anything again
        with site.session_factory() as session:
            assert session.scalar(select(func.count()).select_from(AuditEvent)
                                  .where(AuditEvent.action == "delivery.sent")) == len(items)
        in_pacs = _series_in_orthanc(orthanc, study_uid)
        assert sum(in_pacs.values()) == len(items)
    finally:
        site.stop()
