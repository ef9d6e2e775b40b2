"""hl7_outbox: HL7 v2 messages to the RIS, retried until ACKed or dead-lettered

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('hl7_outbox',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=True),
    sa.Column('study_uid', sa.String(length=64), nullable=False),
    sa.Column('message_type', sa.String(length=16), nullable=False),
    sa.Column('control_id', sa.String(length=20), nullable=False),
    sa.Column('dedup_key', sa.String(length=96), nullable=True),
    sa.Column('trigger', sa.String(length=32), nullable=False),
    sa.Column('message', sa.Text(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('ack_code', sa.String(length=2), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('delivered_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('control_id'),
    sa.UniqueConstraint('dedup_key'),
    )
    with op.batch_alter_table('hl7_outbox', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_hl7_outbox_job_id'), ['job_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_hl7_outbox_state'), ['state'], unique=False)
        batch_op.create_index(batch_op.f('ix_hl7_outbox_study_uid'), ['study_uid'], unique=False)


def downgrade() -> None:
    op.drop_table('hl7_outbox')
