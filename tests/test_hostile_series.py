"""Cross-patient series mixing against a running node (`triage_node.ingest.filing`).

Patient A's series is stored; then instances that reuse its SeriesInstanceUID or its
StudyInstanceUID under another PatientID, or its SeriesInstanceUID under another study,
are sent by C-STORE and STOW-RS. Each must be refused with a Storage failure status
(0xA900, PS3.4 Table B.2-1) and audited as ``instance.rejected`` naming the conflict,
both while the series is in the store's cache and after a restart (read from the
database), and A's series must be left as it was. No PatientID value reaches the audit
row or the log.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import select

from tests.ingest_support import ct_dataset, part10
from tests.node_process import AET, NodeProcess
from tests.pipeline_helpers import multipart_related
from triage_node.db.models import AuditEvent, Instance, Series, Study
from triage_node.ingest.store import FILED_ELSEWHERE, SUCCESS

PATIENT_A = "PID-A-4471902"
PATIENT_B = "PID-B-9930551"
BOUNDARY = "series-boundary"
STOW_TYPE = f'multipart/related; type="application/dicom"; boundary="{BOUNDARY}"'


def instance(study_uid: str, series_uid: str, patient_id: str, index: int = 0) -> Dataset:
    ds = ct_dataset(study_uid, series_uid, index)
    ds.PatientID = patient_id
    ds.PatientName = "Bravo^Other" if patient_id == PATIENT_B else ds.PatientName
    return ds


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    with NodeProcess(tmp_path_factory.mktemp("series") / "data") as running:
        yield running


def c_store(node: NodeProcess, *datasets: Dataset) -> list[int]:
    ae = AE(ae_title="SERIES_SCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", node.dicom_port, ae_title=AET)
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def rejections(node: NodeProcess) -> list[AuditEvent]:
    with node.session_factory() as session:
        return list(session.scalars(
            select(AuditEvent).where(AuditEvent.action == "instance.rejected").order_by(AuditEvent.id)
        ).all())


def series_state(node: NodeProcess, series_uid: str) -> tuple[str, str | None, int, set[str]]:
    """(StudyInstanceUID, PatientID, instance_count, SOP Instance UIDs) of a stored series."""
    with node.session_factory() as session:
        series = session.scalars(select(Series).where(Series.series_uid == series_uid)).one()
        study = session.get(Study, series.study_id)
        sops = set(session.scalars(select(Instance.sop_uid).where(Instance.series_id == series.id)))
        return study.study_uid, study.patient_id, series.instance_count, sops


def study_exists(node: NodeProcess, study_uid: str) -> bool:
    with node.session_factory() as session:
        return session.scalars(select(Study).where(Study.study_uid == study_uid)).first() is not None


def test_instances_filed_elsewhere_are_refused_cached_or_not_and_a_series_is_left_as_it_was(
    node: NodeProcess,
) -> None:
    study_a, series_a = generate_uid(), generate_uid()
    stored = [instance(study_a, series_a, PATIENT_A, i) for i in range(2)]
    assert c_store(node, *stored) == [SUCCESS, SUCCESS]
    before = series_state(node, series_a)
    assert before == (study_a, PATIENT_A, 2, {ds.SOPInstanceUID for ds in stored})
    rejected_before = len(rejections(node))

    def hostile() -> list[tuple[Dataset, str]]:
        """Fresh instances each time (new SOP Instance UIDs) and the conflict each names."""
        other_patient = "StudyInstanceUID is already filed under another patient"
        other_study = "SeriesInstanceUID is already filed under another study"
        return [
            (instance(study_a, series_a, PATIENT_B), other_patient),
            (instance(generate_uid(), series_a, PATIENT_B), other_study),
            (instance(generate_uid(), series_a, PATIENT_A), other_study),
            (instance(study_a, generate_uid(), PATIENT_B), other_patient),
        ]

    first = hostile()  # series A is in the listener's cache (stored just now)
    assert c_store(node, *(ds for ds, _ in first)) == [FILED_ELSEWHERE] * len(first)
    node.stop()  # a new process: nothing cached, the database decides
    node.start()
    second = hostile()
    assert c_store(node, *(ds for ds, _ in second)) == [FILED_ELSEWHERE] * len(second)

    assert node.alive
    assert series_state(node, series_a) == before
    assert not any(study_exists(node, ds.StudyInstanceUID) for ds, _ in first + second
                   if ds.StudyInstanceUID != study_a)
    events = rejections(node)[rejected_before:]
    assert [e.detail["reason"] for e in events] == [why for _, why in first + second]
    assert all(e.detail["status"] == f"0x{FILED_ELSEWHERE:04X}" and e.outcome == "failed" for e in events)
    assert PATIENT_B not in json.dumps([e.detail for e in events]) + node.log_text()
    # Patient A's next instance still goes into the series.
    assert c_store(node, instance(study_a, series_a, PATIENT_A, 2)) == [SUCCESS]
    assert series_state(node, series_a)[2] == 3


def test_stow_refuses_an_instance_of_another_patient_in_a_stored_series(node: NodeProcess) -> None:
    study_a, series_a = generate_uid(), generate_uid()
    token = node.token("sender", "series-stow")
    mine = part10(instance(study_a, series_a, PATIENT_A))
    post = lambda parts: httpx.post(  # noqa: E731
        node.url + "/dicomweb/studies", content=multipart_related(parts, boundary=BOUNDARY), timeout=30,
        headers={"Authorization": f"Bearer {token}", "Content-Type": STOW_TYPE,
                 "Accept": "application/dicom+json"})
    assert post([mine]).status_code == 200
    before = series_state(node, series_a)
    rejected_before = len(rejections(node))
    theirs = instance(study_a, series_a, PATIENT_B)
    response = post([part10(theirs)])
    assert response.status_code == 409, response.text
    [failed] = response.json()["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [FILED_ELSEWHERE]
    assert failed["00081155"]["Value"] == [theirs.SOPInstanceUID]
    [event] = rejections(node)[rejected_before:]
    assert event.detail["reason"] == "StudyInstanceUID is already filed under another patient"
    assert event.actor == "stow:series-stow" and event.detail["source"] == "stow"
    assert series_state(node, series_a) == before
