"""Log blinding (issue 17, finding 5): identifier values a peer sends must not make the
log scrubber redact the log's own structure.

An OtherPatientIDs value of ``info\\warning\\association finished`` once made the
scrubber redact ``level``, ``event`` and the peer in every later line. Here a real
``triage-node serve`` (JSON logs at DEBUG) receives such values by C-STORE; the lines
after it keep their level, event and peer, while the genuine identifiers of the same
data set are still redacted where they appear (``instance stored`` logs a SOP Instance
UID that embeds the PatientID). The in-process tests pin the rules one by one.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator

import pytest
import structlog
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from tests.ingest_support import ct_dataset
from tests.node_process import NodeProcess
from triage_node.log_scrub import LEVELS, PER_DATASET, REDACTED
from triage_node.logs import configure_logging, forget_identifiers, get_logger, remember_identifiers

#: Values chosen to blind the log: levels, event messages and field names the node uses,
#: its own AE title, the peer's address and AE title, small numbers and common words.
HOSTILE_IDS = [
    "info", "warning", "association finished", "debug", "error", "instance stored",
    "association", "finished", "level", "event", "peer", "logger", "timestamp",
    "127.0.0.1", "HOSTILE_SCU", "TRIAGE_NODE", "2024", "11112", "None", "true", "1",
]
GENUINE_ID = "7731904512"  # a numeric MRN, long enough to be an identifier
GENUINE_NAME = "Quorvandel^Ysolde"


def _hostile_dataset() -> Dataset:
    ds = ct_dataset(generate_uid(), generate_uid(), 0, sop_uid=f"1.2.3.4.{GENUINE_ID}.1")
    ds.PatientID = GENUINE_ID
    ds.PatientName = GENUINE_NAME
    ds.OtherPatientIDs = HOSTILE_IDS
    return ds


def _send(port: int, calling_ae: str, ds: Dataset) -> int:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="TRIAGE_NODE")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def _finished(node: NodeProcess) -> list[dict]:
    return [line for line in _json_lines(node.log_text()) if line.get("event") == "association finished"]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    data = tmp_path_factory.mktemp("hostile-logs") / "data"
    with NodeProcess(data, env={"TRIAGE_LOG_LEVEL": "DEBUG"}) as running:
        yield running


def test_hostile_other_patient_ids_do_not_blind_a_running_nodes_log(node: NodeProcess) -> None:
    assert _send(node.dicom_port, "HOSTILE_SCU", _hostile_dataset()) == 0x0000
    # Lines after the hostile object: a second sender's association, and the timers.
    normal = ct_dataset(generate_uid(), generate_uid(), 0)
    assert _send(node.dicom_port, "CT_SCANNER", normal) == 0x0000
    deadline = time.monotonic() + 30
    while len(_finished(node)) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    finished = _finished(node)
    assert [line["calling_ae"] for line in finished] == ["HOSTILE_SCU", "CT_SCANNER"]
    assert all(line["peer"] == "127.0.0.1" and line["level"] == "info" for line in finished)

    text = node.log_text()
    lines = _json_lines(text)
    assert len(lines) > 5
    for line in lines:
        assert line["level"] in LEVELS, line
        assert REDACTED not in line["event"], line
        assert REDACTED not in line.get("logger", ""), line
        assert line.get("peer", "127.0.0.1") == "127.0.0.1", line
        assert line.get("calling_ae", "?") in ("HOSTILE_SCU", "CT_SCANNER", "?"), line  # ? before the RQ
    # The genuine identifiers of the same data set are still redacted where they appear.
    stored = [line for line in lines if line["event"] == "instance stored" and "1.2.3.4." in line["sop_uid"]]
    assert [line["sop_uid"] for line in stored] == [f"1.2.3.4.{REDACTED}.1"]
    for secret in (GENUINE_ID, "Quorvandel", "Ysolde"):
        assert secret not in text
    assert node.alive


# -- the rules, in process ---------------------------------------------------------------
@pytest.fixture()
def json_log() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging("DEBUG", "json", stream=stream)
    forget_identifiers()
    yield stream
    forget_identifiers()
    structlog.reset_defaults()
    logging.getLogger().handlers.clear()


def _lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def _patient(patient_id: str, other_ids: list[str] | None = None, name: str = "Brannigan^Odalys") -> Dataset:
    ds = Dataset()
    ds.PatientName = name
    ds.PatientID = patient_id
    if other_ids:
        ds.OtherPatientIDs = other_ids
    return ds


def test_the_nodes_vocabulary_is_never_remembered(json_log: io.StringIO) -> None:
    with structlog.contextvars.bound_contextvars(peer="10.1.2.3", calling_ae="CT_ED_1"):
        remember_identifiers(_patient("MRN0044321", HOSTILE_IDS + ["10.1.2.3", "CT_ED_1"]))
        log = get_logger("triage_node.ingest.association")
        log.info("association finished", ending="released", series=1, calling_ae="CT_ED_1")
        log.warning("could not read MRN0044321 for Odalys Brannigan")
    finished, warning = _lines(json_log)
    assert finished == {**finished, "level": "info", "event": "association finished",
                        "peer": "10.1.2.3", "calling_ae": "CT_ED_1", "ending": "released"}
    assert warning["level"] == "warning"
    assert warning["event"] == f"could not read {REDACTED} for {REDACTED}"


def test_values_are_redacted_as_whole_words_only(json_log: io.StringIO) -> None:
    remember_identifiers(_patient("KORA7"))
    get_logger("t").info("KORA7 KORA77 xKORA7 KORA7.dcm (KORA7)")
    (line,) = _lines(json_log)
    assert line["event"] == f"{REDACTED} KORA77 xKORA7 {REDACTED}.dcm ({REDACTED})"


def test_one_peer_flooding_identifiers_cannot_evict_another_peers(json_log: io.StringIO) -> None:
    remember_identifiers(_patient("MRN5550123"), source="10.0.0.5")
    for n in range(400):  # 400 data sets of made-up OtherPatientIDs from one address
        remember_identifiers(_patient(f"FLOOD{n:05d}", [f"X{n:05d}{k:03d}" for k in range(100)],
                                      name=f"Floodson^Agent{n}"), source="10.9.9.9")
    get_logger("t").info("late error quoting MRN5550123 and Brannigan")
    (line,) = _lines(json_log)
    assert line["event"] == f"late error quoting {REDACTED} and {REDACTED}"


def test_one_data_set_gives_at_most_per_dataset_values_identifiers_first(json_log: io.StringIO) -> None:
    padded = [f"PAD{k:05d}" for k in range(500)]
    ds = _patient("MRN7000001", padded)
    ds.AccessionNumber = "ACC9988776"  # after the padded list in PHI_KEYWORDS, kept all the same
    remember_identifiers(ds, source="10.0.0.6")
    get_logger("t").info(f"MRN7000001 ACC9988776 {padded[0]} {padded[PER_DATASET]}")
    (line,) = _lines(json_log)
    assert line["event"] == f"{REDACTED} {REDACTED} {REDACTED} {padded[PER_DATASET]}"
