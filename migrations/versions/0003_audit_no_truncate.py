"""audit_events: refuse TRUNCATE on PostgreSQL

The row triggers of 0001 refuse UPDATE and DELETE, but TRUNCATE fires no row trigger:
``TRUNCATE audit_events`` emptied the append-only audit trail. A statement-level
BEFORE TRUNCATE trigger refuses it too. SQLite has no TRUNCATE (its ``DELETE FROM``
without WHERE is already refused by the 0001 trigger).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events "
            "FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only()"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS audit_events_no_truncate ON audit_events")
