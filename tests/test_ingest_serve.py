"""``triage-node serve`` as a real process: old schema refused, SIGKILL mid-association, SIGTERM, ``studies``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import select

from tests.ingest_support import (
    PATIENT_ID,
    PATIENT_NAME,
    ct_dataset,
    database_url,  # noqa: F401  (fixture)
    dataset_bytes,
    part10,
)
from triage_node.db.models import Instance, Series
from triage_node.db.session import make_engine, make_sessionmaker
from triage_node.ingest.store import SUCCESS
from triage_node.peers import echoscu, free_port, wait_until

AET = "TRIAGE_NODE"
CLI = [str(Path(sys.executable).parent / "triage-node")]


class ServeProcess:
    def __init__(self, data_dir: Path, env: dict[str, str]) -> None:
        self.data_dir = data_dir
        self.env = env
        self.port = free_port()
        self.http_port = free_port()
        self.log = data_dir.parent / f"serve-{self.port}.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> ServeProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [*CLI, "serve", "--data-dir", str(self.data_dir), "--dicom-port", str(self.port),
                 "--http-port", str(self.http_port)],
                stdout=log, stderr=subprocess.STDOUT, env=self.env,
            )
        wait_until(lambda: echoscu("127.0.0.1", self.port, AET, timeout=2), "triage-node serve",
                   timeout=60, process=self.process, log=self.log)
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def node_env(database_url: str, tmp_path: Path) -> Iterator[dict[str, str]]:  # noqa: F811
    env = {**os.environ, "TRIAGE_DATABASE_URL": database_url, "TRIAGE_LOG_FORMAT": "json",
           "TRIAGE_MIN_FREE_DISK_MB": "1", "TRIAGE_STABILITY_SECONDS": "60"}
    env.pop("TRIAGE_CONFIG_FILE", None)
    subprocess.run([*CLI, "db", "upgrade", "--data-dir", str(tmp_path / "data")], env=env,
                   check=True, capture_output=True)
    yield env


def _scu() -> AE:
    ae = AE(ae_title="CT_SCANNER")
    ae.add_requested_context(CTImageStorage)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    return ae


def test_serve_refuses_a_database_without_the_current_schema(tmp_path: Path) -> None:
    env = {**os.environ, "TRIAGE_DATABASE_URL": f"sqlite:///{tmp_path / 'old.db'}"}
    proc = subprocess.run(
        [*CLI, "serve", "--data-dir", str(tmp_path / "d"), "--dicom-port", str(free_port())],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "triage-node db upgrade" in proc.stderr and "schema" in proc.stderr
    assert not echoscu("127.0.0.1", 1, AET, timeout=1)  # nothing left listening


def test_sigkill_mid_association_loses_no_acknowledged_instance(
    node_env: dict[str, str], tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    study, series = generate_uid(), generate_uid()
    datasets = [ct_dataset(study, series, i, size=256) for i in range(40)]
    sent = {ds.SOPInstanceUID: part10(ds) for ds in datasets}
    node = ServeProcess(data_dir, node_env).start()
    acknowledged: list[str] = []
    kill_after = 6
    enough = threading.Event()

    def send() -> None:
        assoc = _scu().associate("127.0.0.1", node.port, ae_title=AET)
        for ds in datasets:
            try:
                status = assoc.send_c_store(ds)
            except (RuntimeError, OSError):
                return
            if status and status.Status == SUCCESS:
                acknowledged.append(ds.SOPInstanceUID)
                if len(acknowledged) >= kill_after:
                    enough.set()
            elif not assoc.is_established:
                return

    sender = threading.Thread(target=send)
    sender.start()
    assert enough.wait(60), node.output()[-2000:]
    node.process.send_signal(signal.SIGKILL)  # mid-association, probably mid-C-STORE
    node.process.wait(10)
    sender.join(30)
    acked = list(acknowledged)
    assert kill_after <= len(acked) < len(datasets)

    restarted = ServeProcess(data_dir, node_env).start()
    try:
        engine = make_engine(node_env["TRIAGE_DATABASE_URL"])
        with make_sessionmaker(engine)() as session:
            rows = {r.sop_uid: r for r in session.scalars(select(Instance))}
        engine.dispose()
        for sop in acked:
            assert sop in rows, f"acknowledged {sop} has no row after restart"
            on_disk = Path(rows[sop].path).read_bytes()
            assert dataset_bytes(on_disk) == dataset_bytes(sent[sop])
        # Nothing half-written under a final name, and the interrupted temp file is gone.
        spool = data_dir / "spool"
        assert not list(spool.rglob(".incoming-*"))
        for path in spool.rglob("*.dcm"):
            dcmread(BytesIO(path.read_bytes()), stop_before_pixels=False)
        # The sender retries everything; the node stores what it missed.
        assoc = _scu().associate("127.0.0.1", restarted.port, ae_title=AET)
        assert all(assoc.send_c_store(ds).Status == SUCCESS for ds in datasets)
        assoc.release()
        engine = make_engine(node_env["TRIAGE_DATABASE_URL"])
        with make_sessionmaker(engine)() as session:
            assert session.scalars(select(Series.instance_count)).one() == len(datasets)
            assert len(session.scalars(select(Instance)).all()) == len(datasets)
        engine.dispose()

        studies = subprocess.run([*CLI, "studies", "--data-dir", str(data_dir), "--json"],
                                 env=node_env, capture_output=True, text=True, timeout=60)
        assert studies.returncode == 0, studies.stderr
        [listed] = json.loads(studies.stdout)
        assert listed["study_uid"] == study and listed["calling_ae"] == "CT_SCANNER"
        [listed_series] = listed["series"]
        assert listed_series["series_uid"] == series and listed_series["instances"] == 40
        table = subprocess.run([*CLI, "studies", "--data-dir", str(data_dir)], env=node_env,
                               capture_output=True, text=True, timeout=60)
        assert table.returncode == 0 and series in table.stdout
        assert PATIENT_NAME not in studies.stdout + table.stdout

        restarted.process.send_signal(signal.SIGTERM)
        assert restarted.process.wait(30) == 0
    finally:
        if restarted.process.poll() is None:
            restarted.process.kill()
            restarted.process.wait(10)
    output = node.output() + restarted.output()
    assert PATIENT_NAME not in output and PATIENT_ID not in output
    events = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    finished = [e for e in events if e.get("event") == "association finished"]
    assert finished and finished[-1]["calling_ae"] == "CT_SCANNER"
    assert finished[-1]["peer"] == "127.0.0.1"
    assert any(e.get("event") == "stopped" for e in events)


def test_rejected_instance_logs_carry_the_association_context(
    node_env: dict[str, str], tmp_path: Path
) -> None:
    node = ServeProcess(tmp_path / "data", node_env).start()
    try:
        ds = ct_dataset(generate_uid(), generate_uid(), 0)
        ds.SOPInstanceUID = "1.2.3.x"
        assoc = _scu().associate("127.0.0.1", node.port, ae_title=AET)
        assert assoc.send_c_store(ds).Status == 0xC001
        assoc.release()
    finally:
        node.process.send_signal(signal.SIGINT)
        assert node.process.wait(30) == 0
    events = [json.loads(line) for line in node.output().splitlines() if line.startswith("{")]
    [refused] = [e for e in events if e.get("event") == "instance refused"]
    assert refused["calling_ae"] == "CT_SCANNER" and refused["peer"] == "127.0.0.1"
    assert refused["status"] == "0xC001"
    assert PATIENT_NAME not in node.output()


def test_serve_says_so_when_the_dicom_port_is_taken(node_env: dict[str, str], tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [*CLI, "serve", "--data-dir", str(tmp_path / "data"), "--dicom-port", str(port),
             "--no-api"],
            env=node_env, capture_output=True, text=True, timeout=60,
        )
    assert proc.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr
