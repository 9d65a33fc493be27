"""failures table: provider calls that raised, kept apart from the usage ledger

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 12:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import flask_ai_metering.models

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ai_metering_failures",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("billable_type", sa.String(length=100), nullable=True),
        sa.Column("billable_id", sa.String(length=100), nullable=True),
        sa.Column("user_id", sa.String(length=100), nullable=True),
        sa.Column("tenant_id", sa.String(length=100), nullable=True),
        sa.Column("provider", sa.String(length=50), nullable=False),
        sa.Column("model", sa.String(length=150), nullable=True),
        sa.Column("feature", sa.String(length=100), nullable=True),
        sa.Column("error_type", sa.String(length=100), nullable=False),
        sa.Column("http_status", sa.Integer(), nullable=True),
        sa.Column("duration_ms", sa.Integer(), nullable=True),
        sa.Column("occurred_at", flask_ai_metering.models.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ai_metering_failures")),
    )
    with op.batch_alter_table("ai_metering_failures", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_ai_metering_failures_billable_type_billable_id_occurred_at"),
            ["billable_type", "billable_id", "occurred_at"],
            unique=False,
        )
        batch_op.create_index(
            batch_op.f("ix_ai_metering_failures_model_occurred_at"), ["model", "occurred_at"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_ai_metering_failures_occurred_at"), ["occurred_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("ai_metering_failures", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ai_metering_failures_occurred_at"))
        batch_op.drop_index(batch_op.f("ix_ai_metering_failures_model_occurred_at"))
        batch_op.drop_index(batch_op.f("ix_ai_metering_failures_billable_type_billable_id_occurred_at"))

    op.drop_table("ai_metering_failures")
