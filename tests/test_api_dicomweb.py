"""DICOMweb read side, driven by dicomweb-client against the app on a real HTTP server."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import generate_uid

from tests.worklist_factory import (  # noqa: F401 (fixtures)
    RunningApp,
    add_result,
    add_study,
    api,
    ct_slice,
    database,
    write_result_objects,
)
from triage_node.db.session import transaction


def _part10(ds: pydicom.Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.fixture
def served(api, tmp_path):
    """A study with a received CT series (through the real InstanceStore), an SR and overlays."""
    with transaction(api.db.factory) as session:
        study = add_study(session, patient_name="Web^Viewer")
        objects = write_result_objects(tmp_path / "results" / "1", study, n_overlays=2)
        add_result(session, study, {"any": 0.9, "subdural": 0.9}, **objects)
    ct_series = generate_uid()
    for i in range(3):
        outcome = api.app.state.store.store(
            _part10(ct_slice(study, ct_series, i)), calling_ae="CT_ED_1", peer="127.0.0.1", source="dimse"
        )
        assert outcome.stored
    with RunningApp(api.app) as running:
        client = DICOMwebClient(f"{running.url}/dicomweb",
                                headers={"Authorization": f"Bearer {api.tokens['viewer']}"})
        yield {"client": client, "url": running.url, "study_uid": study.study_uid,
               "ct_series": ct_series, **objects}


def test_qido_finds_the_study_and_its_received_and_result_series(served):
    client, study_uid = served["client"], served["study_uid"]
    studies = client.search_for_studies(search_filters={"StudyInstanceUID": study_uid})
    (found,) = studies
    ds = pydicom.Dataset.from_json(found)
    assert ds.StudyInstanceUID == study_uid and str(ds.PatientName) == "Web^Viewer"
    assert "SR" in ds.ModalitiesInStudy and ds.NumberOfStudyRelatedInstances == 3 + 1 + 2
    series = {pydicom.Dataset.from_json(s).SeriesInstanceUID: pydicom.Dataset.from_json(s)
              for s in client.search_for_series(study_uid)}
    assert {served["ct_series"], served["sr_series_uid"], served["overlay_series_uid"]} <= set(series)
    assert series[served["sr_series_uid"]].Modality == "SR"
    assert series[served["overlay_series_uid"]].NumberOfSeriesRelatedInstances == 2
    only_sr = client.search_for_series(study_uid, search_filters={"Modality": "SR"})
    assert [pydicom.Dataset.from_json(s).SeriesInstanceUID for s in only_sr] == [served["sr_series_uid"]]
    instances = client.search_for_instances(study_uid, served["overlay_series_uid"])
    assert sorted(pydicom.Dataset.from_json(i).SOPInstanceUID for i in instances) == sorted(
        served["overlay_sop_uids"]
    )
    assert client.search_for_studies(search_filters={"PatientID": "nobody"}) == []
    wildcard = client.search_for_studies(search_filters={"PatientID": "PID-*", "ModalitiesInStudy": "SR"})
    assert [pydicom.Dataset.from_json(s).StudyInstanceUID for s in wildcard] == [study_uid]
    assert client.search_for_studies(search_filters={"PatientID": "PID_*"}) == []  # _ is literal


def test_wado_returns_the_objects_exactly_as_written(served):
    client, study_uid = served["client"], served["study_uid"]
    sr = client.retrieve_instance(study_uid, served["sr_series_uid"], served["sr_sop_uid"])
    assert sr.SOPInstanceUID == served["sr_sop_uid"] and sr.Modality == "SR"
    assert sr.ConceptNameCodeSequence[0].CodeValue == "126000"  # TID 1500 Imaging Measurement Report
    on_disk = pydicom.dcmread(Path(served["output_dir"]) / "sr.dcm")
    assert _part10(sr)[132:] == _part10(on_disk)[132:]
    overlays = client.retrieve_series(study_uid, served["overlay_series_uid"])
    assert sorted(o.SOPInstanceUID for o in overlays) == sorted(served["overlay_sop_uids"])
    assert overlays[0].pixel_array.shape == (64, 64, 3)
    ct = client.retrieve_series(study_uid, served["ct_series"])
    assert len(ct) == 3 and ct[0].Modality == "CT"
    metadata = client.retrieve_series_metadata(study_uid, served["overlay_series_uid"])
    assert {pydicom.Dataset.from_json(m).SOPInstanceUID for m in metadata} == set(served["overlay_sop_uids"])


def test_dicomweb_refuses_anonymous_and_unknown(served):
    url, study_uid = served["url"], served["study_uid"]
    anonymous = DICOMwebClient(f"{url}/dicomweb")
    with pytest.raises(requests.HTTPError) as info:
        anonymous.search_for_studies()
    assert info.value.response.status_code == 401
    with pytest.raises(requests.HTTPError) as info:
        served["client"].retrieve_instance(study_uid, served["sr_series_uid"], "1.2.3.4")
    assert info.value.response.status_code == 404
    raw = requests.get(
        f"{url}/dicomweb/studies/{study_uid}/series/{served['sr_series_uid']}/instances/{served['sr_sop_uid']}",
        headers={"Authorization": served["client"]._session.headers["Authorization"]}, timeout=10,
    )
    assert raw.headers["content-type"].startswith('multipart/related; type="application/dicom"')
    assert (Path(served["output_dir"]) / "sr.dcm").read_bytes() in raw.content  # byte for byte
