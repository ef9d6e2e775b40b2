"""Priority classes, weighted scores, ageing and manual priorities, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from tests.worklist_factory import add_result, add_study, database  # noqa: F401 (fixture)
from triage_node.config import load_settings
from triage_node.db.models import AuditEvent, JobState, WorklistStatus
from triage_node.db.session import transaction
from triage_node.worklist.priority import compute_priority, set_manual_priority, set_status
from triage_node.worklist.priority_rules import PriorityError, PriorityInputs, automatic_priority, weighted_score
from triage_node.worklist.queries import WorklistFilter, list_worklist

NOW = datetime.now(UTC)


def ordered_uids(db, settings, **filters) -> list[str]:
    with db.factory() as session:
        rows, _ = list_worklist(session, settings, WorklistFilter(**filters), now=NOW)
        return [row.study.study_uid for row in rows]


def test_weighted_score_puts_epidural_above_isolated_subarachnoid():
    settings = load_settings()
    assert weighted_score({"epidural": 0.6}, settings.subtype_weights) > weighted_score(
        {"subarachnoid": 0.6}, settings.subtype_weights
    )
    with pytest.raises(PriorityError):
        weighted_score({"bleed": 0.5}, settings.subtype_weights)
    with pytest.raises(PriorityError):
        weighted_score({"any": 1.5}, settings.subtype_weights)


def test_automatic_class_from_result_order_and_calling_ae():
    settings = load_settings(stat_calling_aes=["CT_TRAUMA"])
    assert automatic_priority(PriorityInputs(True, {"any": 0.9}), settings)[0].value == "STAT-AI"
    assert automatic_priority(PriorityInputs(False, {}, "STAT"), settings)[0].value == "STAT-order"
    assert (
        automatic_priority(PriorityInputs(None, {}, None, "CT_TRAUMA"), settings)[0].value
        == "STAT-order"
    )
    assert automatic_priority(PriorityInputs(False, {"any": 0.2}, "ROUTINE"), settings)[0].value == "routine"


def test_positive_above_stat_order_above_routine_in_sql_order(database):
    settings = load_settings(ageing_per_hour=0.0)
    with transaction(database.factory) as session:
        negative = add_study(session, received_at=NOW - timedelta(hours=3))
        add_result(session, negative, {"any": 0.1})
        stat_order = add_study(session, received_at=NOW - timedelta(hours=2), requested_priority="STAT")
        positive = add_study(session, received_at=NOW - timedelta(minutes=1))
        add_result(session, positive, {"any": 0.93, "subdural": 0.9})
        pending = add_study(session, received_at=NOW - timedelta(hours=5))
        for study in (negative, stat_order, positive, pending):
            compute_priority(session, study, settings, reason="test")
    assert ordered_uids(database, settings) == [
        positive.study_uid,
        stat_order.study_uid,
        negative.study_uid,  # score 0.1 beats the pending study's 0
        pending.study_uid,
    ]


def test_subtype_weights_order_two_positive_studies(database):
    settings = load_settings(ageing_per_hour=0.0)
    with transaction(database.factory) as session:
        sah = add_study(session, received_at=NOW - timedelta(minutes=30))
        add_result(session, sah, {"any": 0.7, "subarachnoid": 0.7})
        edh = add_study(session, received_at=NOW - timedelta(minutes=5))
        add_result(session, edh, {"any": 0.7, "epidural": 0.65})
        for study in (sah, edh):
            compute_priority(session, study, settings)
    assert ordered_uids(database, settings) == [edh.study_uid, sah.study_uid]
    # With equal weights the higher plain probability wins instead.
    flat = load_settings(ageing_per_hour=0.0, subtype_weights={})
    with transaction(database.factory) as session:
        for study in (sah, edh):
            compute_priority(session, study.study_uid, flat, reason="weights changed")
    # Equal scores: the study that has waited longer comes first.
    assert ordered_uids(database, flat) == [sah.study_uid, edh.study_uid]
    with database.factory() as session:
        rows, _ = list_worklist(session, flat, WorklistFilter(), now=NOW)
        assert [round(r.entry.score, 3) for r in rows] == [0.7, 0.7]


def test_ageing_lets_an_old_routine_study_pass_a_newer_one(database):
    with transaction(database.factory) as session:
        old = add_study(session, received_at=NOW - timedelta(hours=10))
        add_result(session, old, {"any": 0.05})
        new = add_study(session, received_at=NOW - timedelta(minutes=2))
        add_result(session, new, {"any": 0.3})
        for study in (old, new):
            compute_priority(session, study, load_settings())
    assert ordered_uids(database, load_settings(ageing_per_hour=0.0)) == [new.study_uid, old.study_uid]
    # 0.05 + 10 h x 0.05/h = 0.55 > 0.3 + ~0
    assert ordered_uids(database, load_settings(ageing_per_hour=0.05)) == [old.study_uid, new.study_uid]
    # Ageing never lifts a routine study over a STAT class.
    with transaction(database.factory) as session:
        stat = add_study(session, received_at=NOW, requested_priority="STAT")
        compute_priority(session, stat, load_settings())
    assert ordered_uids(database, load_settings(ageing_per_hour=1.0))[0] == stat.study_uid


def test_manual_priority_is_never_lowered_by_the_node(database):
    settings = load_settings()
    with transaction(database.factory) as session:
        study = add_study(session)
        entry = compute_priority(session, study, settings, reason="study received")
        assert entry.priority_class == "routine"
        set_manual_priority(session, entry, "STAT-order", actor="token:dr-a", reason="phone call")
        assert entry.priority_class == "STAT-order"
        add_result(session, study, {"any": 0.02})
        entry = compute_priority(session, study, settings, reason="result")
        assert entry.priority_class == "STAT-order"  # a negative result does not lower it
        add_result(session, study, {"any": 0.95, "epidural": 0.9})
        entry = compute_priority(session, study, settings, reason="result")
        assert entry.priority_class == "STAT-AI"  # a later positive result raises it


def test_person_may_lower_and_only_a_later_result_raises_again(database):
    settings = load_settings()
    with transaction(database.factory) as session:
        study = add_study(session)
        add_result(session, study, {"any": 0.8, "subarachnoid": 0.8}, created_at=NOW - timedelta(minutes=5))
        entry = compute_priority(session, study, settings)
        assert entry.priority_class == "STAT-AI"
        set_manual_priority(session, entry, "routine", actor="token:dr-b", reason="read: artefact")
        assert entry.priority_class == "routine"
        entry = compute_priority(session, study, settings, reason="recompute")
        assert entry.priority_class == "routine"  # the old result does not undo the person
        add_result(session, study, {"any": 0.9, "subdural": 0.9}, created_at=datetime.now(UTC) + timedelta(seconds=1))
        entry = compute_priority(session, study, settings, reason="result")
        assert entry.priority_class == "STAT-AI"


def test_superseded_results_do_not_count(database):
    settings = load_settings()
    with transaction(database.factory) as session:
        study = add_study(session)
        add_result(session, study, {"any": 0.9}, state=JobState.superseded.value)
        add_result(session, study, {"any": 0.1})
        entry = compute_priority(session, study, settings)
        assert entry.priority_class == "routine"
        assert entry.score == pytest.approx(0.1)


def test_every_change_is_audited_with_who_and_why(database):
    settings = load_settings()
    with transaction(database.factory) as session:
        study = add_study(session)
        entry = compute_priority(session, study, settings, actor="node", reason="study received")
        add_result(session, study, {"any": 0.9, "intraparenchymal": 0.9})
        compute_priority(session, study, settings, actor="worker", reason="result", job_id=7)
        compute_priority(session, study, settings, actor="worker", reason="same result again")
        set_manual_priority(session, entry, "STAT-order", actor="token:dr-c", reason="clinician asked")
        set_status(session, entry, WorklistStatus.reading, actor="token:dr-c")
        with pytest.raises(PriorityError):
            set_status(session, entry, "archived", actor="token:dr-c")
        uid = study.study_uid
    with database.factory() as session:
        events = session.scalars(
            select(AuditEvent).where(AuditEvent.study_uid == uid).order_by(AuditEvent.id)
        ).all()
    summary = [(e.action, e.actor, e.detail.get("reason")) for e in events]
    assert summary == [
        ("worklist.priority", "node", "study received"),
        ("worklist.priority", "worker", "result"),  # the repeat changed nothing: no row
        ("worklist.manual_priority", "token:dr-c", "clinician asked"),
        ("worklist.priority", "token:dr-c", "manual: clinician asked"),  # STAT-AI -> STAT-order
        ("worklist.status", "token:dr-c", ""),
    ]
    assert events[1].detail["old_class"] == "routine"
    assert events[1].detail["new_class"] == "STAT-AI"
    assert events[1].job_id == 7


def test_filters_and_pagination(database):
    settings = load_settings(ageing_per_hour=0.0)
    with transaction(database.factory) as session:
        studies = []
        for i in range(5):
            s = add_study(session, received_at=NOW - timedelta(hours=i), modality="CT" if i < 4 else "MR")
            add_result(session, s, {"any": 0.1 * (i + 1)})
            studies.append(s)
        entries = [compute_priority(session, s, settings) for s in studies]
        set_status(session, entries[0], "done", actor="token:x")
    with database.factory() as session:
        rows, total = list_worklist(session, settings, WorklistFilter(modality="CT", limit=2), now=NOW)
        assert total == 4 and len(rows) == 2
        assert [r.study.study_uid for r in rows] == [studies[3].study_uid, studies[2].study_uid]
        rows, total = list_worklist(
            session, settings, WorklistFilter(status=("new",), modality="CT", offset=2), now=NOW
        )
        assert total == 3 and [r.study.study_uid for r in rows] == [studies[1].study_uid]
        rows, total = list_worklist(
            session, settings, WorklistFilter(since=NOW - timedelta(hours=1, minutes=30)), now=NOW
        )
        assert total == 2
        assert rows[0].result is not None and rows[0].waiting_seconds >= 3600 - 1
