"""``triage-node retention [--dry-run] | run | hold | release``: what the node deletes."""

from __future__ import annotations

import getpass
import json
from pathlib import Path
from typing import Any

import typer

from triage_node.cli.app import app
from triage_node.cli.common import DATA_DIR, database_or_exit
from triage_node.retention import Plan, UnknownStudy, plan, run, set_legal_hold

retention_app = typer.Typer(
    help="Retention: report what would be deleted (--dry-run), delete it (run), legal hold.",
    invoke_without_command=True,
)
app.add_typer(retention_app, name="retention")

AS_JSON = typer.Option(False, "--json", help="Print JSON instead of a table.")


def plan_dict(p: Plan) -> dict[str, Any]:
    """The dry-run report: what would go and why, and what is kept past its age and why."""
    return {
        "at": p.now.isoformat(timespec="seconds"),
        "disk": p.disk.as_dict(),
        "studies": [v.as_dict(p.now) for v in p.studies],
        "kept": [v.as_dict(p.now) for v in p.kept],
        "result_folders": [{"job_id": r.job_id, "study_uid": r.study_uid} for r in p.results],
        "outbox_rows": p.outbox_rows,
        "hl7_rows": p.hl7_rows,
        "audit_rows": p.audit_rows,
        "audit_before": p.audit_before.isoformat(timespec="seconds") if p.audit_before else None,
    }


def _print_plan(report: dict[str, Any]) -> None:
    disk = report["disk"]
    typer.echo(f"disk: {disk['percent']}% of {disk['basis']} ({disk['used_bytes']} of {disk['total_bytes']} bytes)")
    for title, rows in (("would delete", report["studies"]), ("kept past their age", report["kept"])):
        typer.echo(f"{title}: {len(rows)} studies")
        for r in rows:
            typer.echo(f"  {r['study_uid']:<64}  {r['age_days']:>7} d  {r['instances']:>6} inst  "
                       f"{r['size_bytes']:>12} B  {r['reason']}")
    typer.echo(f"result folders: {len(report['result_folders'])}; delivered outbox rows: "
               f"{report['outbox_rows']} DICOM, {report['hl7_rows']} HL7; audit rows: {report['audit_rows']}")


@retention_app.callback()
def retention(
    ctx: typer.Context,
    dry_run: bool = typer.Option(False, "--dry-run", help="Report what a run would delete, and why."),
    as_json: bool = AS_JSON,
    data_dir: Path | None = DATA_DIR,
) -> None:
    """Without a command (or with --dry-run): report what a run would delete now; deletes nothing."""
    if ctx.invoked_subcommand is not None:
        if dry_run:
            typer.echo("--dry-run goes without a command", err=True)
            raise typer.Exit(2)
        return
    settings, engine, factory = database_or_exit(data_dir)
    try:
        report = plan_dict(plan(settings, factory))
    finally:
        engine.dispose()
    typer.echo(json.dumps(report, indent=2)) if as_json else _print_plan(report)


@retention_app.command("run")
def retention_run(as_json: bool = AS_JSON, data_dir: Path | None = DATA_DIR) -> None:
    """Delete what the policy allows now (the scheduled cleaner does the same); audited per batch."""
    settings, engine, factory = database_or_exit(data_dir)
    try:
        report = run(settings, factory).as_dict()
    finally:
        engine.dispose()
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo(f"deleted {len(report['studies'])} studies ({report['instances']} instances, "
               f"{report['image_bytes']} bytes), {report['result_folders']} result folders "
               f"({report['result_bytes']} bytes), {report['outbox_rows'] + report['hl7_rows']} outbox rows, "
               f"{report['audit_rows']} audit rows in {report['batches']} audited batches")
    for s in report["skipped"]:
        typer.echo(f"  kept {s['study_uid']}: {s['reason']}")
    after = report["disk_after"]
    typer.echo(f"disk: {report['disk_before']['percent']}% -> {after['percent']}% of {after['basis']}")


def _hold(study_uid: str, held: bool, reason: str, data_dir: Path | None) -> None:
    _, engine, factory = database_or_exit(data_dir)
    try:
        changed = set_legal_hold(factory, study_uid, held, actor=f"cli:{getpass.getuser()}", reason=reason)
    except UnknownStudy:
        typer.echo(f"no study {study_uid} (see `triage-node audit` if it was deleted)", err=True)
        raise typer.Exit(1) from None
    finally:
        engine.dispose()
    state = "on legal hold" if held else "released from legal hold"
    typer.echo(f"{study_uid} {state}" + ("" if changed else " (already)"))


@retention_app.command("hold")
def hold(
    study_uid: str,
    reason: str = typer.Option("", "--reason", help="Why (kept in the audit row; no patient names)."),
    data_dir: Path | None = DATA_DIR,
) -> None:
    """Put a study on legal hold: retention never deletes it."""
    _hold(study_uid, True, reason, data_dir)


@retention_app.command("release")
def release(
    study_uid: str,
    reason: str = typer.Option("", "--reason", help="Why (kept in the audit row; no patient names)."),
    data_dir: Path | None = DATA_DIR,
) -> None:
    """Release a study from legal hold: retention treats it like any other again."""
    _hold(study_uid, False, reason, data_dir)
