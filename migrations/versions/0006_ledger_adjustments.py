"""ledger adjustments (refunds, repricing), price sources, refunds in the rollups, trials, credits_low (issue 12)

Revision ID: 0006
Revises: 0004
Create Date: 2026-11-30 13:00:00

A refund is a ledger row of its own (``kind = 'refund'``, negative amounts,
``adjusts_id`` naming the usage row it gives back), so every existing row is a
call (``kind = 'usage'``). The rollups gain the refunds of each day. Plans gain
trial limits, subscriptions the marks of the trial notices already sent, and
wallets the mark of a ``credits_low`` already sent.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import flask_ai_metering.models
import flask_ai_metering.money

revision = "0006"
down_revision = "0004"
branch_labels = None
depends_on = None

USAGE = "ai_metering_usage"
ROLLUPS = ("ai_metering_usage_daily", "ai_metering_usage_daily_totals", "ai_metering_usage_daily_billables")


def upgrade() -> None:
    with op.batch_alter_table(USAGE, schema=None) as batch_op:
        batch_op.add_column(sa.Column("kind", sa.String(length=16), server_default="usage", nullable=False))
        batch_op.add_column(sa.Column("adjusts_id", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("price_source", sa.String(length=100), nullable=True))
        batch_op.create_index(batch_op.f("ix_ai_metering_usage_adjusts_id"), ["adjusts_id"], unique=False)
    with op.batch_alter_table("ai_metering_plans", schema=None) as batch_op:
        batch_op.add_column(sa.Column("trial_token_limit", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("trial_cost_limit", flask_ai_metering.money.MoneyType(), nullable=True))
    with op.batch_alter_table("ai_metering_subscriptions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("trial_ending_sent_at", flask_ai_metering.models.UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column("trial_ended_sent_at", flask_ai_metering.models.UTCDateTime(), nullable=True))
    with op.batch_alter_table("ai_metering_credit_wallets", schema=None) as batch_op:
        # A string default: an SQL expression makes SQLite's batch mode copy the whole table.
        batch_op.add_column(sa.Column("low_notified", sa.Boolean(), server_default="0", nullable=False))
    for name in ROLLUPS:
        with op.batch_alter_table(name, schema=None) as batch_op:
            batch_op.add_column(sa.Column("refunds", sa.BigInteger(), server_default="0", nullable=False))
            batch_op.add_column(
                sa.Column("refunded_cost", flask_ai_metering.money.MoneyType(), server_default="0", nullable=False)
            )


def downgrade() -> None:
    for name in reversed(ROLLUPS):
        with op.batch_alter_table(name, schema=None) as batch_op:
            batch_op.drop_column("refunded_cost")
            batch_op.drop_column("refunds")
    with op.batch_alter_table("ai_metering_credit_wallets", schema=None) as batch_op:
        batch_op.drop_column("low_notified")
    with op.batch_alter_table("ai_metering_subscriptions", schema=None) as batch_op:
        batch_op.drop_column("trial_ended_sent_at")
        batch_op.drop_column("trial_ending_sent_at")
    with op.batch_alter_table("ai_metering_plans", schema=None) as batch_op:
        batch_op.drop_column("trial_cost_limit")
        batch_op.drop_column("trial_token_limit")
    with op.batch_alter_table(USAGE, schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ai_metering_usage_adjusts_id"))
        batch_op.drop_column("price_source")
        batch_op.drop_column("adjusts_id")
        batch_op.drop_column("kind")
