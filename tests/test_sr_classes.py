"""The result report in each SR class, and destinations that accept only one class.

Every class passes ``dciodvfy`` as a standard (not Standard Extended) object and carries
the same findings; a job whose destinations ask for different classes delivers to each
the class it asked for, to archives (DCMTK ``storescp`` with a restricted SOP-class list,
and Orthanc) that refuse the others.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import SecondaryCaptureImageStorage
from sqlalchemy import select

from tests.test_sr import Card, _concepts, make_ct_series, make_prediction, make_report
from tests.worker_support import build_small_repository, ingest_files, write_ct_series
from triage_node.config import load_settings
from triage_node.db import schema
from triage_node.db.models import OutboxItem, OutboxState
from triage_node.peers import StoreSCP, dciodvfy
from triage_node.setting_types import SRClass
from worker.pipeline.context import build_context
from worker.pipeline.delivery import deliver_due
from worker.pipeline.run import run_job
from worker.pipeline.sr import build_sr
from worker.pipeline.sr_classes import SR_CLASS_UIDS
from worker.pipeline.sr_codes import summary

#: The one dciodvfy warning left: the local code of epidural hemorrhage (worker.pipeline.sr_codes).
KNOWN_WARNING = "Unrecognized defined term <99ICHTRIAGE>"


@pytest.mark.parametrize("sr_class", list(SRClass))
def test_each_class_is_a_standard_object_with_the_same_findings(tmp_path: Path, sr_class: SRClass) -> None:
    series = make_ct_series()
    prediction = make_prediction(len(series))
    primary, overlays, keys = make_report(series, prediction)
    sr = build_sr(series, prediction, Card(), overlays, keys, sr_class=sr_class)
    path = tmp_path / "sr.dcm"
    sr.save_as(path)
    check = dciodvfy(path)
    assert check.ok, check.output
    assert not [w for w in check.warnings if KNOWN_WARNING not in w], check.output
    read = pydicom.dcmread(path)
    assert read.SOPClassUID == SR_CLASS_UIDS[sr_class] == read.file_meta.MediaStorageSOPClassUID
    assert read.DeviceUID == Card.device_uid  # General Equipment, not an extension
    expected = summary(primary)
    got = summary(read)
    assert set(got) == set(expected)
    for name, finding in expected.items():
        assert got[name]["present"] is finding["present"], name
        assert got[name]["probability"] == pytest.approx(finding["probability"], rel=1e-5), name
    value_types = {vt for vt, _, _ in _concepts(read)}
    if sr_class is SRClass.basic_text:
        assert "NUM" not in value_types
    else:
        assert "NUM" in value_types


def test_basic_text_sr_refuses_a_document_it_cannot_hold() -> None:
    from worker.pipeline.sr_classes import to_basic_text

    series = make_ct_series()
    sr, _, _ = make_report(series, make_prediction(len(series)))
    with pytest.raises(ValueError, match="expected a Comprehensive SR"):
        to_basic_text(sr)  # a 3D SR could hold SCOORD3D, which Basic Text SR cannot


@pytest.fixture
def archives(tmp_path: Path) -> Iterator[dict[SRClass, StoreSCP]]:
    """One archive per SR class that stores only that class (the enhanced one also takes SC)."""
    scps = {
        sr_class: StoreSCP(
            tmp_path / str(sr_class), aet=f"ONLY_{sr_class.name.upper()}"[:16],
            sop_classes=[SR_CLASS_UIDS[sr_class],
                         *([SecondaryCaptureImageStorage] if sr_class is SRClass.enhanced else [])],
        )
        for sr_class in SRClass
    }
    try:
        yield {name: scp.start() for name, scp in scps.items()}
    finally:
        for scp in scps.values():
            scp.stop()


def _dimse(name: str, scp, **kw) -> dict:
    return {"name": name, "kind": "dimse", "ae_title": scp.aet, "host": "127.0.0.1", "port": scp.port,
            "timeout_s": 10, **kw}


def test_each_destination_gets_the_class_it_accepts(tmp_path: Path, archives, orthanc) -> None:
    card = build_small_repository(tmp_path / "model", threshold=0.3)
    destinations = [
        {"name": "pacs", "kind": "dimse", "ae_title": orthanc.aet, "host": "127.0.0.1",
         "port": orthanc.dicom_port, "timeout_s": 10},
        *(_dimse(str(c), scp, sr_class=str(c), send_overlays=c is SRClass.enhanced) for c, scp in archives.items()),
        # an archive of Basic Text SR only, asked for the default class: refused, never "sent"
        _dimse("misconfigured", archives[SRClass.basic_text]),
    ]
    settings = load_settings(
        data_dir=tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'triage.db'}",
        model_repository=card.parent / "models", model_card=card,
        destinations=destinations, key_slices_per_class=1,
    )
    schema.upgrade(settings.effective_database_url)
    ctx = build_context(settings)
    try:
        (job_id,) = ingest_files(settings, ctx.session_factory, write_ct_series(tmp_path / "in", bleed=True))
        outcome = run_job(ctx, job_id, 1)
        assert outcome.positive and outcome.overlay_sop_uids
        deliver_due(ctx.session_factory, settings, datetime.now(UTC))
        with ctx.session_factory() as session:
            items = session.scalars(select(OutboxItem).where(OutboxItem.job_id == job_id)).all()
        by_destination: dict[str, list[OutboxItem]] = {}
        for item in items:
            by_destination.setdefault(item.destination, []).append(item)
        overlays = len(outcome.overlay_sop_uids)
        assert len(by_destination["pacs"]) == len(by_destination["enhanced"]) == overlays + 1
        assert len(by_destination["misconfigured"]) == overlays + 1
        for sr_class in SRClass:
            name = str(sr_class)
            assert {i.state for i in by_destination[name]} == {OutboxState.delivered}, name
            received = [pydicom.dcmread(p) for p in archives[sr_class].files()]
            reports = [ds for ds in received if ds.SOPClassUID == SR_CLASS_UIDS[sr_class]]
            assert len(reports) == 1, name
            assert summary(reports[0])["any"]["present"] is True, name
            referenced = {i.ReferencedSOPSequence[0].ReferencedSOPClassUID
                          for vt, _, i in _concepts(reports[0]) if vt == "IMAGE"}
            # a report references the overlay series only where the archive holds it
            assert (SecondaryCaptureImageStorage in referenced) is (sr_class is SRClass.enhanced), name
            assert len(received) == 1 + (overlays if sr_class is SRClass.enhanced else 0), name
        assert OutboxState.delivered not in {i.state for i in by_destination["misconfigured"]}

        sr_classes_at_orthanc = set()
        for ident in orthanc.instances():
            tags = orthanc.get(f"/instances/{ident}/simplified-tags").json()
            sr_classes_at_orthanc.add(tags["SOPClassUID"])
        assert SR_CLASS_UIDS[SRClass.comprehensive_3d] in sr_classes_at_orthanc
        for path in Path(outcome.output_dir).glob("sr*.dcm"):
            assert dciodvfy(path).ok, path.name
    finally:
        ctx.close()
