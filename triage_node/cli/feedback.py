"""``triage-node feedback export``: readers' agree/disagree/comment as CSV, for retraining
and for measuring the model at the site."""

from __future__ import annotations

from pathlib import Path

import typer

from triage_node.cli.app import app
from triage_node.cli.audit import parse_since
from triage_node.cli.common import settings_or_exit
from triage_node.db.session import make_engine, make_sessionmaker
from triage_node.worklist.feedback import list_feedback, summarise, to_csv

feedback_app = typer.Typer(help="Readers' feedback on AI results (kept in the audit trail).",
                           no_args_is_help=True)
app.add_typer(feedback_app, name="feedback")


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.1f} %"


@feedback_app.command("export")
def export(
    out: Path = typer.Option(..., "--out", help="CSV file to write (replaced)."),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="Data directory (TRIAGE_DATA_DIR)."),
    since: str | None = typer.Option(None, "--since", help="ISO 8601 time or 90m/12h/7d ago."),
    until: str | None = typer.Option(None, "--until", help="ISO 8601 time (exclusive)."),
    with_patient: bool = typer.Option(False, "--with-patient",
                                      help="Add patient name and ID columns (keep such a file like the PACS's data)."),
) -> None:
    """Write one CSV row per feedback and print the PPV readers judge."""
    settings = settings_or_exit(data_dir=data_dir)
    engine = make_engine(settings.effective_database_url)
    try:
        with make_sessionmaker(engine)() as session:
            rows = list_feedback(session, since=parse_since(since), until=parse_since(until))
    finally:
        engine.dispose()
    out.write_text(to_csv(rows, with_patient=with_patient), encoding="utf-8")
    s = summarise(rows)
    typer.echo(f"{s['feedback']} feedback written to {out}")
    typer.echo(f"PPV as judged by readers: {_pct(s['ppv'])} "
               f"({s['ai_positive_agreed']} of {s['ai_positive_judged']} AI-positive results agreed); "
               f"AI-negative agreed: {_pct(s['npv'])} ({s['ai_negative_agreed']} of {s['ai_negative_judged']})")
    for version, v in s["by_model_version"].items():
        typer.echo(f"  model {version or '?'}: PPV {_pct(v['ppv'])} of {v['ai_positive_judged']} judged")
