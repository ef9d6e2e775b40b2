"""One benchmark site: a fresh node, its Celery workers and a local PACS, for one backend.

The node (``triage-node serve``) and ``n`` workers (``triage-node worker``, embedded
filesystem broker) run as subprocesses on a temporary data directory, delivering to a
local PACS in this process; `BenchSite` sends studies as a scanner does and reads what
happened back from the database the node writes (SR accepted at the PACS, failed jobs,
stage times from the job timestamps). Kept apart from ``worker.bench_e2e`` (latency per
backend) because ``worker.bench_scale`` (throughput per number of workers) runs the same
site.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
from sqlalchemy import select

from triage_node.config import load_settings
from triage_node.logs import get_logger
from triage_node.timeutil import utcnow

__all__ = ["BenchSite", "make_studies"]

log = get_logger(__name__)


class BenchSite:
    """Node + worker subprocesses, local PACS, and the database they write, for one backend."""

    def __init__(self, backend: str, model_repository: Path, model_card: Path, triton_url: str | None,
                 workers: int = 1) -> None:
        from triage_node.db import schema
        from triage_node.db.session import make_engine, make_sessionmaker
        from worker.demo_parts import NODE_AE, LocalPACS, Processes, free_port

        self.data_dir = Path(tempfile.mkdtemp(prefix=f"triage-bench-{backend}-"))
        (self.data_dir / "logs").mkdir()
        self.pacs = LocalPACS(self.data_dir / "pacs").start()
        self.dicom_port = free_port()
        self.node_ae = NODE_AE
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
        env.update({
            "TRIAGE_DATA_DIR": str(self.data_dir),
            "TRIAGE_DICOM_PORT": str(self.dicom_port),
            "TRIAGE_AE_TITLE": NODE_AE,
            "TRIAGE_DESTINATIONS": json.dumps([self.pacs.destination()]),
            "TRIAGE_MODEL_REPOSITORY": str(model_repository),
            "TRIAGE_MODEL_CARD": str(model_card),
            "TRIAGE_INFERENCE_BACKEND": backend,
            "TRIAGE_INFERENCE_THREADS": "2",
            "TRIAGE_LOG_FORMAT": "json",
            "TRIAGE_LOG_LEVEL": "WARNING",
            "TRIAGE_SECRET_KEY": os.urandom(24).hex(),  # a throwaway node's own secret
            "OMP_NUM_THREADS": "2",
        })
        if triton_url:
            env["TRIAGE_TRITON_URL"] = triton_url
        settings = load_settings(data_dir=self.data_dir)
        schema.upgrade(settings.effective_database_url)
        self.engine = make_engine(settings.effective_database_url)
        self.session_factory = make_sessionmaker(self.engine)
        self.procs = Processes(env, self.data_dir / "logs")
        self.workers = workers

    def start(self) -> None:
        from worker.demo_parts import wait_for_port

        for i in range(self.workers):  # each a separate `triage-node worker`, as on separate machines
            # One beat (periodic tasks) per site: the others share its schedule file's folder.
            extra = () if i == 0 else ("--no-beat",)
            self.procs.start("worker" if i == 0 else f"worker-{i + 1}", "worker", "--concurrency", "1", *extra)
        self.procs.start("serve", "serve", "--no-api")
        wait_for_port(self.dicom_port, self.procs)

    def send(self, files: list[Path]) -> datetime:
        """Send one study over one association; returns when the last image was acknowledged.

        DCMTK ``storescu`` (with ``TCP_NODELAY=1``) when installed: one process per study,
        so studies sent together really travel in parallel; pynetdicom otherwise.
        """
        from triage_node.peers import storescu
        from worker.demo_parts import DemoError, send_files

        if shutil.which("storescu") is None:
            send_files(files, "127.0.0.1", self.dicom_port, self.node_ae)
            return utcnow()
        # "-x=" is storescu's own default proposal, stated so that no file is read for one.
        proc = storescu(files, "127.0.0.1", self.dicom_port, self.node_ae, calling_aet="BENCH_CT",
                        extra_args=("-x=",), timeout=300)
        at = utcnow()
        if proc.returncode != 0:
            raise DemoError(f"storescu exited with {proc.returncode}: {(proc.stdout + proc.stderr)[-500:]}")
        return at

    def sr_accepted(self, study_uid: str) -> datetime | None:
        from triage_node.db.models import Result, Study

        with self.session_factory() as session:
            sr_uid = session.scalar(
                select(Result.sr_sop_uid).join(Study, Study.id == Result.study_id)
                .where(Study.study_uid == study_uid)
            )
        return self.pacs.accepted_at.get(sr_uid) if sr_uid else None

    def failed(self, study_uid: str) -> str | None:
        """The error of the study's job when it failed for good."""
        from triage_node.db.models import Job, JobState, Study

        with self.session_factory() as session:
            return session.scalar(
                select(Job.error).join(Study, Study.id == Job.study_id)
                .where(Study.study_uid == study_uid, Job.state == JobState.failed)
            )

    def wait_sr(self, study_uids: list[str], timeout: float) -> tuple[dict[str, datetime], dict[str, str]]:
        """Wait for each study's SR at the PACS; returns (accepted times, errors of failed jobs)."""
        from worker.demo_parts import DemoError

        deadline = time.monotonic() + timeout
        done: dict[str, datetime] = {}
        failed: dict[str, str] = {}
        while len(done) + len(failed) < len(study_uids):
            self.procs.check()
            for uid in study_uids:
                if uid in done or uid in failed:
                    continue
                if (at := self.sr_accepted(uid)) is not None:
                    done[uid] = at
                elif (error := self.failed(uid)) is not None:
                    failed[uid] = error.splitlines()[0][:200]
                    log.error("bench.job_failed", study_uid=uid, error=failed[uid])
            if time.monotonic() > deadline:
                raise DemoError(f"{len(study_uids) - len(done) - len(failed)} SRs not delivered "
                                f"after {timeout:.0f} s")
            time.sleep(0.05)
        return done, failed

    def stages(self) -> dict[str, float | None]:
        """Median seconds of each stage over this site's jobs (from the Job timestamps)."""
        from triage_node.db.models import Job, JobState
        from worker.demo_parts import seconds_between

        with self.session_factory() as session:
            jobs = session.scalars(select(Job).where(Job.state == JobState.done)).all()
            pairs = {
                "complete_s": [(j.last_instance_at, j.series_complete_at) for j in jobs],
                "enqueue_s": [(j.series_complete_at, j.enqueued_at) for j in jobs],
                "queue_wait_s": [(j.enqueued_at, j.started_at) for j in jobs],
                "load_and_infer_s": [(j.started_at, j.inferred_at) for j in jobs],
                "report_s": [(j.inferred_at, j.reported_at) for j in jobs],
                "deliver_s": [(j.reported_at, j.delivered_at) for j in jobs],
            }
        out = {}
        for name, values in pairs.items():
            secs = [s for a, b in values if (s := seconds_between(a, b)) is not None]
            out[name] = round(statistics.median(secs), 3) if secs else None
        return out

    def enqueue_latencies(self) -> list[float]:
        """Seconds from the last instance received to the job on the queue, per job.

        The node's own figure (ingest target <= 1 s on the fast path): it covers the
        completeness decision, series selection, the job row and the send to the broker.
        """
        from triage_node.db.models import Job
        from worker.demo_parts import seconds_between

        with self.session_factory() as session:
            jobs = session.scalars(select(Job).where(Job.enqueued_at.is_not(None))).all()
            pairs = [(j.last_instance_at, j.enqueued_at) for j in jobs]
        return [s for a, b in pairs if (s := seconds_between(a, b)) is not None]

    def stop(self) -> None:
        self.procs.stop()
        self.pacs.stop()
        self.engine.dispose()


def make_studies(folder: Path, n: int, seed: int = 4242) -> tuple[list[tuple[str, list[Path]]], int]:
    """``n`` synthetic 512x512 studies (axial series only): [(study UID, files)], slices per study."""
    from triage_node.synth.study import write_dataset

    truths = write_dataset(folder, n, seed, positive_fraction=0.5, rows=512, components=("axial",))
    studies = [(t.study_uid, sorted((folder / t.study_uid).rglob("*.dcm"))) for t in truths]
    return studies, int(np.median([len(files) for _, files in studies]))
