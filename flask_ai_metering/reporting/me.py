"""Read-only queries behind ``GET <prefix>/me``: one billable's own plan, spend and recent calls.

Every query here takes the billable as ``(type, id)`` and filters on it; nothing
reads another billable's rows. Money is summed as raw pico-units and converted
once with :func:`~flask_ai_metering.money.from_units`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import typing as t
from decimal import Decimal

import sqlalchemy as sa

from ..models import Plan
from ..models import Subscription
from ..models import Usage
from ..models import table
from ..money import from_units

usage = table(Usage)
plans = table(Plan)
subscriptions = table(Subscription)

#: How many of the billable's latest calls ``/me`` lists.
RECENT_CALLS = 20


@dataclasses.dataclass(frozen=True)
class PlanInfo:
    """The billable's subscription as an end user sees it."""

    slug: str
    name: str
    billing_mode: str
    trial_ends_at: dt.datetime | None


@dataclasses.dataclass(frozen=True)
class FeatureSpend:
    feature: str | None
    calls: int
    total_tokens: int
    total_cost: Decimal


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    """SQLite hands back naive datetimes; the ledger stores UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=dt.timezone.utc)
    return value


def _own(billable: tuple[str, str], source: sa.Table = usage) -> list[sa.ColumnElement[bool]]:
    return [source.c.billable_type == billable[0], source.c.billable_id == billable[1]]


def plan_info(conn: sa.Connection, billable: tuple[str, str]) -> PlanInfo | None:
    """The billable's plan (slug, name), billing mode and trial end; None without a subscription."""
    row = conn.execute(
        sa.select(plans.c.slug, plans.c.name, subscriptions.c.billing_mode, subscriptions.c.trial_ends_at)
        .select_from(subscriptions.join(plans, plans.c.id == subscriptions.c.plan_id))
        .where(*_own(billable, subscriptions))
    ).first()
    if row is None:
        return None
    return PlanInfo(row.slug, row.name, row.billing_mode, _aware(row.trial_ends_at))


def spend_by_feature(
    conn: sa.Connection, billable: tuple[str, str], start: dt.datetime, end: dt.datetime
) -> list[FeatureSpend]:
    """Calls, tokens and cost per feature of the billable's usage in ``[start, end)``, costliest first."""
    cost_units = sa.func.sum(sa.type_coerce(usage.c.total_cost, sa.BigInteger))
    rows = conn.execute(
        sa.select(
            usage.c.feature,
            sa.func.sum(sa.case((usage.c.kind == "usage", 1), else_=0)).label("calls"),  # refunds are no calls
            sa.func.sum(usage.c.total_tokens).label("total_tokens"),
            cost_units.label("cost_units"),
        )
        .where(*_own(billable), usage.c.occurred_at >= start, usage.c.occurred_at < end)
        .group_by(usage.c.feature)
    ).all()
    spend = [
        FeatureSpend(r.feature, int(r.calls), int(r.total_tokens or 0), from_units(int(r.cost_units or 0)))
        for r in rows
    ]
    return sorted(spend, key=lambda s: (-s.total_cost, -s.total_tokens, s.feature or ""))


def recent_calls(conn: sa.Connection, billable: tuple[str, str], limit: int = RECENT_CALLS) -> list[dict[str, t.Any]]:
    """The billable's latest ``limit`` calls, newest first, as JSON-ready dicts (money as strings)."""
    rows = conn.execute(
        sa.select(
            usage.c.id,
            usage.c.occurred_at,
            usage.c.user_id,
            usage.c.provider,
            usage.c.model,
            usage.c.feature,
            usage.c.input_tokens,
            usage.c.output_tokens,
            usage.c.total_tokens,
            usage.c.total_cost,
            usage.c.currency,
        )
        .where(*_own(billable))
        .order_by(usage.c.occurred_at.desc(), usage.c.id.desc())
        .limit(limit)
    ).all()
    calls = []
    for r in rows:
        occurred = _aware(r.occurred_at)
        calls.append(
            {
                "id": r.id,
                "occurred_at": occurred.isoformat() if occurred else None,
                "user_id": r.user_id,
                "provider": r.provider,
                "model": r.model,
                "feature": r.feature,
                "input_tokens": r.input_tokens,
                "output_tokens": r.output_tokens,
                "total_tokens": r.total_tokens,
                "total_cost": format(r.total_cost, "f"),
                "currency": r.currency,
            }
        )
    return calls
