"""budgets, their counters, the alert outbox, and alert levels (issue 15)

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 07:41:23

A budget is an extra limit inside a billable's plan; its counters hold quota like the
plan's counters do, and a reservation lists the budget counters it holds on. Each
counter remembers the highest alert threshold it announced; alerts for a webhook wait
in ``ai_metering_alert_events`` until delivered.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import flask_ai_metering.models
import flask_ai_metering.money

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ai_metering_alert_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("event_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=50), nullable=False),
        sa.Column("billable_type", sa.String(length=100), nullable=False),
        sa.Column("billable_id", sa.String(length=100), nullable=False),
        sa.Column("payload", sa.JSON(none_as_null=True), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("next_attempt_at", flask_ai_metering.models.UTCDateTime(), nullable=False),
        sa.Column("claimed_until", flask_ai_metering.models.UTCDateTime(), nullable=True),
        sa.Column("delivered_at", flask_ai_metering.models.UTCDateTime(), nullable=True),
        sa.Column("last_error", sa.String(length=200), nullable=True),
        sa.Column("created_at", flask_ai_metering.models.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ai_metering_alert_events")),
        sa.UniqueConstraint("event_id", name=op.f("uq_ai_metering_alert_events")),
    )
    with op.batch_alter_table("ai_metering_alert_events", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_ai_metering_alert_events_delivered_at_next_attempt_at"),
            ["delivered_at", "next_attempt_at"],
            unique=False,
        )

    op.create_table(
        "ai_metering_budgets",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("billable_type", sa.String(length=100), nullable=False),
        sa.Column("billable_id", sa.String(length=100), nullable=False),
        sa.Column("user_id", sa.String(length=100), nullable=True),
        sa.Column("feature", sa.String(length=100), nullable=True),
        sa.Column("model", sa.String(length=150), nullable=True),
        sa.Column("period", sa.String(length=10), nullable=False),
        sa.Column("token_limit", sa.BigInteger(), nullable=True),
        sa.Column("cost_limit", flask_ai_metering.money.MoneyType(), nullable=True),
        sa.Column("request_limit", sa.BigInteger(), nullable=True),
        sa.Column("mode", sa.String(length=10), nullable=False),
        sa.Column("thresholds", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("created_at", flask_ai_metering.models.UTCDateTime(), nullable=False),
        sa.Column("removed_at", flask_ai_metering.models.UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ai_metering_budgets")),
    )
    with op.batch_alter_table("ai_metering_budgets", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_ai_metering_budgets_billable_type_billable_id"),
            ["billable_type", "billable_id"],
            unique=False,
        )

    op.create_table(
        "ai_metering_budget_counters",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("budget_id", sa.Integer(), nullable=False),
        sa.Column("period_start", flask_ai_metering.models.UTCDateTime(), nullable=False),
        sa.Column("period_end", flask_ai_metering.models.UTCDateTime(), nullable=False),
        sa.Column("token_limit", sa.BigInteger(), nullable=True),
        sa.Column("cost_limit_units", sa.BigInteger(), nullable=True),
        sa.Column("request_limit", sa.BigInteger(), nullable=True),
        sa.Column("enforced", sa.Boolean(), server_default=sa.true(), nullable=False),
        sa.Column("used_tokens", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("reserved_tokens", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("used_cost_units", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("reserved_cost_units", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("used_requests", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("reserved_requests", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("alert_level", sa.Integer(), server_default="0", nullable=False),
        sa.Column("created_at", flask_ai_metering.models.UTCDateTime(), nullable=False),
        sa.CheckConstraint(
            "reserved_cost_units >= 0", name=op.f("ck_ai_metering_budget_counters_reserved_cost_nonneg")
        ),
        sa.CheckConstraint(
            "reserved_requests >= 0", name=op.f("ck_ai_metering_budget_counters_reserved_requests_nonneg")
        ),
        sa.CheckConstraint("reserved_tokens >= 0", name=op.f("ck_ai_metering_budget_counters_reserved_tokens_nonneg")),
        sa.ForeignKeyConstraint(
            ["budget_id"], ["ai_metering_budgets.id"], name=op.f("fk_ai_metering_budget_counters_budget_id")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ai_metering_budget_counters")),
        sa.UniqueConstraint("budget_id", "period_start", name=op.f("uq_ai_metering_budget_counters")),
    )
    with op.batch_alter_table("ai_metering_budget_counters", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_ai_metering_budget_counters_period_start"), ["period_start"], unique=False)

    with op.batch_alter_table("ai_metering_counters", schema=None) as batch_op:
        batch_op.add_column(sa.Column("alert_level", sa.Integer(), server_default="0", nullable=False))

    with op.batch_alter_table("ai_metering_reservations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("budget_counter_ids", sa.JSON(none_as_null=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("ai_metering_reservations", schema=None) as batch_op:
        batch_op.drop_column("budget_counter_ids")

    with op.batch_alter_table("ai_metering_counters", schema=None) as batch_op:
        batch_op.drop_column("alert_level")

    with op.batch_alter_table("ai_metering_budget_counters", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ai_metering_budget_counters_period_start"))

    op.drop_table("ai_metering_budget_counters")
    with op.batch_alter_table("ai_metering_budgets", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ai_metering_budgets_billable_type_billable_id"))

    op.drop_table("ai_metering_budgets")
    with op.batch_alter_table("ai_metering_alert_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ai_metering_alert_events_delivered_at_next_attempt_at"))

    op.drop_table("ai_metering_alert_events")
