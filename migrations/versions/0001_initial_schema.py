"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-23 18:39:22.984852
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import flask_ai_metering.models
import flask_ai_metering.money

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "ai_metering_aggregation_state",
        sa.Column("name", sa.String(length=50), nullable=False),
        sa.Column("last_usage_id", sa.BigInteger(), nullable=False),
        sa.Column("marked_at", flask_ai_metering.models.UTCDateTime(), nullable=True),
        sa.Column("updated_at", flask_ai_metering.models.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_ai_metering_aggregation_state")),
    )
    op.create_table(
        "ai_metering_counters",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("billable_type", sa.String(length=100), nullable=False),
        sa.Column("billable_id", sa.String(length=100), nullable=False),
        sa.Column("period_start", flask_ai_metering.models.UTCDateTime(), nullable=False),
        sa.Column("period_end", flask_ai_metering.models.UTCDateTime(), nullable=False),
        sa.Column("plan_version", sa.Integer(), server_default="0", nullable=False),
        sa.Column("used_tokens", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("reserved_tokens", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("used_cost_units", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("reserved_cost_units", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("calls", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("approaching_notified", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("created_at", flask_ai_metering.models.UTCDateTime(), nullable=False),
        sa.CheckConstraint("reserved_cost_units >= 0", name=op.f("ck_ai_metering_counters_reserved_cost_nonneg")),
        sa.CheckConstraint("reserved_tokens >= 0", name=op.f("ck_ai_metering_counters_reserved_tokens_nonneg")),
        sa.CheckConstraint("used_tokens >= 0", name=op.f("ck_ai_metering_counters_used_tokens_nonneg")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ai_metering_counters")),
        sa.UniqueConstraint(
            "billable_type", "billable_id", "period_start", "plan_version", name=op.f("uq_ai_metering_counters")
        ),
    )
    with op.batch_alter_table("ai_metering_counters", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_ai_metering_counters_period_start"), ["period_start"], unique=False)

    op.create_table(
        "ai_metering_credit_wallets",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("billable_type", sa.String(length=100), nullable=False),
        sa.Column("billable_id", sa.String(length=100), nullable=False),
        sa.Column("balance", flask_ai_metering.money.MoneyType(), server_default="0", nullable=False),
        sa.Column("held", flask_ai_metering.money.MoneyType(), server_default="0", nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("meta", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("created_at", flask_ai_metering.models.UTCDateTime(), nullable=False),
        sa.Column("updated_at", flask_ai_metering.models.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ai_metering_credit_wallets")),
        sa.UniqueConstraint("billable_type", "billable_id", name=op.f("uq_ai_metering_credit_wallets")),
    )
    op.create_table(
        "ai_metering_overages",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("billable_type", sa.String(length=100), nullable=False),
        sa.Column("billable_id", sa.String(length=100), nullable=False),
        sa.Column("usage_id", sa.BigInteger(), nullable=True),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.Column("amount", flask_ai_metering.money.MoneyType(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("period_start", flask_ai_metering.models.UTCDateTime(), nullable=False),
        sa.Column("period_end", flask_ai_metering.models.UTCDateTime(), nullable=True),
        sa.Column("status", sa.String(length=16), server_default="pending", nullable=False),
        sa.Column("synced_amount_minor", sa.BigInteger(), nullable=True),
        sa.Column("stripe_customer_id", sa.String(length=255), nullable=True),
        sa.Column("sync_attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("sync_started_at", flask_ai_metering.models.UTCDateTime(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("synced_at", flask_ai_metering.models.UTCDateTime(), nullable=True),
        sa.Column("stripe_id", sa.String(length=255), nullable=True),
        sa.Column("created_at", flask_ai_metering.models.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ai_metering_overages")),
        sa.UniqueConstraint("usage_id", name=op.f("uq_ai_metering_overages")),
    )
    with op.batch_alter_table("ai_metering_overages", schema=None) as batch_op:
        batch_op.create_index(
            "ix_ai_metering_overages_billable", ["billable_type", "billable_id", "period_start"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_ai_metering_overages_status_id"), ["status", "id"], unique=False)

    op.create_table(
        "ai_metering_plans",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("slug", sa.String(length=100), nullable=False),
        sa.Column("token_limit", sa.BigInteger(), nullable=True),
        sa.Column("cost_limit", flask_ai_metering.money.MoneyType(), nullable=True),
        sa.Column("overage_price_per_1k_tokens", flask_ai_metering.money.MoneyType(), nullable=True),
        sa.Column("features", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("period", sa.String(length=20), nullable=True),
        sa.Column("is_active", sa.Boolean(), server_default=sa.true(), nullable=False),
        sa.Column("trial_days", sa.Integer(), nullable=True),
        sa.Column("meta", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("created_at", flask_ai_metering.models.UTCDateTime(), nullable=False),
        sa.Column("updated_at", flask_ai_metering.models.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ai_metering_plans")),
        sa.UniqueConstraint("slug", name=op.f("uq_ai_metering_plans")),
    )
    op.create_table(
        "ai_metering_usage_daily",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("billable_type", sa.String(length=100), nullable=False),
        sa.Column("billable_id", sa.String(length=100), nullable=False),
        sa.Column("tenant_id", sa.String(length=100), nullable=False),
        sa.Column("provider", sa.String(length=50), nullable=False),
        sa.Column("model", sa.String(length=150), nullable=False),
        sa.Column("feature", sa.String(length=100), nullable=False),
        sa.Column("calls", sa.BigInteger(), nullable=False),
        sa.Column("input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cached_input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cache_write_tokens", sa.BigInteger(), nullable=False),
        sa.Column("reasoning_tokens", sa.BigInteger(), nullable=False),
        sa.Column("total_tokens", sa.BigInteger(), nullable=False),
        sa.Column("total_cost", flask_ai_metering.money.MoneyType(), nullable=False),
        sa.Column("unpriced_calls", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", flask_ai_metering.models.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ai_metering_usage_daily")),
        sa.UniqueConstraint(
            "day",
            "billable_type",
            "billable_id",
            "tenant_id",
            "provider",
            "model",
            "feature",
            name=op.f("uq_ai_metering_usage_daily"),
        ),
    )
    with op.batch_alter_table("ai_metering_usage_daily", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_ai_metering_usage_daily_billable_type_billable_id_day"),
            ["billable_type", "billable_id", "day"],
            unique=False,
        )
        batch_op.create_index(batch_op.f("ix_ai_metering_usage_daily_model_day"), ["model", "day"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_ai_metering_usage_daily_tenant_id_day"), ["tenant_id", "day"], unique=False
        )

    op.create_table(
        "ai_metering_usage_daily_billables",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("billable_type", sa.String(length=100), nullable=False),
        sa.Column("billable_id", sa.String(length=100), nullable=False),
        sa.Column("tenant_id", sa.String(length=100), nullable=False),
        sa.Column("calls", sa.BigInteger(), nullable=False),
        sa.Column("input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cached_input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cache_write_tokens", sa.BigInteger(), nullable=False),
        sa.Column("reasoning_tokens", sa.BigInteger(), nullable=False),
        sa.Column("total_tokens", sa.BigInteger(), nullable=False),
        sa.Column("total_cost", flask_ai_metering.money.MoneyType(), nullable=False),
        sa.Column("unpriced_calls", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", flask_ai_metering.models.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ai_metering_usage_daily_billables")),
        sa.UniqueConstraint(
            "day", "billable_type", "billable_id", "tenant_id", name=op.f("uq_ai_metering_usage_daily_billables")
        ),
    )
    with op.batch_alter_table("ai_metering_usage_daily_billables", schema=None) as batch_op:
        batch_op.create_index(
            "ix_ai_metering_daily_billables_billable", ["billable_type", "billable_id", "day"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_ai_metering_usage_daily_billables_tenant_id_day"), ["tenant_id", "day"], unique=False
        )

    op.create_table(
        "ai_metering_usage_daily_totals",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("tenant_id", sa.String(length=100), nullable=False),
        sa.Column("provider", sa.String(length=50), nullable=False),
        sa.Column("model", sa.String(length=150), nullable=False),
        sa.Column("feature", sa.String(length=100), nullable=False),
        sa.Column("calls", sa.BigInteger(), nullable=False),
        sa.Column("input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cached_input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cache_write_tokens", sa.BigInteger(), nullable=False),
        sa.Column("reasoning_tokens", sa.BigInteger(), nullable=False),
        sa.Column("total_tokens", sa.BigInteger(), nullable=False),
        sa.Column("total_cost", flask_ai_metering.money.MoneyType(), nullable=False),
        sa.Column("unpriced_calls", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", flask_ai_metering.models.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ai_metering_usage_daily_totals")),
        sa.UniqueConstraint(
            "day", "tenant_id", "provider", "model", "feature", name=op.f("uq_ai_metering_usage_daily_totals")
        ),
    )
    with op.batch_alter_table("ai_metering_usage_daily_totals", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_ai_metering_usage_daily_totals_tenant_id_day"), ["tenant_id", "day"], unique=False
        )

    op.create_table(
        "ai_metering_usage_limit_overrides",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("billable_type", sa.String(length=100), nullable=False),
        sa.Column("billable_id", sa.String(length=100), nullable=False),
        sa.Column("period_start", flask_ai_metering.models.UTCDateTime(), nullable=False),
        sa.Column("period_end", flask_ai_metering.models.UTCDateTime(), nullable=False),
        sa.Column("token_limit", sa.BigInteger(), nullable=True),
        sa.Column("cost_limit", flask_ai_metering.money.MoneyType(), nullable=True),
        sa.Column("created_at", flask_ai_metering.models.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ai_metering_usage_limit_overrides")),
    )
    with op.batch_alter_table("ai_metering_usage_limit_overrides", schema=None) as batch_op:
        batch_op.create_index(
            "ix_ai_metering_overrides_billable", ["billable_type", "billable_id", "period_start"], unique=False
        )

    op.create_table(
        "ai_metering_credit_transactions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("wallet_id", sa.Integer(), nullable=False),
        sa.Column("amount", flask_ai_metering.money.MoneyType(), nullable=False),
        sa.Column("reason", sa.String(length=255), nullable=True),
        sa.Column("meta", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("idempotency_key", sa.String(length=255), nullable=True),
        sa.Column("usage_id", sa.BigInteger(), nullable=True),
        sa.Column("created_at", flask_ai_metering.models.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["wallet_id"], ["ai_metering_credit_wallets.id"], name=op.f("fk_ai_metering_credit_transactions_wallet_id")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ai_metering_credit_transactions")),
        sa.UniqueConstraint("wallet_id", "idempotency_key", name=op.f("uq_ai_metering_credit_transactions")),
    )
    with op.batch_alter_table("ai_metering_credit_transactions", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_ai_metering_credit_transactions_wallet_id_created_at"),
            ["wallet_id", "created_at"],
            unique=False,
        )

    op.create_table(
        "ai_metering_reservations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("counter_id", sa.Integer(), nullable=False),
        sa.Column("billable_type", sa.String(length=100), nullable=False),
        sa.Column("billable_id", sa.String(length=100), nullable=False),
        sa.Column("idempotency_key", sa.String(length=255), nullable=True),
        sa.Column("idempotency_scope", sa.String(length=100), server_default="", nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.Column("cost_units", sa.BigInteger(), nullable=False),
        sa.Column("credit_units", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("wallet_id", sa.Integer(), nullable=True),
        sa.Column("expires_at", flask_ai_metering.models.UTCDateTime(), nullable=False),
        sa.Column("created_at", flask_ai_metering.models.UTCDateTime(), nullable=False),
        sa.Column("settled_at", flask_ai_metering.models.UTCDateTime(), nullable=True),
        sa.Column("payload", sa.JSON(none_as_null=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["counter_id"], ["ai_metering_counters.id"], name=op.f("fk_ai_metering_reservations_counter_id")
        ),
        sa.ForeignKeyConstraint(
            ["wallet_id"], ["ai_metering_credit_wallets.id"], name=op.f("fk_ai_metering_reservations_wallet_id")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ai_metering_reservations")),
        sa.UniqueConstraint(
            "billable_type",
            "billable_id",
            "idempotency_scope",
            "idempotency_key",
            name=op.f("uq_ai_metering_reservations"),
        ),
    )
    with op.batch_alter_table("ai_metering_reservations", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_ai_metering_reservations_counter_id"), ["counter_id"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_ai_metering_reservations_status_expires_at"), ["status", "expires_at"], unique=False
        )

    op.create_table(
        "ai_metering_subscriptions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("billable_type", sa.String(length=100), nullable=False),
        sa.Column("billable_id", sa.String(length=100), nullable=False),
        sa.Column("plan_id", sa.Integer(), nullable=False),
        sa.Column("previous_plan_id", sa.Integer(), nullable=True),
        sa.Column("billing_mode", sa.String(length=20), nullable=False),
        sa.Column("started_at", flask_ai_metering.models.UTCDateTime(), nullable=False),
        sa.Column("renews_at", flask_ai_metering.models.UTCDateTime(), nullable=True),
        sa.Column("ends_at", flask_ai_metering.models.UTCDateTime(), nullable=True),
        sa.Column("trial_ends_at", flask_ai_metering.models.UTCDateTime(), nullable=True),
        sa.Column("grace_period_ends_at", flask_ai_metering.models.UTCDateTime(), nullable=True),
        sa.Column("plan_changed_at", flask_ai_metering.models.UTCDateTime(), nullable=True),
        sa.Column("plan_version", sa.Integer(), server_default="0", nullable=False),
        sa.Column("stripe_customer_id", sa.String(length=255), nullable=True),
        sa.Column("stripe_subscription_id", sa.String(length=255), nullable=True),
        sa.Column("meta", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("created_at", flask_ai_metering.models.UTCDateTime(), nullable=False),
        sa.Column("updated_at", flask_ai_metering.models.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["plan_id"], ["ai_metering_plans.id"], name=op.f("fk_ai_metering_subscriptions_plan_id")
        ),
        sa.ForeignKeyConstraint(
            ["previous_plan_id"], ["ai_metering_plans.id"], name=op.f("fk_ai_metering_subscriptions_previous_plan_id")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ai_metering_subscriptions")),
        sa.UniqueConstraint("billable_type", "billable_id", name=op.f("uq_ai_metering_subscriptions")),
    )
    with op.batch_alter_table("ai_metering_subscriptions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_ai_metering_subscriptions_plan_id"), ["plan_id"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_ai_metering_subscriptions_stripe_customer_id"), ["stripe_customer_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_ai_metering_subscriptions_stripe_subscription_id"), ["stripe_subscription_id"], unique=False
        )

    op.create_table(
        "ai_metering_usage",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("billable_type", sa.String(length=100), nullable=True),
        sa.Column("billable_id", sa.String(length=100), nullable=True),
        sa.Column("user_id", sa.String(length=100), nullable=True),
        sa.Column("tenant_id", sa.String(length=100), nullable=True),
        sa.Column("provider", sa.String(length=50), nullable=False),
        sa.Column("model", sa.String(length=150), nullable=True),
        sa.Column("feature", sa.String(length=100), nullable=True),
        sa.Column("input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cached_input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cache_write_tokens", sa.BigInteger(), nullable=False),
        sa.Column("reasoning_tokens", sa.BigInteger(), nullable=False),
        sa.Column("total_tokens", sa.BigInteger(), nullable=False),
        sa.Column("input_cost", flask_ai_metering.money.MoneyType(), nullable=False),
        sa.Column("output_cost", flask_ai_metering.money.MoneyType(), nullable=False),
        sa.Column("total_cost", flask_ai_metering.money.MoneyType(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("unpriced", sa.Boolean(), nullable=False),
        sa.Column("estimated", sa.Boolean(), nullable=False),
        sa.Column("billing_mode", sa.String(length=20), nullable=False),
        sa.Column("idempotency_key", sa.String(length=255), nullable=True),
        sa.Column("idempotency_scope", sa.String(length=100), server_default="", nullable=False),
        sa.Column("meta", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("duration_ms", sa.Integer(), nullable=True),
        sa.Column("counter_id", sa.Integer(), nullable=True),
        sa.Column("reservation_id", sa.BigInteger(), nullable=True),
        sa.Column("occurred_at", flask_ai_metering.models.UTCDateTime(), nullable=False),
        sa.Column("created_at", flask_ai_metering.models.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["counter_id"], ["ai_metering_counters.id"], name=op.f("fk_ai_metering_usage_counter_id")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ai_metering_usage")),
        sa.UniqueConstraint(
            "billable_type", "billable_id", "idempotency_scope", "idempotency_key", name=op.f("uq_ai_metering_usage")
        ),
        sa.UniqueConstraint("reservation_id", name="uq_ai_metering_usage_reservation"),
    )
    with op.batch_alter_table("ai_metering_usage", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_ai_metering_usage_billable_type_billable_id_occurred_at"),
            ["billable_type", "billable_id", "occurred_at"],
            unique=False,
        )
        batch_op.create_index(batch_op.f("ix_ai_metering_usage_counter_id"), ["counter_id"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_ai_metering_usage_model_occurred_at"), ["model", "occurred_at"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_ai_metering_usage_occurred_at"), ["occurred_at"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_ai_metering_usage_tenant_id_occurred_at"), ["tenant_id", "occurred_at"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_ai_metering_usage_user_id_occurred_at"), ["user_id", "occurred_at"], unique=False
        )


def downgrade() -> None:

    with op.batch_alter_table("ai_metering_usage", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ai_metering_usage_user_id_occurred_at"))
        batch_op.drop_index(batch_op.f("ix_ai_metering_usage_tenant_id_occurred_at"))
        batch_op.drop_index(batch_op.f("ix_ai_metering_usage_occurred_at"))
        batch_op.drop_index(batch_op.f("ix_ai_metering_usage_model_occurred_at"))
        batch_op.drop_index(batch_op.f("ix_ai_metering_usage_counter_id"))
        batch_op.drop_index(batch_op.f("ix_ai_metering_usage_billable_type_billable_id_occurred_at"))

    op.drop_table("ai_metering_usage")
    with op.batch_alter_table("ai_metering_subscriptions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ai_metering_subscriptions_stripe_subscription_id"))
        batch_op.drop_index(batch_op.f("ix_ai_metering_subscriptions_stripe_customer_id"))
        batch_op.drop_index(batch_op.f("ix_ai_metering_subscriptions_plan_id"))

    op.drop_table("ai_metering_subscriptions")
    with op.batch_alter_table("ai_metering_reservations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ai_metering_reservations_status_expires_at"))
        batch_op.drop_index(batch_op.f("ix_ai_metering_reservations_counter_id"))

    op.drop_table("ai_metering_reservations")
    with op.batch_alter_table("ai_metering_credit_transactions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ai_metering_credit_transactions_wallet_id_created_at"))

    op.drop_table("ai_metering_credit_transactions")
    with op.batch_alter_table("ai_metering_usage_limit_overrides", schema=None) as batch_op:
        batch_op.drop_index("ix_ai_metering_overrides_billable")

    op.drop_table("ai_metering_usage_limit_overrides")
    with op.batch_alter_table("ai_metering_usage_daily_totals", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ai_metering_usage_daily_totals_tenant_id_day"))

    op.drop_table("ai_metering_usage_daily_totals")
    with op.batch_alter_table("ai_metering_usage_daily_billables", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ai_metering_usage_daily_billables_tenant_id_day"))
        batch_op.drop_index("ix_ai_metering_daily_billables_billable")

    op.drop_table("ai_metering_usage_daily_billables")
    with op.batch_alter_table("ai_metering_usage_daily", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ai_metering_usage_daily_tenant_id_day"))
        batch_op.drop_index(batch_op.f("ix_ai_metering_usage_daily_model_day"))
        batch_op.drop_index(batch_op.f("ix_ai_metering_usage_daily_billable_type_billable_id_day"))

    op.drop_table("ai_metering_usage_daily")
    op.drop_table("ai_metering_plans")
    with op.batch_alter_table("ai_metering_overages", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ai_metering_overages_status_id"))
        batch_op.drop_index("ix_ai_metering_overages_billable")

    op.drop_table("ai_metering_overages")
    op.drop_table("ai_metering_credit_wallets")
    with op.batch_alter_table("ai_metering_counters", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ai_metering_counters_period_start"))

    op.drop_table("ai_metering_counters")
    op.drop_table("ai_metering_aggregation_state")
