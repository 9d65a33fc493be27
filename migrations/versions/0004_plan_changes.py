"""plan changes: counter segments and prorated limits (issue 12)

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 12:00:00

A subscription's counter segment starts where its plan version is, so a
billable keeps counting on the counter it counts on today.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import flask_ai_metering.models

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

TABLE = "ai_metering_subscriptions"


def upgrade() -> None:
    with op.batch_alter_table(TABLE, schema=None) as batch_op:
        batch_op.add_column(sa.Column("counter_segment", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("prorated_token_limit", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("prorated_cost_units", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("prorated_until", flask_ai_metering.models.UTCDateTime(), nullable=True))
    subs = sa.table(TABLE, sa.column("counter_segment", sa.Integer()), sa.column("plan_version", sa.Integer()))
    op.execute(subs.update().values(counter_segment=subs.c.plan_version))


def downgrade() -> None:
    with op.batch_alter_table(TABLE, schema=None) as batch_op:
        batch_op.drop_column("prorated_until")
        batch_op.drop_column("prorated_cost_units")
        batch_op.drop_column("prorated_token_limit")
        batch_op.drop_column("counter_segment")
