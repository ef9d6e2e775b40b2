"""A web viewer against the node's DICOMweb: the calls OHIF makes, through dicomweb-client
and a real headless Chromium, on a real uvicorn server.

The study holds a received CT series (stored by the real InstanceStore, with a VOI
window), one JPEG Lossless and one RLE compressed CT slice stored as received, and the
node's results: the TID 1500 SR and the heat-map overlay series.
"""

from __future__ import annotations

import http.server
import io
import re
import threading

import httpx
import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEGLosslessSV1, RLELossless, generate_uid

from tests.worklist_factory import (  # noqa: F401 (fixtures)
    RunningApp,
    add_result,
    add_study,
    build_api,
    ct_slice,
    sqlite_database,
    write_result_objects,
)
from triage_node.db.session import transaction
from triage_node.synth.jpeg_lossless import encode_jpeg_lossless
from triage_node.worklist.priority import compute_priority

OTHER_ORIGIN = "http://evil.example"
#: What OHIF's image loader sends for frames: any transfer syntax, decoded by the part header.
OHIF_FRAMES_ACCEPT = "multipart/related; type=application/octet-stream; transfer-syntax=*"
VIEWER_TEMPLATE = "https://ohif.example/viewer?StudyInstanceUIDs={study_uid}"


def _part10(ds: pydicom.Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def compressed_slice(study, series_uid: str, syntax: str) -> tuple[pydicom.Dataset, np.ndarray]:
    """A 12-bit unsigned CT slice (HU + 1024) encoded in ``syntax``, and its pixels."""
    ds = ct_slice(study, series_uid, 0)
    stored = (np.frombuffer(ds.PixelData, np.int16).reshape(64, 64) + 1024).astype(np.uint16)
    ds.PixelRepresentation, ds.BitsStored, ds.HighBit, ds.RescaleIntercept = 0, 12, 11, -1024
    if syntax == JPEGLosslessSV1:
        ds.PixelData = encapsulate([encode_jpeg_lossless(stored, precision=12)])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    else:
        ds.compress(syntax, stored, generate_instance_uid=False)
    return ds, stored


class PageServer:
    """A web server on a loopback port that serves one empty page: a viewer's origin.

    Chromium lets a page reach a loopback server only from the loopback address space,
    so the page is served for real rather than faked in the browser.
    """

    def __init__(self) -> None:
        class Page(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                body = b"<!doctype html><title>viewer</title>"
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
        self.origin = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> PageServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def viewer_page():
    with PageServer() as page:
        yield page


@pytest.fixture
def node(sqlite_database, tmp_path, viewer_page):
    api = build_api(sqlite_database, tmp_path / "data", cors_origins=[viewer_page.origin],
                    viewer_url_template=VIEWER_TEMPLATE)
    with transaction(api.db.factory) as session:
        study = add_study(session, patient_name="Viewer^Vera")
        objects = write_result_objects(tmp_path / "results" / "1", study, n_overlays=2)
        add_result(session, study, {"any": 0.9, "subdural": 0.9}, **objects)
        compute_priority(session, study, api.settings, reason="test")
    store = api.app.state.store
    ct_series, ct_sops, ct_pixels = generate_uid(), [], []
    for i in range(3):
        ds = ct_slice(study, ct_series, i)
        ds.WindowCenter, ds.WindowWidth = 40, 80
        ct_sops.append(ds.SOPInstanceUID)
        ct_pixels.append(ds.PixelData)
        assert store.store(_part10(ds), calling_ae="CT_ED_1", peer="127.0.0.1", source="dimse").stored
    compressed = {}
    for syntax in (JPEGLosslessSV1, RLELossless):
        ds, pixels = compressed_slice(study, generate_uid(), syntax)
        data = _part10(ds)
        assert store.store(data, calling_ae="CT_ED_1", peer="127.0.0.1", source="dimse").stored
        compressed[syntax] = {"series": ds.SeriesInstanceUID, "sop": ds.SOPInstanceUID, "pixels": pixels,
                              "stored_frame": pydicom.encaps.get_frame(ds.PixelData, 0, number_of_frames=1)}
    with RunningApp(api.app) as running:
        yield {
            "api": api, "url": running.url, "study_uid": study.study_uid, "ct_series": ct_series,
            "ct_sops": ct_sops, "ct_pixels": ct_pixels, "compressed": compressed,
            "client": DICOMwebClient(f"{running.url}/dicom-web",
                                     headers={"Authorization": f"Bearer {api.tokens['viewer']}"}),
            "auth": {"Authorization": f"Bearer {api.tokens['viewer']}"}, "origin": viewer_page.origin,
            **objects,
        }


def _frames_parts(response: httpx.Response) -> list[tuple[str, bytes]]:
    """(Content-Type, body) of each part of a multipart/related response."""
    boundary = re.search(r"boundary=([^;]+)", response.headers["content-type"]).group(1).strip('"')
    parts = []
    for chunk in response.content.split(f"--{boundary}".encode())[1:-1]:
        head, _, body = chunk.partition(b"\r\n\r\n")
        ctype = next(line.split(":", 1)[1].strip() for line in head.decode().split("\r\n")
                     if line.lower().startswith("content-type"))
        parts.append((ctype, body[:-2]))  # the CRLF before the next delimiter
    return parts


# -- what OHIF does: QIDO studies -> series -> metadata -> frames ------------------------
def test_viewer_lists_the_study_its_series_including_sr_and_overlays_and_their_metadata(node):
    client, study_uid = node["client"], node["study_uid"]
    (study,) = client.search_for_studies(search_filters={"PatientName": "*vera*"})
    study = pydicom.Dataset.from_json(study)
    assert study.StudyInstanceUID == study_uid
    # dicomweb-client sends Host without the port, so URLs the node builds are checked with httpx.
    assert study.RetrieveURL.endswith(f"/dicom-web/studies/{study_uid}")
    assert {"CT", "SR"} <= set(study.ModalitiesInStudy)
    series = {s.SeriesInstanceUID: s for s in map(pydicom.Dataset.from_json, client.search_for_series(study_uid))}
    assert {node["ct_series"], node["sr_series_uid"], node["overlay_series_uid"]} <= set(series)
    assert series[node["sr_series_uid"]].Modality == "SR"
    instances = client.search_for_instances(study_uid, node["ct_series"])
    assert [pydicom.Dataset.from_json(i).SOPInstanceUID for i in instances] == node["ct_sops"]

    metadata = {m.SOPInstanceUID: m for m in
                (pydicom.Dataset.from_json(m, bulk_data_uri_handler=lambda *_: b"")
                 for m in client.retrieve_study_metadata(study_uid))}
    expected = {*node["ct_sops"], node["sr_sop_uid"], *node["overlay_sop_uids"],
                *(c["sop"] for c in node["compressed"].values())}
    assert set(metadata) == expected
    assert metadata[node["sr_sop_uid"]].ContentSequence  # the report content, for OHIF's SR viewport
    raw = httpx.get(f"{node['url']}/dicom-web/studies/{study_uid}/metadata", headers=node["auth"]).json()
    ct_meta = next(m for m in raw if m["00080018"]["Value"] == [node["ct_sops"][0]])
    pixel_uri = ct_meta["7FE00010"]["BulkDataURI"]
    assert ct_meta["7FE00010"]["vr"] == "OW"
    assert pixel_uri == (f"{node['url']}/dicom-web/studies/{study_uid}/series/{node['ct_series']}"
                         f"/instances/{node['ct_sops'][0]}/frames/1")
    assert client.retrieve_bulkdata(pixel_uri) == [node["ct_pixels"][0]]
    sr_meta = next(m for m in raw if m["00080018"]["Value"] == [node["sr_sop_uid"]])
    assert "7FE00010" not in sr_meta
    series_meta = client.retrieve_series_metadata(study_uid, node["overlay_series_uid"])
    assert all("BulkDataURI" in m["7FE00010"] for m in series_meta)

    everything = client.retrieve_study(study_uid)
    assert {ds.SOPInstanceUID for ds in everything} == expected


def test_frames_of_an_uncompressed_ct_instance_are_its_native_pixels(node):
    client, study_uid, series = node["client"], node["study_uid"], node["ct_series"]
    sop = node["ct_sops"][1]
    assert client.retrieve_instance_frames(study_uid, series, sop, [1]) == [node["ct_pixels"][1]]
    explicit = client.retrieve_instance_frames(
        study_uid, series, sop, [1], media_types=(("application/octet-stream", ExplicitVRLittleEndian),))
    assert explicit == [node["ct_pixels"][1]]
    response = httpx.get(f"{node['url']}/dicom-web/studies/{study_uid}/series/{series}/instances/{sop}/frames/1",
                         headers={**node["auth"], "Accept": OHIF_FRAMES_ACCEPT})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith('multipart/related; type="application/octet-stream"')
    [(ctype, body)] = _frames_parts(response)
    assert ctype == f"application/octet-stream; transfer-syntax={ExplicitVRLittleEndian}"
    assert body == node["ct_pixels"][1]
    url = f"{node['url']}/dicom-web/studies/{study_uid}/series/{series}/instances/{sop}/frames"
    assert httpx.get(f"{url}/2", headers=node["auth"]).status_code == 404  # one frame
    assert httpx.get(f"{url}/x", headers=node["auth"]).status_code == 400
    sr = f"{node['url']}/dicom-web/studies/{study_uid}/series/{node['sr_series_uid']}/instances/{node['sr_sop_uid']}"
    assert httpx.get(f"{sr}/frames/1", headers=node["auth"]).status_code == 404  # not an image


@pytest.mark.parametrize("syntax", [JPEGLosslessSV1, RLELossless], ids=["jpeg-lossless", "rle"])
def test_frames_of_a_compressed_instance_decoded_or_as_stored(node, syntax):
    client, study_uid, item = node["client"], node["study_uid"], node["compressed"][syntax]
    # A client that cannot decode gets native pixels, decoded by the node.
    (decoded,) = client.retrieve_instance_frames(study_uid, item["series"], item["sop"], [1])
    assert np.array_equal(np.frombuffer(decoded, "<u2").reshape(64, 64), item["pixels"])
    url = (f"{node['url']}/dicom-web/studies/{study_uid}/series/{item['series']}"
           f"/instances/{item['sop']}/frames/1")
    # OHIF's Accept gets the bytes as stored, the transfer syntax in the part header.
    response = httpx.get(url, headers={**node["auth"], "Accept": OHIF_FRAMES_ACCEPT})
    [(ctype, body)] = _frames_parts(response)
    assert ctype == f"application/octet-stream; transfer-syntax={syntax}"
    assert body == item["stored_frame"]
    # The compressed media type itself (PS3.18 Table 8.7.3-2).
    media = "image/jpeg" if syntax == JPEGLosslessSV1 else "image/dicom-rle"
    (as_stored,) = client.retrieve_instance_frames(study_uid, item["series"], item["sop"], [1],
                                                    media_types=((media, syntax),))
    assert as_stored == item["stored_frame"]
    refused = httpx.get(url, headers={**node["auth"], "Accept": 'multipart/related; type="image/jp2"'})
    assert refused.status_code == 406


# -- rendered --------------------------------------------------------------------------
def test_rendered_png_and_jpeg_use_the_image_window_or_the_one_asked_for(node):
    study_uid, series, sop = node["study_uid"], node["ct_series"], node["ct_sops"][0]
    url = f"{node['url']}/dicom-web/studies/{study_uid}/series/{series}/instances/{sop}/rendered"
    png = httpx.get(url, headers={**node["auth"], "Accept": "image/png"})
    assert png.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(png.content))
    assert (image.format, image.mode, image.size) == ("PNG", "L", (64, 64))
    grey = np.asarray(image)
    hu = np.frombuffer(node["ct_pixels"][0], np.int16).reshape(64, 64)
    # The image's own window 40/80 (PS3.3 C.11.2.1.2.1): air black, brain 35 HU just under mid-grey.
    assert grey[hu == -1000].max() == 0
    assert abs(int(grey[32, 50]) - round(((35 - 39.5) / 79 + 0.5) * 255)) <= 1
    wide = np.asarray(Image.open(io.BytesIO(
        httpx.get(url, params={"window": "0,2000,LINEAR_EXACT", "accept": "image/png"}, headers=node["auth"]).content)))
    assert abs(int(wide[hu == -1000].max()) - 0) <= 1 and abs(int(wide[32, 50]) - round((35 / 2000 + 0.5) * 255)) <= 1

    jpeg = httpx.get(url, params={"viewport": "32,32"}, headers=node["auth"])  # JPEG is the default
    assert jpeg.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(jpeg.content)).size == (32, 32)
    frame = httpx.get(url.replace("/rendered", "/frames/1/rendered"), headers={**node["auth"], "Accept": "image/png"})
    assert frame.content == png.content
    overlay = node["overlay_sop_uids"][0]
    rgb = httpx.get(f"{node['url']}/dicom-web/studies/{study_uid}/series/{node['overlay_series_uid']}"
                    f"/instances/{overlay}/rendered", headers={**node["auth"], "Accept": "image/png"})
    assert Image.open(io.BytesIO(rgb.content)).mode == "RGB"
    item = node["compressed"][JPEGLosslessSV1]
    compressed = httpx.get(f"{node['url']}/dicom-web/studies/{study_uid}/series/{item['series']}"
                           f"/instances/{item['sop']}/rendered", params={"accept": "image/png"}, headers=node["auth"])
    assert Image.open(io.BytesIO(compressed.content)).size == (64, 64)
    assert httpx.get(url, params={"window": "40"}, headers=node["auth"]).status_code == 400
    assert httpx.get(url, headers={**node["auth"], "Accept": "image/gif"}).status_code == 406


# -- CORS, alias, authentication ---------------------------------------------------------
def test_cors_preflight_is_answered_for_the_allowed_origin_only(node):
    url = f"{node['url']}/dicom-web/studies"
    preflight = {"Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "authorization,accept"}
    allowed = httpx.options(url, headers={"Origin": node["origin"], **preflight})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == node["origin"]
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-credentials" not in allowed.headers
    other = httpx.options(url, headers={"Origin": OTHER_ORIGIN, **preflight})
    assert "access-control-allow-origin" not in other.headers
    # The real requests: the allowed page may read answers and refusals; the token still counts.
    ok = httpx.get(url, headers={"Origin": node["origin"], **node["auth"]})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == node["origin"]
    anonymous = httpx.get(url, headers={"Origin": node["origin"]})
    assert anonymous.status_code == 401 and anonymous.headers["access-control-allow-origin"] == node["origin"]
    assert "access-control-allow-origin" not in httpx.get(url, headers={"Origin": OTHER_ORIGIN, **node["auth"]}).headers


def test_no_cors_headers_without_cors_origins(sqlite_database, tmp_path):
    api = build_api(sqlite_database, tmp_path / "data")
    assert api.settings.cors_origins == []
    response = api.client(None).options(
        "/dicom-web/studies", headers={"Origin": OTHER_ORIGIN, "Access-Control-Request-Method": "GET"})
    assert response.status_code == 401 and "access-control-allow-origin" not in response.headers


def test_old_dicomweb_prefix_still_works_and_both_need_a_token(node):
    url, study_uid = node["url"], node["study_uid"]
    old = DICOMwebClient(f"{url}/dicomweb", headers=node["auth"])
    (study,) = old.search_for_studies(search_filters={"StudyInstanceUID": study_uid})
    assert pydicom.Dataset.from_json(study).RetrieveURL.endswith(f"/dicomweb/studies/{study_uid}")
    (study,) = httpx.get(f"{url}/dicomweb/studies", params={"StudyInstanceUID": study_uid},
                         headers=node["auth"]).json()
    assert study["00081190"]["Value"] == [f"{url}/dicomweb/studies/{study_uid}"]
    sop = node["ct_sops"][0]
    assert old.retrieve_instance_frames(study_uid, node["ct_series"], sop, [1]) == [node["ct_pixels"][0]]
    for prefix in ("/dicom-web", "/dicomweb"):
        assert httpx.get(f"{url}{prefix}/studies").status_code == 401
        assert httpx.get(f"{url}{prefix}/studies/{study_uid}/metadata").status_code == 401
        sender = {"Authorization": f"Bearer {node['api'].tokens['sender']}"}
        assert httpx.get(f"{url}{prefix}/studies", headers=sender).status_code == 403
    # STOW-RS on both prefixes: the new slice is then found by QIDO.
    with transaction(node["api"].db.factory) as session:
        extra = add_study(session)
    for prefix in ("/dicom-web", "/dicomweb"):
        ds = ct_slice(extra, generate_uid(), 0)
        stow = DICOMwebClient(f"{url}{prefix}",
                              headers={"Authorization": f"Bearer {node['api'].tokens['sender']}"})
        stow.store_instances([ds])
        assert node["client"].search_for_series(extra.study_uid, search_filters={
            "SeriesInstanceUID": ds.SeriesInstanceUID})
    paths = node["api"].client("viewer").get("/openapi.json").json()["paths"]
    assert "/dicom-web/studies/{study_uid}/metadata" in paths and not any(p.startswith("/dicomweb") for p in paths)


# -- the web page's viewer link ----------------------------------------------------------
def _login(client, token: str) -> None:
    assert client.post("/login", data={"token": token, "next": "/worklist"}).status_code == 303


def test_worklist_rows_and_study_page_open_the_study_in_the_viewer(node, sqlite_database, tmp_path):
    api, study_uid = node["api"], node["study_uid"]
    web = api.client(None)
    _login(web, api.tokens["viewer"])
    link = VIEWER_TEMPLATE.format(study_uid=study_uid)
    for page in ("/worklist", "/worklist/rows", f"/studies/{study_uid}"):
        html = web.get(page).text
        assert f'class="viewer-link" href="{link}"' in html, page
    hidden = build_api(sqlite_database, tmp_path / "data2", viewer_url_template="")
    web = hidden.client(None)
    _login(web, hidden.tokens["viewer"])
    assert "viewer-link" not in web.get("/worklist").text + web.get(f"/studies/{study_uid}").text


# -- a browser page on another origin, as OHIF runs --------------------------------------
def test_a_page_on_the_allowed_origin_reads_dicomweb_in_chromium_and_another_cannot(node):
    from tests.test_web_browser import CHROMIUM, CHROMIUM_ARGS

    if not CHROMIUM.exists():
        pytest.fail("Debian chromium is missing: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    script = """async ([root, token, study, series, sop, accept]) => {
      const headers = {Authorization: 'Bearer ' + token, Accept: 'application/dicom+json'};
      try {
        const studies = await (await fetch(root + '/studies?PatientName=*vera*', {headers})).json();
        const meta = await (await fetch(root + '/studies/' + study + '/series/' + series + '/metadata',
                                        {headers})).json();
        const frame = await fetch(meta[0]['7FE00010'].BulkDataURI,
                                  {headers: {Authorization: headers.Authorization, Accept: accept}});
        const body = await frame.arrayBuffer();
        return {studies: studies.length, instances: meta.length, type: frame.headers.get('content-type'),
                bytes: body.byteLength};
      } catch (e) { return {error: String(e)}; }
    }"""
    args = [f"{node['url']}/dicom-web", node["api"].tokens["viewer"], node["study_uid"], node["ct_series"],
            node["ct_sops"][0], OHIF_FRAMES_ACCEPT]
    with PageServer() as other, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            results = {}
            for origin in (node["origin"], other.origin):
                page = browser.new_page()
                page.goto(f"{origin}/viewer")
                results[origin] = page.evaluate(script, args)
                page.close()
        finally:
            browser.close()
    allowed = results[node["origin"]]
    assert allowed.get("error") is None, allowed
    assert allowed["studies"] == 1 and allowed["instances"] == 3
    assert allowed["type"].startswith('multipart/related; type="application/octet-stream"')
    assert allowed["bytes"] > 64 * 64 * 2
    assert "error" in results[other.origin]  # the browser refuses to hand over the answer
