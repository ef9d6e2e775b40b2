"""Schema version checks and upgrades through Alembic (STYLE.md 13)."""

from __future__ import annotations

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from triage_node.config import REPO_ROOT

MIGRATIONS_DIR = REPO_ROOT / "migrations"


class SchemaOutOfDate(RuntimeError):
    """The database is not at the code's schema revision."""


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head_revision() -> str:
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    head = script.get_current_head()
    assert head is not None, "migrations folder has no revisions"
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(url: str, revision: str = "head") -> None:
    """Apply migrations up to ``revision`` (the explicit ``triage-node db upgrade`` step)."""
    command.upgrade(alembic_config(url), revision)


def require_current(engine: Engine) -> None:
    """Refuse to serve on a database that is missing migrations."""
    current, head = current_revision(engine), head_revision()
    if current != head:
        raise SchemaOutOfDate(
            f"database schema is at {current or 'no revision'}, the code needs {head}: "
            "run `triage-node db upgrade` first"
        )
