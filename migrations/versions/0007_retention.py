"""retention: legal hold per study, deleted result files, audited pruning of old audit rows

``studies.legal_hold`` keeps a study from every deletion; ``results.files_deleted_at``
says that retention removed a result's SR/SC files.

The audit table stays append-only, except for one deliberate path: retention may
delete rows older than a cut-off it declares inside its own transaction, after writing
an audit row about it (``triage_node.retention.deletion.prune_audit``). On PostgreSQL
the trigger function reads the transaction-local setting ``triage.audit_prune_before``;
SQLite has no such settings, so its DELETE trigger reads the one row of
``audit_prune_gate``, which exists only inside that transaction. UPDATE and TRUNCATE
stay refused, and a DELETE of a row newer than the cut-off too.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-09
"""

from alembic import op
import sqlalchemy as sa


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

PG_FUNCTION = (
    "CREATE OR REPLACE FUNCTION audit_events_append_only() RETURNS trigger AS $$ "
    "BEGIN "
    "IF TG_OP = 'DELETE' "
    "AND coalesce(current_setting('triage.audit_prune_before', true), '') <> '' "
    "AND OLD.at < current_setting('triage.audit_prune_before', true)::timestamptz THEN "
    "RETURN OLD; "
    "END IF; "
    "RAISE EXCEPTION 'audit_events is append-only'; "
    "END; $$ LANGUAGE plpgsql"
)
PG_FUNCTION_0001 = (
    "CREATE OR REPLACE FUNCTION audit_events_append_only() RETURNS trigger AS $$ "
    "BEGIN RAISE EXCEPTION 'audit_events is append-only'; END; $$ LANGUAGE plpgsql"
)
SQLITE_NO_DELETE_0001 = (
    "CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events "
    "BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END"
)
SQLITE_NO_DELETE = (
    "CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events "
    "WHEN NOT EXISTS (SELECT 1 FROM audit_prune_gate g WHERE OLD.at < g.before) "
    "BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END"
)


def upgrade() -> None:
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.add_column(
            sa.Column('legal_hold', sa.Boolean(), nullable=False, server_default=sa.false())
        )
    with op.batch_alter_table('results', schema=None) as batch_op:
        batch_op.add_column(sa.Column('files_deleted_at', sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        'audit_prune_gate',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('before', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id'),
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(PG_FUNCTION)
    else:
        op.execute("DROP TRIGGER IF EXISTS audit_events_no_delete")
        op.execute(SQLITE_NO_DELETE)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(PG_FUNCTION_0001)
    else:
        op.execute("DROP TRIGGER IF EXISTS audit_events_no_delete")
        op.execute(SQLITE_NO_DELETE_0001)
    op.drop_table('audit_prune_gate')
    with op.batch_alter_table('results', schema=None) as batch_op:
        batch_op.drop_column('files_deleted_at')
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.drop_column('legal_hold')
