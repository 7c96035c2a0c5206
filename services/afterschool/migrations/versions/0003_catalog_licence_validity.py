"""catalog entries keep the licence's validity (AS-03: an expired licence leaves the catalog)

Revision ID: 0003
Revises: 0002
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("catalog_institutions") as batch_op:
        batch_op.add_column(sa.Column("licence_valid_until", sa.Date(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("catalog_institutions") as batch_op:
        batch_op.drop_column("licence_valid_until")
