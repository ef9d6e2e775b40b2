"""Check a destination before go-live: is it reachable, does it accept the node, does it store.

``triage-node destination test NAME`` and ``triage-node echo`` print these steps. Each step
says what worked, or why not in the words an imaging team acts on: nothing listens on that
port, the peer does not know the called AE title, the peer refused the password. Steps:

- DIMSE: TCP connect; association and C-ECHO (Verification, PS3.4 Annex A), an
  A-ASSOCIATE-RJ explained from its source and diagnostic (PS3.8 Table 9-21); optionally a
  C-STORE of a test object.
- DICOMweb: a QIDO-RS search (``GET {url}/studies?limit=1``, PS3.18 10.6) with the
  destination's credentials; optionally a STOW-RS of a test object.

The test object is a 16x16 black Secondary Capture image of a patient named
``TRIAGE^CONNECTION TEST`` (ID ``TRIAGE-NODE-TEST``) in a study of its own, so an archive
team can find and delete it; it is sent only when asked for.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import asdict, dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import requests
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import SecondaryCaptureImageStorage, Verification  # type: ignore[attr-defined]  # pynetdicom defines these through globals()
from pynetdicom.status import code_to_category

from triage_node.setting_types import Destination, DestinationKind
from triage_node.timeutil import utcnow
from worker.pipeline.destinations import dicomweb_client, dicomweb_session, ssl_context

__all__ = ["TEST_PATIENT_ID", "Step", "check_destination", "echo", "test_object"]

TEST_PATIENT_ID = "TRIAGE-NODE-TEST"
_MANUFACTURER = "ICH triage node (open source)"

#: A-ASSOCIATE-RJ (source, diagnostic) -> what to check (PS3.8 Table 9-21).
_REJECT_HINTS = {
    (1, 2): "the peer does not support the DICOM application context",
    (1, 3): "the peer does not know the calling AE title {calling!r}: register the node there",
    (1, 7): "the peer does not answer to the called AE title {called!r}: check ae_title",
    (2, 2): "the peer does not support this protocol version",
    (3, 1): "the peer is busy (temporary congestion): try again later",
    (3, 2): "the peer is at its association limit: try again later",
}


@dataclass(frozen=True)
class Step:
    """One check: its name, whether it passed, and what was seen."""

    name: str
    ok: bool
    detail: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def test_object() -> Dataset:
    """A new synthetic Secondary Capture image that names itself a connection test."""
    now = utcnow()
    sc = hd.sc.SCImage(
        pixel_array=np.zeros((16, 16), dtype=np.uint8),
        photometric_interpretation="MONOCHROME2",
        bits_allocated=8,
        coordinate_system="PATIENT",
        study_instance_uid=hd.UID(),
        series_instance_uid=hd.UID(),
        series_number=9999,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=_MANUFACTURER,
        patient_id=TEST_PATIENT_ID,
        patient_name="TRIAGE^CONNECTION TEST",
        study_date=now.date(),
        study_time=now.time().replace(microsecond=0),
        patient_orientation=("L", "P"),
        series_description="triage-node destination test - not a patient, delete",
    )
    sc.StudyDescription = "triage-node destination test - not a patient, delete"
    return sc


def _connect_step(host: str, port: int, timeout: float) -> Step:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except ConnectionRefusedError:
        return Step("connect", False, f"connection refused: nothing listens on {host}:{port} "
                    "(wrong port or host, or the peer is down)")
    except socket.gaierror as exc:
        return Step("connect", False, f"cannot resolve host {host!r}: {exc.strerror or exc}")
    except TimeoutError:
        return Step("connect", False, f"no answer from {host}:{port} within {timeout:g} s "
                    "(a firewall, or the wrong host)")
    except OSError as exc:
        return Step("connect", False, f"cannot connect to {host}:{port}: {exc.strerror or exc}")
    return Step("connect", True, f"{host}:{port} accepts TCP connections")


def _rejection(received: list[object], called: str, calling: str) -> str:
    for primitive in received:
        result = getattr(primitive, "result", None)
        if result in (0x01, 0x02):
            kind = "permanently" if result == 0x01 else "for now"
            key = (int(getattr(primitive, "result_source", 0) or 0), int(getattr(primitive, "diagnostic", 0) or 0))
            hint = _REJECT_HINTS.get(key, str(getattr(primitive, "reason_str", "") or "no reason given"))
            return f"the peer rejected the association {kind}: " + hint.format(called=called, calling=calling)
    return "the peer closed or aborted the association without accepting it (does it require TLS?)"


def echo(
    host: str, port: int, called_ae: str, calling_ae: str, *, timeout: float = 10.0,
    tls: ssl.SSLContext | None = None, store: Dataset | None = None,
) -> list[Step]:
    """TCP connect, association and C-ECHO, and a C-STORE of ``store`` if given."""
    steps = [_connect_step(host, port, timeout)]
    if not steps[0].ok:
        return steps
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    ae.add_requested_context(Verification)
    if store is not None:
        ae.add_requested_context(SecondaryCaptureImageStorage)
    received: list[object] = []
    try:
        assoc = ae.associate(
            host, port, ae_title=called_ae, tls_args=(tls, host) if tls is not None else None,
            evt_handlers=[(evt.EVT_ACSE_RECV, lambda event: received.append(event.primitive))],
        )
    except (OSError, ssl.SSLError) as exc:
        return [*steps, Step("association", False, f"TLS or connection failure: {exc}")]
    if not assoc.is_established:
        return [*steps, Step("association", False, _rejection(received, called_ae, calling_ae))]
    steps.append(Step("association", True, f"{called_ae!r} accepted {calling_ae!r}"))
    try:
        status = assoc.send_c_echo()
        code = int(status.Status) if "Status" in status else None
        steps.append(Step("c-echo", code == 0, f"C-ECHO status 0x{code:04X}" if code is not None
                          else "no C-ECHO response within the timeout"))
        if store is not None:
            steps.append(_store_step(assoc, store))
    finally:
        if assoc.is_established:
            assoc.release()
    return steps


def _store_step(assoc: object, ds: Dataset) -> Step:
    try:
        status = assoc.send_c_store(ds)  # type: ignore[attr-defined]
    except ValueError:
        return Step("c-store", False, "the peer accepted no presentation context for Secondary Capture")
    if "Status" not in status:
        return Step("c-store", False, "no C-STORE response within the timeout")
    code = int(status.Status)
    ok = code_to_category(code) in ("Success", "Warning")
    return Step("c-store", ok, f"test object {ds.SOPInstanceUID} (patient ID {TEST_PATIENT_ID}): "
                f"C-STORE status 0x{code:04X}")


def _http_reason(exc: requests.RequestException, url: str) -> str:
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        code = exc.response.status_code
        meaning = {
            401: "the peer refused the credentials: check username and password, or token",
            403: "the credentials were accepted but are not allowed to do this",
            404: f"no DICOMweb service at {url}: check the URL's path (e.g. /dicom-web)",
        }.get(code, exc.response.reason or "")
        return f"HTTP {code}: {meaning}"
    if isinstance(exc, requests.exceptions.SSLError):
        return f"TLS failure: {exc}"
    if isinstance(exc, requests.Timeout):
        return f"no answer from {url} within the timeout"
    if isinstance(exc, requests.ConnectionError):
        return f"cannot connect to {url} (wrong host or port, or the peer is down)"
    return f"{type(exc).__name__}: {exc}"


def _dicomweb_steps(destination: Destination, tls_cert: Path | None, tls_key: Path | None,
                    store: Dataset | None) -> list[Step]:
    session = dicomweb_session(destination, tls_cert, tls_key)
    client = dicomweb_client(destination, session)
    steps: list[Step] = []
    try:
        try:
            found = client.search_for_studies(limit=1)
            steps.append(Step("qido", True, f"QIDO-RS search answered ({len(found)} study listed at most 1)"))
        except requests.RequestException as exc:
            return [Step("qido", False, _http_reason(exc, str(destination.url)))]
        if store is not None:
            try:
                response = client.store_instances([store])
            except requests.RequestException as exc:
                steps.append(Step("stow", False, _http_reason(exc, str(destination.url))))
            else:
                failed = response.get("FailedSOPSequence", [])
                steps.append(Step("stow", not failed, f"test object {store.SOPInstanceUID} (patient ID "
                                  f"{TEST_PATIENT_ID}): " + ("refused" if failed else "stored")))
    finally:
        session.close()
    return steps


def check_destination(
    destination: Destination, *, calling_ae: str, tls_cert: Path | None = None,
    tls_key: Path | None = None, store_test_object: bool = False,
) -> list[Step]:
    """Every check of ``destination`` (see the module docstring), in order; stops at the first
    step that makes the next meaningless."""
    store = test_object() if store_test_object else None
    if destination.kind is DestinationKind.dimse:
        tls = ssl_context(destination, tls_cert, tls_key) if destination.tls else None
        return echo(str(destination.host), int(destination.port or 0), str(destination.ae_title), calling_ae,
                    timeout=destination.timeout_s, tls=tls, store=store)
    return _dicomweb_steps(destination, tls_cert, tls_key, store)
