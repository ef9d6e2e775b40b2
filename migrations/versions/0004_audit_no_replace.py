"""audit_events: refuse INSERT OR REPLACE on SQLite

SQLite's ``INSERT OR REPLACE`` (and ``REPLACE INTO``) with an existing id deletes the
old row and inserts the new one; the delete of a REPLACE fires no DELETE trigger unless
``PRAGMA recursive_triggers`` is on, so the 0001 triggers let an audit row be rewritten.
A BEFORE INSERT trigger refuses an id that is already there, on every connection
(the node's own engine also turns recursive triggers on). PostgreSQL has no REPLACE; its
``INSERT ... ON CONFLICT DO UPDATE`` and ``MERGE`` fire the 0001 UPDATE trigger.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute(
            "CREATE TRIGGER audit_events_no_replace BEFORE INSERT ON audit_events "
            "WHEN EXISTS (SELECT 1 FROM audit_events WHERE id = NEW.id) "
            "BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TRIGGER IF EXISTS audit_events_no_replace")
