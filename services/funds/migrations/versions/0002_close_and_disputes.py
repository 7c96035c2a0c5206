"""account closing (FUND-01) and lesson dispute resolution (FUND-04)

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import chassis.db

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("escrow_accounts") as batch_op:
        batch_op.add_column(
            sa.Column("closed_at", chassis.db.UTCDateTime(timezone=True), nullable=True)
        )
    with op.batch_alter_table("lessons") as batch_op:
        batch_op.add_column(sa.Column("resolve_by", sa.Date(), nullable=True))
        batch_op.add_column(sa.Column("resolution", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("resolved_by", sa.String(length=16), nullable=True))
        batch_op.add_column(
            sa.Column("resolved_at", chassis.db.UTCDateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(sa.Column("resolution_note", sa.Text(), nullable=True))
        batch_op.add_column(
            sa.Column(
                "dispute_overdue_reported",
                sa.Boolean(),
                nullable=False,
                server_default=sa.false(),
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("lessons") as batch_op:
        for name in (
            "dispute_overdue_reported",
            "resolution_note",
            "resolved_at",
            "resolved_by",
            "resolution",
            "resolve_by",
        ):
            batch_op.drop_column(name)
    with op.batch_alter_table("escrow_accounts") as batch_op:
        batch_op.drop_column("closed_at")
