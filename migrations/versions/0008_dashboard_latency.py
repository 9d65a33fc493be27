"""latency rollup: ledger rows per day, model and latency bucket, for the overview's health panel

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30 14:00:00

The overview's p50/p95 latency and daily call counts per model were a scan of the
last week of the ledger; ``aggregate`` now keeps them per local day. Run
``flask ai-metering aggregate --period month`` (or a full rebuild) after upgrading:
until a day is aggregated again the overview reads it from the ledger only if it
is among the days written since the last run.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import flask_ai_metering.models

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

TABLE = "ai_metering_usage_daily_latency"


def upgrade() -> None:
    op.create_table(
        TABLE,
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("provider", sa.String(length=50), nullable=False),
        sa.Column("model", sa.String(length=150), nullable=False),
        sa.Column("feature", sa.String(length=100), nullable=False),
        sa.Column("bucket", sa.SmallInteger(), nullable=False),
        sa.Column("entries", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", flask_ai_metering.models.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ai_metering_usage_daily_latency")),
        sa.UniqueConstraint(
            "day", "provider", "model", "feature", "bucket", name=op.f("uq_ai_metering_usage_daily_latency")
        ),
    )
    with op.batch_alter_table(TABLE, schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_ai_metering_usage_daily_latency_model_day"), ["model", "day"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table(TABLE, schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ai_metering_usage_daily_latency_model_day"))
    op.drop_table(TABLE)
