"""leaving school, make-up days, refund records, seat check

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 14:30:00
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
    with op.batch_alter_table("plans", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("make_up_weekdays", sa.JSON(), nullable=False, server_default="{}")
        )
    with op.batch_alter_table("fee_statements", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("refunded_fen", sa.Integer(), nullable=False, server_default="0")
        )
    with op.batch_alter_table("courses", schema=None) as batch_op:
        batch_op.create_check_constraint(
            op.f("ck_courses_seats_within"), "seats_taken >= 0 AND seats_taken <= capacity"
        )
    op.create_table(
        "refunds",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("enrollment_id", sa.String(length=36), nullable=False),
        sa.Column("statement_id", sa.String(length=36), nullable=False),
        sa.Column("school_id", sa.String(length=36), nullable=False),
        sa.Column("course_id", sa.String(length=36), nullable=False),
        sa.Column("student_id", sa.String(length=36), nullable=False),
        sa.Column("month", sa.String(length=7), nullable=False),
        sa.Column("days", sa.Integer(), nullable=False),
        sa.Column("amount_fen", sa.Integer(), nullable=False),
        sa.Column("non_tax_account_ref", sa.String(length=100), nullable=False),
        sa.Column("reason", sa.String(length=16), nullable=False),
        sa.Column("created_at", chassis.db.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["enrollment_id"], ["enrollments.id"], name=op.f("fk_refunds_enrollment_id_enrollments")
        ),
        sa.ForeignKeyConstraint(
            ["statement_id"],
            ["fee_statements.id"],
            name=op.f("fk_refunds_statement_id_fee_statements"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_refunds")),
    )
    with op.batch_alter_table("refunds", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_refunds_enrollment_id"), ["enrollment_id"])
        batch_op.create_index(batch_op.f("ix_refunds_statement_id"), ["statement_id"])
        batch_op.create_index(batch_op.f("ix_refunds_school_id"), ["school_id"])
        batch_op.create_index(batch_op.f("ix_refunds_student_id"), ["student_id"])


def downgrade() -> None:
    op.drop_table("refunds")
    with op.batch_alter_table("courses", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_courses_seats_within"), type_="check")
    with op.batch_alter_table("fee_statements", schema=None) as batch_op:
        batch_op.drop_column("refunded_fen")
    with op.batch_alter_table("plans", schema=None) as batch_op:
        batch_op.drop_column("make_up_weekdays")
