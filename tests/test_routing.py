"""Modality auto-routing: rules, decisions in the outbox and audit, delivery to a real peer."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from tests.test_servers import make_ct_series
from tests.worklist_factory import sqlite_database  # noqa: F401 (fixture)
from triage_node.config import REPO_ROOT, load_settings
from triage_node.db.models import AuditEvent, Instance, OutboxItem
from triage_node.db.session import transaction
from triage_node.ingest.store import InstanceStore
from triage_node.routing import Router, route_instance
from triage_node.routing.rules import (
    Attributes,
    RoutingRulesError,
    check_destinations,
    evaluate,
    load_rules,
    parse_rules,
)

EXAMPLE = REPO_ROOT / "deploy" / "routing.example.yaml"


def dimse(name: str, port: int, ae: str = "STORESCP") -> dict:
    return {"name": name, "kind": "dimse", "ae_title": ae, "host": "127.0.0.1", "port": port}


def test_example_file_routes_ed_ct_to_archive_and_head_ct_also_to_triage():
    rules = load_rules(EXAMPLE)
    head = Attributes(modality="CT", body_part="HEAD", calling_ae="CT_ED_1",
                      series_description="Head 5mm", study_description="CT HEAD WO")
    assert evaluate(rules, head)[1] == ["archive", "triage"]
    chest = Attributes(modality="CT", body_part="CHEST", calling_ae="CT_ED_1",
                       series_description="Chest 1mm", study_description="CT CHEST")
    assert evaluate(rules, chest)[1] == ["archive"]
    other_ae = Attributes(modality="CT", body_part="HEAD", calling_ae="CT_WARD_3",
                          series_description="Brain", study_description=None)
    assert evaluate(rules, other_ae)[1] == ["triage"]
    mr = Attributes(modality="MR", body_part="HEAD", calling_ae="MR_1", series_description="T2")
    assert evaluate(rules, mr) == ([], [])


def test_matching_is_case_insensitive_lists_regex_header_and_stop():
    rules = parse_rules(
        """
        - name: first
          match: {modality: [ct, mr], series_description: "(?i)brain", attributes: {ConvolutionKernel: "^H"}}
          destinations: [a]
          stop: true
        - name: second
          match: {}
          destinations: [b]
        """
    )
    header = pydicom.Dataset()
    header.ConvolutionKernel = "H30s"
    attrs = Attributes(modality="CT", series_description="BRAIN std", header=header)
    assert evaluate(rules, attrs) == (["first"], ["a"])
    header.ConvolutionKernel = "B70"
    assert evaluate(rules, attrs) == (["second"], ["b"])
    assert evaluate(rules, Attributes(modality="CT", series_description="brain")) == (["second"], ["b"])
    assert check_destinations(rules, {"a"}) == ["b"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("rules: [{name: x, destinations: []}]", "destinations"),
        ("rules: [{name: x, match: {modalty: CT}, destinations: [a]}]", "modalty"),
        ("rules: [{name: x, match: {series_description: '('}, destinations: [a]}]", "regular expression"),
        ("rules: [{name: x, match: {attributes: {NotAKeyword: x}}, destinations: [a]}]", "keyword"),
        ("rules: [", "YAML"),
    ],
)
def test_bad_rules_are_refused_with_the_reason(text, message):
    with pytest.raises(RoutingRulesError, match=message):
        parse_rules(text)


def _store_series(store: InstanceStore, folder: Path, calling_ae: str, n: int = 3) -> list[Path]:
    paths = make_ct_series(folder, n=n, size=32)
    for path in paths:
        outcome = store.store(path.read_bytes(), calling_ae=calling_ae, peer="127.0.0.1", source="dimse")
        assert outcome.stored
    return paths


def test_router_queues_each_stored_instance_once_and_audits_the_decision(sqlite_database, tmp_path):
    settings = load_settings(
        data_dir=tmp_path / "data",
        routing_rules=EXAMPLE,
        destinations=[dimse("archive", 1), dimse("triage", 2)],
    )
    router = Router(settings, sqlite_database.factory)
    store = InstanceStore(settings, sqlite_database.factory, on_stored=router.instance_stored)
    _store_series(store, tmp_path / "ed", "CT_ED_1", n=3)  # HEAD, "CT HEAD WO CONTRAST"
    _store_series(store, tmp_path / "mr", "MR_1", n=2)  # same phantom, other AE: triage only
    with sqlite_database.factory() as session:
        items = session.scalars(select(OutboxItem).order_by(OutboxItem.id)).all()
        decisions = session.scalars(
            select(AuditEvent).where(AuditEvent.action == "routing.decision").order_by(AuditEvent.id)
        ).all()
        paths = {i.path for i in session.scalars(select(Instance))}
    assert sorted((i.destination, i.reason) for i in items).count(("archive", "routing")) == 3
    assert sum(i.destination == "triage" for i in items) == 5
    assert {i.path for i in items} == paths
    assert [d.detail["destinations"] for d in decisions] == [["archive", "triage"], ["triage"]]
    assert decisions[0].detail["rules"] == ["ed-ct-to-archive", "head-ct-to-triage"]
    # A repeat call (e.g. a late instance notification) queues nothing twice.
    assert router.instance_stored(decisions[0].series_uid) == 0


def test_unknown_destination_is_audited_as_failed_and_not_queued(sqlite_database, tmp_path):
    settings = load_settings(data_dir=tmp_path / "data", routing_rules=EXAMPLE,
                             destinations=[dimse("archive", 1)])
    store = InstanceStore(settings, sqlite_database.factory)
    _store_series(store, tmp_path / "ed", "CT_ED_1", n=1)
    with transaction(sqlite_database.factory) as session:
        instance = session.scalars(select(Instance)).one()
        items = route_instance(session, settings, instance)
        assert [i.destination for i in items] == ["archive"]
        assert route_instance(session, settings, instance) == []  # already queued
    with sqlite_database.factory() as session:
        event = session.scalars(select(AuditEvent).where(AuditEvent.action == "routing.decision")).first()
    assert event.outcome == "failed" and event.detail["unknown_destinations"] == ["triage"]
    assert event.sop_uid == instance.sop_uid


def test_routed_series_arrives_at_a_real_storescp(sqlite_database, tmp_path, storescp):
    from worker.pipeline.delivery import deliver_due

    archive = storescp(aet="ARCHIVE")
    settings = load_settings(
        data_dir=tmp_path / "data",
        routing_rules=EXAMPLE,
        destinations=[dimse("archive", archive.port, "ARCHIVE"), dimse("triage", 9, "NOPE")],
    )
    router = Router(settings, sqlite_database.factory)
    store = InstanceStore(settings, sqlite_database.factory, on_stored=router.instance_stored)
    sent = _store_series(store, tmp_path / "ed", "CT_ED_1", n=4)
    # Deliver what is due for the archive (the "triage" peer does not exist here).
    received = {pydicom.dcmread(p).SOPInstanceUID for p in sent}
    report = deliver_due(sqlite_database.factory, [d for d in settings.destinations if d.name == "archive"],
                         datetime.now(UTC) + timedelta(seconds=1))
    assert report is not None
    got = {pydicom.dcmread(p).SOPInstanceUID for p in archive.files()}
    assert got == received
    for path in archive.files():
        assert pydicom.dcmread(path).StudyDescription == "CT HEAD WO CONTRAST"
    with sqlite_database.factory() as session:
        states = {(i.destination, i.state) for i in session.scalars(select(OutboxItem))}
    assert states == {("archive", "delivered"), ("triage", "pending")}


def test_with_routing_keeps_the_tracker_callback_and_adds_the_router(sqlite_database, tmp_path):
    from triage_node.routing import with_routing

    seen: list[str] = []

    def tracker(series_uid: str) -> None:
        seen.append(series_uid)
        raise RuntimeError("tracker trouble must not stop routing")

    plain = load_settings(data_dir=tmp_path / "data")
    assert with_routing(plain, sqlite_database.factory, tracker) is tracker
    settings = load_settings(data_dir=tmp_path / "data", routing_rules=EXAMPLE,
                             destinations=[dimse("archive", 1), dimse("triage", 2)])
    store = InstanceStore(settings, sqlite_database.factory,
                          on_stored=with_routing(settings, sqlite_database.factory, tracker))
    _store_series(store, tmp_path / "ed", "CT_ED_1", n=2)
    assert len(seen) == 2
    with sqlite_database.factory() as session:
        assert len(session.scalars(select(OutboxItem)).all()) == 4
