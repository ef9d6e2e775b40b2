"""Modality auto-routing: forward received objects to destinations through the outbox.

Routing runs beside AI triage: a routed object gets an ``OutboxItem`` (reason
``routing``) for each destination its rules name, and the outbox delivery (the same
C-STORE / STOW-RS sender and retries as for results) takes it from there. Every
decision is audited (``routing.decision``).

Two entry points:

`route_instance(session, settings, instance_row, header=None)`
    decide for one stored instance, inside the caller's transaction;
`Router(settings, session_factory).instance_stored(series_uid)`
    an ``on_stored`` callback for `InstanceStore`: decides once per series (audited
    once), then queues each new instance of the series in its own short transaction.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from triage_node.config import Settings
from triage_node.db import audit
from triage_node.db.models import Instance, OutboxItem, Series, Study
from triage_node.db.session import transaction
from triage_node.logs import get_logger
from triage_node.outbox import enqueue_outbox
from triage_node.routing.rules import Attributes, RoutingRulesError, RuleSet, evaluate, load_rules

log = get_logger(__name__)

ROUTING_REASON = "routing"


def configured_destinations(settings: Settings) -> set[str]:
    """Names of ``settings.destinations`` (empty when that setting does not exist)."""
    return {str(getattr(d, "name", d)) for d in getattr(settings, "destinations", None) or []}


def rules_for(settings: Settings) -> RuleSet | None:
    """The routing rules named in settings, or None when routing is off."""
    if settings.routing_rules is None:
        return None
    return load_rules(settings.routing_rules)


def attributes_for(series: Series, study: Study, calling_ae: str | None, header: Any = None) -> Attributes:
    """Rule inputs from the rows the store wrote (and the header when the caller has it)."""

    def pick(row_value: str | None, keyword: str) -> str | None:
        if row_value:
            return row_value
        if header is not None and keyword in header:
            return str(header.get(keyword) or "") or None
        return None

    return Attributes(
        modality=pick(series.modality, "Modality"),
        body_part=pick(series.body_part, "BodyPartExamined"),
        calling_ae=calling_ae or study.calling_ae,
        series_description=pick(series.description, "SeriesDescription"),
        study_description=pick(study.study_description, "StudyDescription"),
        header=header,
    )


def _queue(
    session: Session, instance: Instance, study_uid: str, destinations: Iterable[str]
) -> list[OutboxItem]:
    """Outbox rows for ``instance`` at each destination that does not have it yet."""
    return enqueue_outbox(session, None, study_uid, [(instance.sop_uid, instance.path)], list(destinations),
                          reason=ROUTING_REASON)


def _decide(settings: Settings, rules: RuleSet, attrs: Attributes) -> tuple[list[str], list[str], list[str]]:
    matched, destinations = evaluate(rules, attrs)
    known = configured_destinations(settings)
    unknown = [d for d in destinations if d not in known]
    return matched, [d for d in destinations if d in known], unknown


def route_instance(
    session: Session, settings: Settings, instance_row: Instance, header: Any = None
) -> list[OutboxItem]:
    """Decide where one stored instance also goes, and queue it; audited.

    Parameters
    ----------
    session : Session
        The caller's transaction (the caller commits).
    settings : Settings
        ``routing_rules`` and ``destinations``.
    instance_row : Instance
        The stored instance (its series and study rows are read through it).
    header : pydicom.Dataset, optional
        The header as received, for ``attributes`` conditions and missing columns.

    Returns
    -------
    list of OutboxItem
        New outbox rows (none when no rule matched or it was queued before).
    """
    rules = rules_for(settings)
    if rules is None:
        return []
    series = session.get(Series, instance_row.series_id)
    assert series is not None
    study = session.get(Study, series.study_id)
    assert study is not None
    attrs = attributes_for(series, study, instance_row.calling_ae, header)
    matched, destinations, unknown = _decide(settings, rules, attrs)
    items = _queue(session, instance_row, study.study_uid, destinations) if destinations else []
    audit.record(
        session,
        "routing.decision",
        actor="node",
        outcome="ok" if not unknown else "failed",
        study_uid=study.study_uid,
        series_uid=series.series_uid,
        sop_uid=instance_row.sop_uid,
        rules=matched,
        destinations=destinations,
        unknown_destinations=unknown,
        queued=len(items),
    )
    return items


class Router:
    """``on_stored`` callback: route each stored instance by its series' decision.

    The decision is taken (and audited) once per series and kept in memory; each call
    queues the series' instances that are not yet in the outbox for those destinations.
    """

    def __init__(self, settings: Settings, session_factory: sessionmaker[Session]) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self._decisions: dict[str, tuple[list[str], list[str]]] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.settings.routing_rules is not None

    def instance_stored(self, series_uid: str) -> int:
        """Queue the new instances of ``series_uid``; returns how many outbox rows were added."""
        if not self.enabled:
            return 0
        try:
            rules = rules_for(self.settings)
        except RoutingRulesError as exc:
            log.error("routing rules unreadable", error=str(exc))
            return 0
        assert rules is not None
        with self._lock, transaction(self.session_factory) as session:
            series = session.scalars(select(Series).where(Series.series_uid == series_uid)).one_or_none()
            if series is None:
                return 0
            study = session.get(Study, series.study_id)
            assert study is not None
            decision = self._decisions.get(series_uid)
            if decision is None:
                first = session.scalars(
                    select(Instance).where(Instance.series_id == series.id).order_by(Instance.id).limit(1)
                ).first()
                attrs = attributes_for(series, study, first.calling_ae if first else None)
                matched, destinations, unknown = _decide(self.settings, rules, attrs)
                audit.record(
                    session,
                    "routing.decision",
                    actor="node",
                    outcome="ok" if not unknown else "failed",
                    study_uid=study.study_uid,
                    series_uid=series_uid,
                    rules=matched,
                    destinations=destinations,
                    unknown_destinations=unknown,
                )
                log.info("routing.decision", series_uid=series_uid, rules=matched,
                         destinations=destinations, unknown=unknown)
                decision = (matched, destinations)
                if len(self._decisions) > 10_000:
                    self._decisions.clear()
                self._decisions[series_uid] = decision
            _, destinations = decision
            if not destinations:
                return 0
            queued = select(OutboxItem.sop_uid).where(
                OutboxItem.study_uid == study.study_uid,
                OutboxItem.reason == ROUTING_REASON,
                OutboxItem.destination.in_(destinations),
            )
            pending = session.scalars(
                select(Instance).where(Instance.series_id == series.id, Instance.sop_uid.not_in(queued))
            ).all()
            added = 0
            for instance in pending:
                added += len(_queue(session, instance, study.study_uid, destinations))
            return added


def with_routing(
    settings: Settings,
    session_factory: sessionmaker[Session],
    on_stored: Callable[[str], object] | None,
) -> Callable[[str], object] | None:
    """``on_stored`` for `InstanceStore` that also routes, when routing rules are set.

    The given callback (the completeness tracker) runs first; a failure in it is
    logged and does not stop routing.
    """
    router = Router(settings, session_factory)
    if not router.enabled:
        return on_stored

    def both(series_uid: str) -> None:
        if on_stored is not None:
            try:
                on_stored(series_uid)
            except Exception:  # noqa: BLE001 - the store logs its callback's failures the same way
                log.exception("on_stored callback failed", series_uid=series_uid)
        router.instance_stored(series_uid)

    return both


__all__ = ["ROUTING_REASON", "Router", "with_routing", "configured_destinations", "route_instance", "rules_for"]
