"""``/readyz`` (dependencies reachable) and ``/metrics`` (Prometheus); ``/healthz``
(alive) is defined by ``create_app``.

``/readyz`` and ``/metrics`` need no token from a loopback client (the container's
own health check, a scraper on the same host); from anywhere else they need a viewer
token: readiness names the database, broker and model paths, which an anonymous caller
on the network has no need to see. ``/readyz`` says only which check failed, never a
secret. ``/healthz`` (liveness) stays open to all.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session, sessionmaker

from triage_node import QUEUES
from triage_node.config import Settings
from triage_node.db import schema
from triage_node.db.models import AuditEvent, Instance, Job, JobState, OutboxItem, OutboxState, Study
from triage_node.metrics import BuildInfo, BuildInfoCollector, expected_positive_rates, positive_rate_metrics
from triage_node.retention.policy import DiskUse, disk_use, existing_parent
from triage_node.setting_types import InferenceBackend

router = APIRouter(tags=["health"])

#: Models the worker serves (deploy/triton/models), checked by /readyz.
MODELS = ("ich_slice_cnn", "ich_sequence")


@dataclass
class Check:
    ok: bool
    detail: str


def check_database(session_factory: sessionmaker[Session]) -> Check:
    with session_factory() as session:
        session.execute(text("SELECT 1"))
        bind = session.get_bind()
        if not isinstance(bind, Engine):
            raise TypeError(f"the session factory is bound to a {type(bind).__name__}, not an Engine")
        schema.require_current(bind)
    return Check(True, "schema current")


def check_broker(settings: Settings) -> Check:
    url = settings.effective_broker_url
    if url.startswith("filesystem"):
        # The folders exist once the node or the worker has built its Celery config.
        folder = settings.broker_folder / "queue"
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            return Check(False, f"{folder} missing or not writable")
        return Check(True, "filesystem broker folder writable")
    if url.startswith(("redis://", "rediss://")):
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        try:
            client.ping()
        finally:
            client.close()
        return Check(True, "redis answers PING")
    from kombu import Connection

    with Connection(url, connect_timeout=2) as conn:
        conn.ensure_connection(max_retries=1)
    return Check(True, "broker connection opened")


def check_inference(settings: Settings) -> Check:
    if settings.inference_backend is InferenceBackend.triton:
        try:
            import tritonclient.grpc as grpcclient
        except ModuleNotFoundError:
            return Check(False, "tritonclient is not installed (the [triton] extra)")

        client = grpcclient.InferenceServerClient(settings.triton_url)
        try:
            if not client.is_server_ready(client_timeout=2):
                return Check(False, "Triton server not ready")
            missing = [m for m in MODELS if not client.is_model_ready(m, client_timeout=2)]
        finally:
            client.close()
        if missing:
            return Check(False, f"Triton models not ready: {', '.join(missing)}")
        return Check(True, "Triton server and models ready")
    repo = Path(settings.model_repository)
    missing = [m for m in MODELS if not any((repo / m).glob("[0-9]*/model.onnx"))]
    if missing:
        return Check(False, f"no model.onnx for {', '.join(missing)} under {repo}")
    if not Path(settings.model_card).is_file():
        return Check(False, f"model card {settings.model_card} missing")
    return Check(True, "ONNX model files and card present")


def check_disk(settings: Settings) -> Check:
    folder = settings.data_dir.resolve()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free_mb = shutil.disk_usage(folder).free / 2**20
    ok = free_mb >= settings.min_free_disk_mb
    return Check(ok, f"{free_mb:.0f} MB free (minimum {settings.min_free_disk_mb})")


def run_checks(settings: Settings, session_factory: sessionmaker[Session]) -> dict[str, Check]:
    checks: dict[str, Callable[[], Check]] = {
        "database": lambda: check_database(session_factory),
        "broker": lambda: check_broker(settings),
        "inference": lambda: check_inference(settings),
        "disk": lambda: check_disk(settings),
    }
    out = {}
    for name, fn in checks.items():
        try:
            out[name] = fn()
        except Exception as exc:  # noqa: BLE001 - every failure is a "not ready" answer
            out[name] = Check(False, f"{type(exc).__name__}: {str(exc)[:200]}")
    return out


def is_loopback(request: Request) -> bool:
    host = request.client.host if request.client else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _loopback_or_viewer(request: Request) -> None:
    if not is_loopback(request):
        from triage_node.api.auth import require_role

        require_role("viewer")(request)  # raises 401/403 itself


@router.get("/readyz", summary="Readiness: database, broker, inference backend, disk")
def readyz(request: Request) -> JSONResponse:
    """Open on loopback; other clients need a viewer token."""
    _loopback_or_viewer(request)
    checks = run_checks(request.app.state.settings, request.app.state.session_factory)
    ready = all(c.ok for c in checks.values())
    body = {
        "status": "ready" if ready else "not ready",
        "checks": {name: {"ok": c.ok, "detail": c.detail} for name, c in checks.items()},
    }
    return JSONResponse(body, status_code=200 if ready else 503)


# -- metrics ------------------------------------------------------------------------
class NodeCollector(Collector):
    """Reads state from the database at scrape time (queues, outbox, disk, positive
    rate), so that every process is counted, not only the one serving ``/metrics``.
    Each query is bounded by current state or by a day's results, never by history;
    latency histograms are observed at the event by the worker (`worker.metrics`)."""

    def __init__(self, session_factory: sessionmaker[Session], settings: Settings | None = None) -> None:
        self.session_factory = session_factory
        self.settings = settings
        self.expected = expected_positive_rates(settings) if settings is not None else {}

    def collect(self) -> Iterator[Any]:
        with self.session_factory() as session:
            received = session.scalar(select(func.count()).select_from(Instance)) or 0
            # Ids only grow (a PostgreSQL sequence), so retention does not make it fall.
            studies = session.scalar(select(func.max(Study.id))) or 0
            rejected = session.scalar(
                select(func.count()).select_from(AuditEvent).where(AuditEvent.action == "instance.rejected")
            ) or 0
            jobs = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
            queued = dict(
                session.execute(
                    select(Job.queue, func.count()).where(Job.state == JobState.queued.value).group_by(Job.queue)
                ).all()
            )
            outbox = dict(
                session.execute(select(OutboxItem.state, func.count()).group_by(OutboxItem.state)).all()
            )
            retries = session.scalar(
                select(func.coalesce(func.sum(OutboxItem.attempts), 0)).where(
                    OutboxItem.state != OutboxState.delivered.value
                )
            ) or 0
            retention = list(session.scalars(
                select(AuditEvent.detail).where(AuditEvent.action == "retention.deleted")
            ))
            held = session.scalar(select(func.count()).select_from(Study).where(Study.legal_hold.is_(True))) or 0
            rates = list(positive_rate_metrics(session, self.settings, expected=self.expected)) \
                if self.settings is not None else []
            disk = disk_use(self.settings, session) if self.settings is not None else None
        yield CounterMetricFamily("triage_studies_received", "Studies filed (highest study id)", value=studies)
        yield CounterMetricFamily("triage_instances_received", "DICOM objects stored", value=received)
        yield CounterMetricFamily("triage_instances_rejected", "DICOM objects refused", value=rejected)
        g = GaugeMetricFamily("triage_jobs", "Jobs by state", labels=["state"])
        for state in JobState:
            g.add_metric([state.value], jobs.get(state.value, 0))
        yield g
        g = GaugeMetricFamily("triage_queue_depth", "Jobs waiting for a worker", labels=["queue"])
        for name in QUEUES:
            g.add_metric([name], queued.get(name, 0))
        yield g
        g = GaugeMetricFamily("triage_outbox_items", "Outbox rows by state", labels=["state"])
        for outbox_state in OutboxState:
            g.add_metric([outbox_state.value], outbox.get(outbox_state.value, 0))
        yield g
        yield CounterMetricFamily(
            "triage_delivery_failures",
            "Objects given up on (dead or refused)",
            value=outbox.get(OutboxState.dead.value, 0) + outbox.get(OutboxState.refused.value, 0),
        )
        yield GaugeMetricFamily(
            "triage_delivery_failed_attempts", "Failed tries of objects not yet delivered", value=retries
        )
        yield from _retention_metrics(retention, held)
        yield from rates
        if disk is not None and self.settings is not None:
            yield from _disk_metrics(self.settings, disk)


def _disk_metrics(settings: Settings, disk: DiskUse) -> Iterator[Any]:
    yield GaugeMetricFamily(
        "triage_disk_used_percent", f"Use of the spool's {disk.basis} (what retention compares)",
        value=disk.percent,
    )
    yield GaugeMetricFamily(
        "triage_disk_high_watermark_percent", "retention_disk_high_percent",
        value=settings.retention_disk_high_percent,
    )
    yield GaugeMetricFamily(
        "triage_disk_free_bytes", "Free bytes on the spool's file system",
        value=shutil.disk_usage(existing_parent(settings.spool_dir)).free,
    )
    yield GaugeMetricFamily(
        "triage_disk_min_free_bytes", "min_free_disk_mb: below it the listener refuses objects",
        value=settings.min_free_disk_mb * 2**20,
    )


def _retention_metrics(details: list[dict[str, Any]], held: int) -> Iterator[Any]:
    """Counted from the ``retention.deleted`` audit rows (one per batch), so deletions by
    the worker's cleaner and by ``triage-node retention run`` are both seen here."""
    studies = instances = 0
    size: dict[str, int] = {"studies": 0, "results": 0}
    rows: dict[str, int] = {}
    for d in details:
        kind = d.get("kind")
        if kind == "studies":
            studies += int(d.get("studies", 0))
            instances += int(d.get("instances", 0))
        if kind in size:
            size[kind] += int(d.get("bytes", 0))
        for table, n in (d.get("rows") or {}).items():
            rows[table] = rows.get(table, 0) + int(n)
    yield CounterMetricFamily("triage_retention_deleted_studies", "Studies deleted by retention", value=studies)
    yield CounterMetricFamily(
        "triage_retention_deleted_instances", "Received instances deleted by retention", value=instances
    )
    c = CounterMetricFamily("triage_retention_deleted_bytes", "Bytes deleted by retention", labels=["kind"])
    c.add_metric(["images"], size["studies"])
    c.add_metric(["results"], size["results"])
    yield c
    c = CounterMetricFamily("triage_retention_deleted_rows", "Rows deleted by retention", labels=["table"])
    for table in sorted(rows):
        c.add_metric([table], rows[table])
    yield c
    yield CounterMetricFamily("triage_retention_batches", "Audited retention batches", value=len(details))
    yield GaugeMetricFamily("triage_studies_on_legal_hold", "Studies retention never deletes", value=held)


def metrics_registry(
    session_factory: sessionmaker[Session], settings: Settings | None = None
) -> CollectorRegistry:
    """A registry of its own per app (tests build many apps in one process). Without
    settings: the database state only (no build, disk or expected-rate metrics)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(session_factory, settings))
    if settings is not None:
        registry.register(BuildInfoCollector(BuildInfo.from_settings(settings)))
    return registry


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics(request: Request) -> Response:
    """Open on loopback; other clients need a viewer token."""
    _loopback_or_viewer(request)
    registry = getattr(request.app.state, "metrics_registry", None)
    if registry is None:
        registry = request.app.state.metrics_registry = metrics_registry(
            request.app.state.session_factory, request.app.state.settings
        )
    started = time.perf_counter()
    body = generate_latest(registry)
    return Response(
        body,
        media_type=CONTENT_TYPE_LATEST,
        headers={"X-Scrape-Seconds": f"{time.perf_counter() - started:.3f}"},
    )

