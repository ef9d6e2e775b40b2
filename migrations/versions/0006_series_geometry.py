"""series geometry (orientation, matrix, pixel and slice spacing) and derivation, for
selecting series without ImageType and lossy-compressed originals

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""

from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

COLUMNS = (
    ('image_orientation', sa.String(length=128)),
    ('rows', sa.Integer()),
    ('columns', sa.Integer()),
    ('pixel_spacing_row', sa.Float()),
    ('pixel_spacing_column', sa.Float()),
    ('slice_spacing', sa.Float()),
    ('slice_spacing_deviation', sa.Float()),
    ('derivation_codes', sa.String(length=128)),
    ('lossy_compression', sa.String(length=64)),
)


def upgrade() -> None:
    with op.batch_alter_table('series', schema=None) as batch_op:
        for name, kind in COLUMNS:
            batch_op.add_column(sa.Column(name, kind, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('series', schema=None) as batch_op:
        for name, _ in reversed(COLUMNS):
            batch_op.drop_column(name)
