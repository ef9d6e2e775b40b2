"""Pieces of ``/metrics`` shared by the node and the worker: what build and model run
(``triage_build_info``), the positive rate per class against the model card's expected
rate, and the histogram buckets.

The node's ``/metrics`` (`triage_node.api.health`) reads state from the database (queue
depth, outbox, disk); the worker's (`worker.metrics`) exposes histograms and counters
observed at the event. Prometheus scrapes both (deploy/prometheus/prometheus.yml).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import select
from sqlalchemy.orm import Session

from triage_node import __version__
from triage_node.config import Settings
from triage_node.db.models import Job, JobState, Result
from triage_node.timeutil import utcnow

#: Stage latencies inside the node, in seconds.
STAGE_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)
#: Last image received to result at the PACS: the completeness wait alone is tens of seconds.
AT_PACS_BUCKETS = (10.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0, 1200.0, 3600.0)
#: Window of the positive rate (one day, so a working day and a night shift both count).
RATE_WINDOW = timedelta(hours=24)


def read_card(path: Path) -> dict[str, Any]:
    """The model card as plain JSON, or ``{}`` when it is missing or unreadable.

    Metrics must not fail because of the card: the worker validates it at start
    (`worker.inference.card`), the node only labels its metrics with it.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@dataclass(frozen=True)
class BuildInfo:
    """Labels of ``triage_build_info``: the node's version and the model it serves."""

    version: str
    model_name: str
    model_version: str
    device_uid: str
    operating_point: str

    @classmethod
    def from_settings(cls, settings: Settings, card: dict[str, Any] | None = None) -> BuildInfo:
        card = read_card(settings.model_card) if card is None else card
        return cls(
            version=__version__,
            model_name=str(card.get("name", "")),
            model_version=str(card.get("version", "")),
            device_uid=str(card.get("device_uid", "")),
            operating_point=settings.operating_point.value,
        )


class BuildInfoCollector(Collector):
    def __init__(self, info: BuildInfo) -> None:
        self.info = info

    def collect(self) -> Iterator[Any]:
        yield InfoMetricFamily(
            "triage_build", "Node version and served model (Device UID as in the SR)",
            value=dict(vars(self.info)),
        )


def _per_class(value: Any, operating_point: str) -> dict[str, float]:
    """``{class: rate}``, or ``{operating_point: {class: rate}}`` narrowed to one point."""
    if not isinstance(value, dict):
        return {}
    if isinstance(value.get(operating_point), dict):
        value = value[operating_point]
    return {str(k): float(v) for k, v in value.items() if isinstance(v, int | float) and 0 < v < 1}


def expected_positive_rates(settings: Settings, card: dict[str, Any] | None = None) -> dict[str, float]:
    """Expected share of positive studies per class: ``settings.expected_positive_rate``
    first, then the card's optional ``expected_positive_rate`` (top level or under
    ``metrics``), per class or per operating point."""
    card = read_card(settings.model_card) if card is None else card
    point = settings.operating_point.value
    rates = _per_class(card.get("metrics", {}).get("expected_positive_rate"), point) \
        if isinstance(card.get("metrics"), dict) else {}
    rates.update(_per_class(card.get("expected_positive_rate"), point))
    rates.update(settings.expected_positive_rate)
    return rates


def expected_rates_from_cv(report: dict[str, Any], operating_point: str) -> dict[str, float]:
    """Positive share per class measured on cross-validation's out-of-fold predictions:
    ``(TP + FP) / N`` at ``operating_point`` (``operating_points_out_of_fold`` of
    docs/model/cv_report.json). What the card's ``expected_positive_rate`` should hold."""
    counts = report["operating_points_out_of_fold"][operating_point]
    out = {}
    for name, c in counts.items():
        n = c["tp"] + c["fp"] + c["tn"] + c["fn"]
        if n:
            out[name] = round((c["tp"] + c["fp"]) / n, 4)
    return out


def positive_rate_metrics(
    session: Session, settings: Settings, now: datetime | None = None,
    expected: dict[str, float] | None = None,
) -> Iterator[Any]:
    """Share of positive results per class over the last day, and the expected band.

    One query over the results written in the window (bounded by the day's volume, not
    by the table). Results of superseded jobs are left out, so a study counts once.
    """
    now = now or utcnow()
    rows = session.scalars(
        select(Result.decisions).join(Job, Job.id == Result.job_id)
        .where(Result.created_at >= now - RATE_WINDOW, Job.state == JobState.done.value)
    ).all()
    positives: dict[str, int] = {}
    for decisions in rows:
        for name, flag in (decisions or {}).items():
            positives[name] = positives.get(name, 0) + bool(flag)
    yield GaugeMetricFamily("triage_results_last_24h", "Results written in the last 24 h", value=len(rows))
    g = GaugeMetricFamily("triage_positive_rate", "Share of positive results per class, last 24 h",
                          labels=["class"])
    if rows:
        for name in sorted(positives):
            g.add_metric([name], positives[name] / len(rows))
    yield g
    expected = expected_positive_rates(settings) if expected is None else expected
    band = settings.positive_rate_band
    families = (
        ("triage_positive_rate_expected", "Expected positive share per class (model card or setting)", 1.0),
        ("triage_positive_rate_low", "Lower edge of the positive rate band", 1.0 / band),
        ("triage_positive_rate_high", "Upper edge of the positive rate band", band),
    )
    for name, doc, factor in families:
        g = GaugeMetricFamily(name, doc, labels=["class"])
        for cls in sorted(expected):
            g.add_metric([cls], min(1.0, expected[cls] * factor))
        yield g
