"""Patient identifiers never reach a log line."""

from __future__ import annotations

import io
import json
import logging

import pydicom
import pytest
import structlog
from pydicom.dataset import Dataset

from triage_node.logs import (
    configure_logging,
    forget_identifiers,
    get_logger,
    remember_identifiers,
)


@pytest.fixture()
def json_log():
    stream = io.StringIO()
    configure_logging("DEBUG", "json", stream=stream)
    forget_identifiers()
    yield stream
    forget_identifiers()
    structlog.reset_defaults()
    logging.getLogger().handlers.clear()


def _patient() -> Dataset:
    ds = Dataset()
    ds.PatientName = "HEMORRHAGE^JANE^Q"
    ds.PatientID = "MRN0098765"
    ds.PatientBirthDate = "19470312"
    ds.AccessionNumber = "ACC55501"
    ds.OtherPatientIDs = ["ALT111222", "ALT333444"]
    ds.SOPInstanceUID = "1.2.3.4"
    return ds


def _lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_identifier_keys_are_dropped(json_log):
    get_logger("t").info("received", PatientName="DOE^JOHN", patient_id="X1", sop="1.2.3")
    (line,) = _lines(json_log)
    assert "DOE^JOHN" not in json_log.getvalue()
    assert "X1" not in json.dumps({k: v for k, v in line.items() if k != "event"})
    assert line["sop"] == "1.2.3"


def test_remembered_identifiers_are_scrubbed_from_any_value(json_log):
    ds = _patient()
    remember_identifiers(ds)
    log = get_logger("t")
    log.warning("could not parse header of JANE HEMORRHAGE (MRN0098765), born 19470312")
    log.info("lookup", query={"nested": ["ACC55501", "ALT333444"]})
    try:
        raise ValueError(f"bad value in {ds.PatientName}")
    except ValueError:
        log.exception("failed")
    # stdlib loggers (pynetdicom, celery) go through the same processors
    logging.getLogger("foreign").error("foreign logger mentions MRN0098765")
    text = json_log.getvalue()
    for secret in ("HEMORRHAGE", "MRN0098765", "19470312", "ACC55501", "ALT333444", "JANE"):
        assert secret not in text, secret
    assert text.count("[redacted]") >= 5


def test_datasets_are_never_rendered(json_log):
    ds = _patient()
    get_logger("t").info("stored", ds=ds)
    assert "HEMORRHAGE" not in json_log.getvalue()
    assert "SOPInstanceUID=1.2.3.4" in json_log.getvalue()


def test_structlog_capture_shows_scrubbed_events():
    configure_logging("INFO", "json", stream=io.StringIO())
    forget_identifiers()
    remember_identifiers(pydicom.Dataset(_patient()))
    from triage_node.logs import scrub_phi

    event = scrub_phi(None, "info", {"event": "x", "msg": "MRN0098765", "PatientName": "A"})
    assert event == {"event": "x", "msg": "[redacted]"}
    forget_identifiers()
