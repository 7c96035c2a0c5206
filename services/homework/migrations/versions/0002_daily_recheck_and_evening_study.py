"""burden re-check date; classes with evening self-study

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 14:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import chassis.db

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('burden_states', schema=None) as batch_op:
        batch_op.add_column(sa.Column('evaluated_for', sa.Date(), nullable=True))
    op.create_table('evening_study_classes',
    sa.Column('class_id', sa.String(length=36), nullable=False),
    sa.Column('school_id', sa.String(length=36), nullable=False),
    sa.Column('weekdays', sa.JSON(), nullable=False),
    sa.Column('set_by', sa.String(length=64), nullable=False),
    sa.Column('updated_at', chassis.db.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('class_id', name=op.f('pk_evening_study_classes'))
    )
    with op.batch_alter_table('evening_study_classes', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_evening_study_classes_school_id'), ['school_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('evening_study_classes', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_evening_study_classes_school_id'))
    op.drop_table('evening_study_classes')
    with op.batch_alter_table('burden_states', schema=None) as batch_op:
        batch_op.drop_column('evaluated_for')
