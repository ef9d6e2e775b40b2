"""STOW-RS (PS3.18 10.5) on a real HTTP server: multipart bodies built from CT files,
the PS3.18 response, status codes, the same store/spool/audit path as C-STORE, the
completeness fast path at the end of the request, and a third-party client
(dicomweb-client)."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from tests.pipeline_helpers import (  # noqa: F401 - fixtures
    LiveServer,
    ct_dataset,
    ct_series_files,
    database_url,
    multipart_related,
    part10,
    session_factory,
)
from triage_node.api.app import create_app
from triage_node.api.auth import create_token
from triage_node.config import load_settings
from triage_node.db.models import AuditEvent, Instance, Job, Series
from triage_node.db.session import transaction
from triage_node.queue import JobEnqueuer, make_client
from triage_node.studies.completeness import CompletenessTracker

CT = 'multipart/related; type="application/dicom"; boundary="{b}"'


@pytest.fixture
def settings(tmp_path, database_url):
    return load_settings(data_dir=tmp_path, database_url=database_url, min_free_disk_mb=0)


@pytest.fixture
def tokens(settings, session_factory):
    with transaction(session_factory) as session:
        return {role: create_token(session, settings, role, f"{role}-stow")[1]
                for role in ("viewer", "sender", "admin")}


@pytest.fixture
def node(settings, session_factory):
    tracker = CompletenessTracker(settings, session_factory,
                                  JobEnqueuer(session_factory, make_client(settings)))
    with LiveServer(create_app(settings, session_factory, tracker=tracker)) as live:
        live.tracker = tracker
        yield live


def post(node, body: bytes, token: str, content_type: str | None = None, path="/dicom-web/studies"):
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/dicom+json",
               "Content-Type": content_type or CT.format(b="triage-boundary-1")}
    return httpx.post(node.url + path, content=body, headers=headers, timeout=30)


def uid_of(item, tag):
    return item[tag]["Value"][0]


def test_store_a_series_returns_references_and_enqueues_a_job(node, tokens, session_factory,
                                                                settings):
    study, series = generate_uid(), generate_uid()
    files = ct_series_files(16, study_uid=study, series_uid=series)
    response = post(node, multipart_related(files), tokens["sender"])
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/dicom+json")
    body = response.json()
    assert "00081198" not in body
    assert body["00081190"] == {"vr": "UR", "Value": [f"{node.url}/dicom-web/studies/{study}"]}
    refs = body["00081199"]["Value"]
    sent = {dcmread(BytesIO(f)).SOPInstanceUID for f in files}
    assert {uid_of(r, "00081155") for r in refs} == sent
    assert all(uid_of(r, "00081150") == "1.2.840.10008.5.1.4.1.1.2" for r in refs)
    assert all(uid_of(r, "00081190").startswith(
        f"{node.url}/dicom-web/studies/{study}/series/{series}/instances/") for r in refs)
    with session_factory() as session:
        rows = session.scalars(select(Instance)).all()
        assert len(rows) == 16 and {r.source for r in rows} == {"stow"}
        assert {r.calling_ae for r in rows} == {"sender-stow"}
        # Bytes on disk are the bytes sent (no re-encoding).
        assert sorted(Path(r.path).read_bytes() for r in rows) == sorted(files)
        series_row = session.scalar(select(Series).where(Series.series_uid == series))
        assert series_row.state == "complete" and series_row.completion_reason == "fast_path"
        job = session.scalars(select(Job)).one()
        assert job.enqueued_at is not None
        request_audit = session.scalars(
            select(AuditEvent).where(AuditEvent.action == "stow.request")).one()
    assert request_audit.actor == "token:sender-stow" and request_audit.outcome == "ok"
    assert request_audit.detail["stored"] == 16 and request_audit.study_uid == study


@pytest.mark.parametrize(
    ("boundary", "template"),
    [
        ("simple", 'multipart/related; type="application/dicom"; boundary={b}'),
        ("needs:quoting=yes", 'multipart/related; type="application/dicom"; boundary="{b}"'),
        ("xyz", "multipart/related; boundary={b}; type=application/dicom"),
        ("no-type", "multipart/related; boundary={b}"),
        ("Upper", 'Multipart/Related; Type="Application/DICOM"; Boundary="{b}"'),
    ],
)
def test_boundary_and_type_parameters_in_any_form(node, tokens, boundary, template):
    files = ct_series_files(2)
    response = post(node, multipart_related(files, boundary=boundary), tokens["admin"],
                    content_type=template.format(b=boundary))
    assert response.status_code == 200, response.text
    assert len(response.json()["00081199"]["Value"]) == 2


def test_some_failed_gives_202_with_failure_reasons(node, tokens):
    good = ct_series_files(2)
    broken = b"\x00" * 128 + b"DICM" + b"\xff" * 40  # a preamble and nothing readable
    no_uid = ct_dataset(generate_uid(), generate_uid())
    del no_uid.SOPInstanceUID
    del no_uid.file_meta.MediaStorageSOPInstanceUID
    bad_ds = ct_dataset(generate_uid(), generate_uid())
    bad_ds.SeriesInstanceUID = "1.2.3.../../etc"
    response = post(node, multipart_related([*good, broken, part10(bad_ds)]), tokens["sender"])
    assert response.status_code == 202, response.text
    body = response.json()
    assert len(body["00081199"]["Value"]) == 2
    failed = body["00081198"]["Value"]
    assert len(failed) == 2
    reasons = [uid_of(f, "00081197") for f in failed]
    assert all(0xA700 <= r <= 0xCFFF for r in reasons), [hex(r) for r in reasons]
    assert uid_of(failed[1], "00081155") == bad_ds.SOPInstanceUID


def test_all_failed_gives_409(node, tokens, session_factory):
    response = post(node, multipart_related([b"not dicom", b"\x00" * 200]), tokens["sender"])
    assert response.status_code == 409
    body = response.json()
    assert "00081199" not in body and len(body["00081198"]["Value"]) == 2
    with session_factory() as session:
        audit = session.scalars(select(AuditEvent).where(AuditEvent.action == "stow.request")).one()
    assert audit.outcome == "error" and audit.detail["failed"] == 2


def test_instances_of_another_study_are_refused_on_the_study_path(node, tokens, session_factory):
    study = generate_uid()
    mine = ct_series_files(2, study_uid=study)
    other = ct_series_files(1)
    response = post(node, multipart_related([*mine, *other]), tokens["sender"],
                    path=f"/dicomweb/studies/{study}")  # the old prefix: the URLs name it
    assert response.status_code == 202
    body = response.json()
    assert body["00081190"]["Value"] == [f"{node.url}/dicomweb/studies/{study}"]
    [failed] = body["00081198"]["Value"]
    assert uid_of(failed, "00081197") == 0xA900
    with session_factory() as session:
        assert len(session.scalars(select(Instance)).all()) == 2


def test_duplicates_are_idempotent(node, tokens, session_factory):
    files = ct_series_files(3)
    assert post(node, multipart_related(files), tokens["sender"]).status_code == 200
    again = post(node, multipart_related(files), tokens["sender"])
    assert again.status_code == 200 and len(again.json()["00081199"]["Value"]) == 3
    with session_factory() as session:
        assert len(session.scalars(select(Instance)).all()) == 3
        audit = session.scalars(select(AuditEvent).where(AuditEvent.action == "stow.request")
                                .order_by(AuditEvent.id)).all()
    assert audit[-1].detail["duplicates"] == 3


@pytest.mark.parametrize(
    "content_type",
    ["application/dicom", "application/json", 'multipart/related; type="application/dicom+json"; boundary=x',
     'multipart/form-data; boundary=x', ""],
)
def test_wrong_content_type_gives_415(node, tokens, content_type):
    response = httpx.post(node.url + "/dicomweb/studies", content=b"--x--\r\n",
                          headers={"Authorization": f"Bearer {tokens['sender']}",
                                   "Content-Type": content_type})
    assert response.status_code == 415, response.text


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"--x\r\nContent-Type: application/dicom\r\n\r\nabc", CT.format(b="x")),  # truncated
        (b"--x--\r\n", CT.format(b="x")),  # no parts
        (b"--x\r\nContent-Type: application/dicom\r\n\r\nabc\r\n--x--", 'multipart/related; type="application/dicom"'),
        (b"garbage without any boundary", CT.format(b="x")),
    ],
)
def test_broken_bodies_give_400(node, tokens, body, content_type, session_factory):
    response = post(node, body, tokens["sender"], content_type=content_type)
    assert response.status_code == 400, response.text
    with session_factory() as session:
        assert session.scalars(select(Instance)).all() == []


def test_truncated_body_keeps_the_parts_that_arrived_whole(node, tokens, session_factory):
    files = ct_series_files(2)
    body = multipart_related(files)
    cut = body[: body.rindex(b"--triage-boundary-1--")]
    response = post(node, cut, tokens["sender"])
    assert response.status_code == 400
    with session_factory() as session:
        # What was received whole is durable and recorded (like an aborted association).
        assert len(session.scalars(select(Instance)).all()) >= 1


def test_stow_needs_a_sender_or_admin_token(node, tokens):
    body = multipart_related(ct_series_files(1))
    assert httpx.post(node.url + "/dicomweb/studies", content=body,
                      headers={"Content-Type": CT.format(b="triage-boundary-1")}).status_code == 401
    assert post(node, body, tokens["viewer"]).status_code == 403
    assert post(node, body, tokens["sender"]).status_code == 200


def test_a_third_party_stow_client_can_store(node, tokens, session_factory):
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=node.url + "/dicomweb",
                            headers={"Authorization": f"Bearer {tokens['sender']}"})
    study, series = generate_uid(), generate_uid()
    datasets = [ct_dataset(study, series, instance_number=i + 1, z=5.0 * i) for i in range(12)]
    response = client.store_instances(datasets)
    refs = response.ReferencedSOPSequence
    assert len(refs) == 12 and "FailedSOPSequence" not in response
    assert {r.ReferencedSOPInstanceUID for r in refs} == {d.SOPInstanceUID for d in datasets}
    with session_factory() as session:
        assert session.scalars(select(Job)).one().enqueued_at is not None


def test_patient_identifiers_never_reach_the_log(node, tokens, session_factory):
    import io
    import logging

    from triage_node.logs import configure_logging

    stream = io.StringIO()
    configure_logging("DEBUG", "json", stream=stream)
    try:
        study, series = generate_uid(), generate_uid()
        files = [part10(ct_dataset(study, series, instance_number=i + 1, z=5.0 * i,
                                   patient_name="Quixote^Zebulon")) for i in range(12)]
        files.append(b"\x00" * 128 + b"DICM" + b"\x02\x00garbage Quixote")
        response = post(node, multipart_related(files), tokens["sender"])
        assert response.status_code == 202
    finally:
        logging.getLogger().handlers[:] = []
    output = stream.getvalue()
    assert "stow.done" in output and "series.complete" in output and "job.enqueued" in output
    assert "Quixote" not in output and "Zebulon" not in output and "PID-0001" not in output


def test_a_part_over_max_object_mb_gives_413_and_keeps_the_parts_before_it(
    tmp_path, database_url, session_factory, settings
):
    small = load_settings(data_dir=tmp_path, database_url=database_url, min_free_disk_mb=0,
                          max_object_mb=1)
    with transaction(session_factory) as session:
        token = create_token(session, small, "sender", "sender-stow")[1]
    study, series = generate_uid(), generate_uid()
    good = part10(ct_dataset(study, series))
    big = part10(ct_dataset(study, series, instance_number=2, size=1024))  # 2 MiB of pixels
    with LiveServer(create_app(small, session_factory)) as live:
        response = post(live, multipart_related([good, big]), token)
    assert response.status_code == 413, response.text
    assert "max_object_mb" in response.json()["detail"]
    with session_factory() as session:
        assert len(session.scalars(select(Instance)).all()) == 1
        request_audit = session.scalars(
            select(AuditEvent).where(AuditEvent.action == "stow.request")).one()
    assert request_audit.outcome == "error"
