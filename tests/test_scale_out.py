"""Scale-out on one machine: two listeners and two workers, one database, one broker.

Two ``triage-node serve`` processes (different DICOM and HTTP ports) and two
``triage-node worker`` processes share one PostgreSQL database, one Redis broker and one
data directory (spool and results), as several machines share them over the network and
shared storage (docs/PERFORMANCE.md, "Scale-out"). Each listener receives different
studies by C-STORE (DCMTK ``storescu``); each series arrives whole at one listener, whose
completeness timer closes it. Every study must end with exactly one job, one Result and
one SR, and both workers must have run jobs.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from sqlalchemy import func, select

from tests.node_process import AET, NodeProcess, WorkerProcess, shared_model_card
from tests.worker_support import write_ct_series
from triage_node.db.models import Job, JobState, Result, Study
from triage_node.peers import storescu, wait_until

STUDIES_PER_LISTENER = 3


@pytest.mark.timeout(150)
def test_two_listeners_and_two_workers_share_one_database_and_broker(
    tmp_path: Path, postgres_db: str, redis_url: str
) -> None:
    card = shared_model_card()
    data_dir = tmp_path / "shared"  # one spool/results folder, as on shared storage
    env = {
        "TRIAGE_MODEL_REPOSITORY": str(card.parent / "models"),
        "TRIAGE_MODEL_CARD": str(card),
    }
    listeners = [NodeProcess(data_dir, database_url=postgres_db, broker_url=redis_url, env=env)
                 for _ in range(2)]
    for i, node in enumerate(listeners):
        node.log_path = tmp_path / f"serve-{i}.log"
    assert listeners[0].dicom_port != listeners[1].dicom_port
    # One beat (periodic tasks) for the site; the second worker only consumes.
    workers = [WorkerProcess({**listeners[0].env_settings}, tmp_path / "worker-0.log"),
               WorkerProcess({**listeners[0].env_settings}, tmp_path / "worker-1.log", args=("--no-beat",))]
    sent: dict[str, tuple[int, str]] = {}  # study UID -> (listener index, series UID)
    try:
        for node in listeners:
            node.start()
        for worker in workers:
            worker.start()
        for i, node in enumerate(listeners):
            for k in range(STUDIES_PER_LISTENER):
                folder = tmp_path / f"study-{i}-{k}"
                paths = write_ct_series(folder, slices=10, size=64, seed=10 * i + k, bleed=k % 2 == 0)
                result = storescu(paths, "127.0.0.1", node.dicom_port, AET, calling_aet=f"CT{i}")
                assert result.returncode == 0, result.stdout + result.stderr
                study_uid, series_uid = _uids(paths[0])
                sent[study_uid] = (i, series_uid)
        total = len(sent)
        session_factory = listeners[0].session_factory

        def done() -> int:
            with session_factory() as session:
                return int(session.scalar(select(func.count()).select_from(Job)
                                          .where(Job.state == JobState.done)))

        wait_until(lambda: done() >= total, f"{total} jobs done", timeout=110, interval=0.5,
                   process=workers[0].process, log=workers[0].log_path)
        for node in listeners + workers:
            assert node.alive
    finally:
        for worker in workers:
            worker.stop()
        for node in listeners:
            node.stop()

    with session_factory() as session:
        studies = {s.id: s.study_uid for s in session.scalars(select(Study))}
        jobs = list(session.scalars(select(Job)))
        results = list(session.scalars(select(Result)))
    assert sorted(studies.values()) == sorted(sent)
    # Exactly one job per series (study), all done once, none duplicated by the two listeners.
    assert len(jobs) == total and all(j.state == JobState.done and j.version == 1 for j in jobs)
    assert all(j.attempts == 1 for j in jobs)
    assert len({j.task_id for j in jobs}) == total
    assert sorted(studies[r.study_id] for r in results) == sorted(sent)
    sr_files = sorted((data_dir / "results").glob("*/sr*.dcm"))
    assert len(sr_files) == total

    # Each job ran in exactly one worker, and both workers took jobs.
    ran = {i: {j.task_id for j in jobs if j.task_id in w.log_path.read_text(errors="replace")}
           for i, w in enumerate(workers)}
    assert ran[0] and ran[1], ran
    assert not ran[0] & ran[1] and ran[0] | ran[1] == {j.task_id for j in jobs}
    # Each study came in through the listener it was sent to, and that listener, not the
    # other, declared its series complete (completeness runs where the series arrived).
    with session_factory() as session:
        calling = {s.study_uid: s.calling_ae for s in session.scalars(select(Study))}
    assert calling == {uid: f"CT{i}" for uid, (i, _) in sent.items()}
    for i, node in enumerate(listeners):
        closed = set(re.findall(r'"event": "series.complete".*?"series_uid": "([0-9.]+)"', node.log_text()))
        closed |= set(re.findall(r'"series_uid": "([0-9.]+)"[^\n]*"event": "series.complete"', node.log_text()))
        mine = {series for i_, series in sent.values() if i_ == i}
        assert closed == mine, (i, closed, mine)


def _uids(path: Path) -> tuple[str, str]:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
