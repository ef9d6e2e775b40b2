"""``triage-node studies``: what the node has received, and what it decided about it.

Patient identifiers are not printed: study and series UIDs identify the objects.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from triage_node.cli.app import app
from triage_node.cli.common import settings_or_exit
from triage_node.db.models import Job, Study
from triage_node.db.session import make_engine, make_sessionmaker


def list_studies(session: Session, limit: int | None = None) -> list[dict[str, Any]]:
    """Received studies, newest first, with their series and each series' latest job.

    Returns plain dicts (the ``--json`` output): study UID, date, description,
    calling AE, received time; per series: UID, number, modality, description,
    instance count (received / expected), state, completion reason, selection decision
    and reason, and the latest job's id, version, state and queue.
    """
    query = select(Study).options(selectinload(Study.series)).order_by(Study.received_at.desc())
    if limit:
        query = query.limit(limit)
    studies = session.scalars(query).all()
    series_ids = [s.id for st in studies for s in st.series]
    latest_jobs: dict[int, Job] = {}
    if series_ids:
        newest = (
            select(Job.series_id, func.max(Job.version).label("version"))
            .where(Job.series_id.in_(series_ids))
            .group_by(Job.series_id)
            .subquery()
        )
        jobs = session.scalars(
            select(Job).join(
                newest, (Job.series_id == newest.c.series_id) & (Job.version == newest.c.version)
            )
        ).all()
        latest_jobs = {job.series_id: job for job in jobs}
    out = []
    for study in studies:
        series_out = []
        for series in study.series:
            job = latest_jobs.get(series.id)
            series_out.append(
                {
                    "series_uid": series.series_uid,
                    "series_number": series.series_number,
                    "modality": series.modality,
                    "description": series.description,
                    "sop_class_uid": series.sop_class_uid,
                    "instances": series.instance_count,
                    "expected_instances": series.expected_instances,
                    "state": series.state,
                    "completion_reason": series.completion_reason,
                    "selection": series.selection,
                    "selection_reason": series.selection_reason,
                    "job": None
                    if job is None
                    else {
                        "id": job.id,
                        "version": job.version,
                        "state": job.state,
                        "queue": job.queue,
                    },
                }
            )
        out.append(
            {
                "study_uid": study.study_uid,
                "study_date": study.study_date,
                "description": study.study_description,
                "calling_ae": study.calling_ae,
                "received_at": study.received_at.isoformat() if study.received_at else None,
                "series": series_out,
            }
        )
    return out


@app.command()
def studies(
    data_dir: Path | None = typer.Option(None, "--data-dir", help="Data directory (TRIAGE_DATA_DIR)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    limit: int = typer.Option(50, "--limit", help="Newest N studies (0: all)."),
) -> None:
    """List received studies with their series, counts, states and selection decisions."""
    settings = settings_or_exit(data_dir=data_dir)
    engine = make_engine(settings.effective_database_url)
    try:
        with make_sessionmaker(engine)() as session:
            rows = list_studies(session, limit or None)
    finally:
        engine.dispose()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(rows)} studies", show_lines=False)
    table.add_column("study / series UID", no_wrap=True)
    for column in ("#", "mod", "description", "instances", "state", "selection", "reason", "job"):
        table.add_column(column, overflow="fold")
    for study in rows:
        table.add_row(
            study["study_uid"], "", "", study["description"] or "", "", "",
            "", f"from {study['calling_ae'] or '?'} {study['received_at'] or ''}", "",
            style="bold",
        )
        for s in study["series"]:
            expected = f"/{s['expected_instances']}" if s["expected_instances"] else ""
            job = s["job"]
            table.add_row(
                "  " + s["series_uid"],
                str(s["series_number"] or ""),
                s["modality"] or "",
                s["description"] or "",
                f"{s['instances']}{expected}",
                s["state"] + (f" ({s['completion_reason']})" if s["completion_reason"] else ""),
                s["selection"] or "",
                s["selection_reason"] or "",
                f"#{job['id']} v{job['version']} {job['state']} {job['queue']}" if job else "",
            )
    Console(width=max(200, Console().width)).print(table)
