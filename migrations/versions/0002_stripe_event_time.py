"""stripe event time per subscription

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 09:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import flask_ai_metering.models

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("ai_metering_subscriptions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("stripe_event_at", flask_ai_metering.models.UTCDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("ai_metering_subscriptions", schema=None) as batch_op:
        batch_op.drop_column("stripe_event_at")
