"""``triage-node demo``: the whole loop on one machine, no services, one command.

1. Fresh data directory (a temporary one unless ``--data-dir``), ``db upgrade``.
2. Synthetic head CT studies, positive and negative (:func:`triage_node.synth.study.write_dataset`).
3. A local PACS: a pynetdicom Storage SCP (PS3.4 Annex B) in this process, writing what
   it receives to ``<data>/pacs``.
4. The node (``triage-node serve``) and a real Celery worker (``triage-node worker``) as
   subprocesses on the embedded filesystem broker, the PACS as their delivery destination.
5. Each study sent by C-STORE over one association, as a scanner does.
6. Wait (with a deadline) until every job is done and its objects delivered, then print
   the worklist in priority order with findings and stage timings, and say where the SR
   and overlays are; ``--out`` gets the received objects (.dcm) and PNG renders.

The local PACS, the sender and the process handling are in ``worker.demo_parts``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import select

from triage_node import CLASSES
from triage_node.logs import get_logger
from worker.demo_parts import (
    NODE_AE,
    DemoError,
    LocalPACS,
    Processes,
    free_port,
    seconds_between,
    send_files,
    wait_for_port,
)

log = get_logger(__name__)

def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


# -- the run -------------------------------------------------------------------------------
@dataclass
class DemoResult:
    """What the demo did: one row per study, in worklist order, and where things are."""

    rows: list[dict[str, Any]]
    data_dir: Path
    pacs_dir: Path
    out_dir: Path | None
    seconds: float
    received: int


def _study_files(root: Path, study_uid: str) -> list[Path]:
    return sorted((root / study_uid).rglob("*.dcm"))


def collect_rows(settings: Any, session_factory: Any, truths: dict[str, Any]) -> list[dict[str, Any]]:
    """The worklist in priority order, with each study's result and stage timings."""
    from triage_node.db.models import Job, Result, Study
    from triage_node.worklist.queries import WorklistFilter, list_worklist

    rows = []
    with session_factory() as session:
        page, _ = list_worklist(session, settings, WorklistFilter(limit=100))
        for wl in page:
            study: Study = wl.study
            job = session.scalars(
                select(Job).where(Job.study_id == study.id).order_by(Job.id.desc())
            ).first()
            result: Result | None = wl.result
            truth = truths.get(study.study_uid)
            rows.append({
                "priority": wl.entry.priority_class,
                "score": round(float(wl.entry.score), 3),
                "accession": study.accession_number,
                "study_uid": study.study_uid,
                "truth": (list(truth.subtypes) or ["none"]) if truth is not None else None,
                "state": job.state if job else "no job",
                "error": (job.error or "").splitlines()[0][:300] if job and job.error else None,
                "positive": bool(result.positive) if result else None,
                "probabilities": dict(result.study_probabilities) if result else {},
                "decisions": dict(result.decisions) if result else {},
                "sr": str(Path(result.output_dir) / "sr.dcm") if result and result.output_dir else None,
                "overlays": len(result.overlay_sop_uids) if result else 0,
                "timings": {
                    "complete_s": seconds_between(job.last_instance_at, job.series_complete_at) if job else None,
                    "queued_s": seconds_between(job.series_complete_at, job.started_at) if job else None,
                    "inference_s": seconds_between(job.started_at, job.inferred_at) if job else None,
                    "report_s": seconds_between(job.inferred_at, job.reported_at) if job else None,
                    "delivery_s": seconds_between(job.reported_at, job.delivered_at) if job else None,
                    "total_s": seconds_between(job.last_instance_at, job.delivered_at) if job else None,
                },
            })
    return rows


def _all_done(session_factory: Any, n_studies: int) -> bool:
    from triage_node.db.models import Job, JobState, OutboxItem, OutboxState

    with session_factory() as session:
        jobs = session.scalars(select(Job).where(Job.state != JobState.superseded)).all()
        if len({j.study_id for j in jobs}) < n_studies:
            return False
        if any(j.state in (JobState.queued, JobState.running) for j in jobs):
            return False
        pending = session.scalars(select(OutboxItem).where(OutboxItem.state == OutboxState.pending)).first()
        return pending is None


def export_received(pacs: LocalPACS, out: Path) -> list[Path]:
    """Copy what the PACS received to ``out/<accession>_<study>/`` and render PNGs.

    Per study: ``SR.dcm`` with ``SR.json`` (its findings, from
    :func:`worker.pipeline.sr_codes.summary`) and ``overlay_<n>_<class>.dcm`` with a ``.png``
    render of each overlay image.
    """
    from worker.pipeline.overlay import to_png
    from worker.pipeline.sr_codes import overlay_class, summary

    written = []
    for sop_uid, path in sorted(pacs.received.items()):
        ds: Dataset = pydicom.dcmread(path)
        folder = out / f"{ds.get('AccessionNumber') or 'study'}_{str(ds.StudyInstanceUID)[-6:]}"
        folder.mkdir(parents=True, exist_ok=True)
        if ds.get("Modality") == "SR":
            stem = "SR" if not (folder / "SR.dcm").exists() else f"SR_{sop_uid[-6:]}"
            (folder / f"{stem}.json").write_text(json.dumps(summary(ds), indent=2, default=str) + "\n")
        else:
            stem = f"overlay_{int(ds.get('InstanceNumber', 0)):02d}_{overlay_class(ds) or 'image'}"
        target = folder / f"{stem}.dcm"
        shutil.copyfile(path, target)
        written.append(target)
        if ds.get("Modality") != "SR" and "PixelData" in ds:
            png = folder / f"{stem}.png"
            to_png(ds, str(png))
            written.append(png)
    return written


def run_demo(
    *,
    out: Path | None = None,
    n_studies: int = 4,
    data_dir: Path | None = None,
    timeout: float = 110.0,
    seed: int = 2026,
    print_table: bool = True,
) -> int:
    """Run the demo; returns the exit code (0: every study triaged and delivered)."""
    result = demo(out=out, n_studies=n_studies, data_dir=data_dir, timeout=timeout, seed=seed)
    if print_table:
        print_worklist(result)
    bad = [r for r in result.rows if r["state"] != "done"]
    return 1 if bad else 0


def demo(
    *,
    out: Path | None = None,
    n_studies: int = 4,
    data_dir: Path | None = None,
    timeout: float = 110.0,
    seed: int = 2026,
) -> DemoResult:
    """The demo without printing; see the module docstring."""
    from triage_node.config import load_settings
    from triage_node.db import schema
    from triage_node.db.session import make_engine, make_sessionmaker
    from triage_node.synth.study import write_dataset

    t0 = time.monotonic()
    data_dir = Path(data_dir or tempfile.mkdtemp(prefix="triage-demo-")).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    logs = data_dir / "logs"
    logs.mkdir(exist_ok=True)
    pacs = LocalPACS(data_dir / "pacs").start()
    dicom_port, http_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_") or k in (
        "TRIAGE_MODEL_REPOSITORY", "TRIAGE_MODEL_CARD", "TRIAGE_INFERENCE_THREADS")}
    env.update({
        "TRIAGE_DATA_DIR": str(data_dir),
        "TRIAGE_DICOM_PORT": str(dicom_port),
        "TRIAGE_HTTP_PORT": str(http_port),
        "TRIAGE_AE_TITLE": NODE_AE,
        "TRIAGE_DESTINATIONS": json.dumps([pacs.destination()]),
        "TRIAGE_LOG_FORMAT": "json",
        "TRIAGE_LOG_LEVEL": "INFO",
        "TRIAGE_STABILITY_SECONDS": "3",
        # A throwaway node: its own random secret (there is no default one).
        "TRIAGE_SECRET_KEY": os.urandom(24).hex(),
        "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "2"),
    })
    settings = load_settings(
        data_dir=data_dir,
        model_repository=env.get("TRIAGE_MODEL_REPOSITORY"),
        model_card=env.get("TRIAGE_MODEL_CARD"),
        destinations=[pacs.destination()],
        secret_key=env["TRIAGE_SECRET_KEY"],
    )
    if not Path(settings.model_card).is_file():
        pacs.stop()
        raise DemoError(f"no model card at {settings.model_card}: export or train the model first "
                        "(see README, `triage-node train`)")
    schema.upgrade(settings.effective_database_url)
    engine = make_engine(settings.effective_database_url)
    session_factory = make_sessionmaker(engine)
    procs = Processes(env, logs)
    try:
        studies_dir = data_dir / "studies"
        truths = write_dataset(studies_dir, n_studies, seed, positive_fraction=0.5,
                               rows=512, components=("localizer", "axial"))
        procs.start("worker", "worker", "--concurrency", "1")
        procs.start("serve", "serve", "--no-api")
        wait_for_port(dicom_port, procs)
        for truth in truths:
            send_files(_study_files(studies_dir, truth.study_uid), "127.0.0.1", dicom_port, NODE_AE)
        deadline = time.monotonic() + timeout
        while not _all_done(session_factory, len(truths)):
            procs.check()
            if time.monotonic() > deadline:
                raise DemoError(f"results not complete after {timeout:.0f} s (logs in {logs})")
            time.sleep(0.25)
        rows = collect_rows(settings, session_factory, {t.study_uid: t for t in truths})
    finally:
        procs.stop()
        pacs.stop()
        engine.dispose()
    out_dir = None
    if out is not None:
        out_dir = Path(out).resolve()
        export_received(pacs, out_dir)
    return DemoResult(rows, data_dir, pacs.folder, out_dir, time.monotonic() - t0, len(pacs.received))


#: Short names of the classes for the table (ICH and its five subtypes).
SHORT = {"any": "ICH", "epidural": "EDH", "intraparenchymal": "IPH", "intraventricular": "IVH",
         "subarachnoid": "SAH", "subdural": "SDH"}


def findings_text(row: dict[str, Any]) -> str:
    """``ICH .91* EDH .12 ...``: probability per class, ``*`` where present at the operating point."""
    probs, decisions = row["probabilities"], row["decisions"]
    return " ".join(
        f"{SHORT[c]} {probs[c]:.2f}{'*' if decisions.get(c) else ''}" for c in CLASSES if c in probs
    ) or "-"


def print_worklist(result: DemoResult) -> None:
    """The worklist as a rich table, then where the objects are."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 150))
    table = Table(title="Worklist, most urgent first (* = present at the operating point)")
    for col in ("#", "priority", "accession", "truth", "AI findings", "state",
                "complete", "queued", "infer", "report", "deliver", "total s"):
        table.add_column(col, overflow="fold", no_wrap=col in ("priority", "accession"))
    for i, row in enumerate(result.rows, 1):
        t = row["timings"]
        truth = [SHORT.get(x, x) for x in (row["truth"] or ["?"])]
        table.add_row(
            str(i), row["priority"], row["accession"] or "-", ", ".join(truth),
            findings_text(row), str(row["state"]), _fmt(t["complete_s"]), _fmt(t["queued_s"]),
            _fmt(t["inference_s"]), _fmt(t["report_s"]), _fmt(t["delivery_s"]), _fmt(t["total_s"]),
            style="bold red" if row["priority"] == "STAT-AI" else None,
        )
    console.print(table)
    for i, row in enumerate(result.rows, 1):
        if row.get("error"):
            console.print(f"[red]#{i} failed:[/red] {row['error']}")
    console.print("Stage times in seconds: complete = last image -> series complete, queued = complete -> "
                  "worker start, total = last image -> SR and overlays accepted by the PACS.")
    console.print(f"Demo took {result.seconds:.0f} s.")
    console.print(f"SR and overlays written by the worker: {result.data_dir / 'results'}/<job id>/")
    console.print(f"Received by the local PACS ({result.received} objects): {result.pacs_dir}")
    if result.out_dir is not None:
        console.print(f"Copied, with PNG renders of the overlays and SR summaries: {result.out_dir}")
    console.print("Synthetic phantom studies; the model is for research use only: not a medical device, "
                  "not for clinical use.")
