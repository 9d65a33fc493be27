"""What applies to a billable right now: its plan, limits, period and billing mode.

Read fresh inside every metering transaction (never cached: a cached limit is a
stale limit), in one query for a subscribed billable.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import typing as t
from decimal import Decimal

import sqlalchemy as sa

from .models import Plan
from .models import Subscription
from .models import UsageLimitOverride
from .models import table
from .periods import Period
from .periods import period_for

if t.TYPE_CHECKING:
    from .config import Settings

Billable = tuple[str, str]

_subs = table(Subscription)
_plans = table(Plan)
_overrides = table(UsageLimitOverride)


@dataclasses.dataclass(frozen=True)
class Policy:
    """The rules one metered call or check runs under."""

    billable: Billable
    period: Period
    #: Selects the counter row: each plan segment of a period counts on its own.
    plan_version: int = 0
    token_limit: int | None = None
    #: Cost limit in pico-units (None: unlimited).
    cost_limit_units: int | None = None
    billing_mode: str = "plan"
    plan_id: int | None = None
    plan_slug: str | None = None
    features: tuple[str, ...] | None = None
    overage_price_per_1k_tokens: Decimal | None = None
    subscription_id: int | None = None
    #: The subscription has ended (past any grace period): every call is refused.
    expired: bool = False

    @property
    def limited(self) -> bool:
        return self.token_limit is not None or self.cost_limit_units is not None

    def allows_feature(self, feature: str | None) -> bool:
        return not self.features or feature is None or feature in self.features


_B_TYPE: sa.BindParameter[str] = sa.bindparam("b_type")
_B_ID: sa.BindParameter[str] = sa.bindparam("b_id")
_NOW = sa.bindparam("now", type_=_overrides.c.period_start.type)


def _override_column(column: str) -> sa.ScalarSelect[t.Any]:
    """The newest override in force for ``column``, as a scalar subquery."""
    col: sa.ColumnElement[t.Any] = _overrides.c[column]
    if column == "cost_limit":
        col = sa.type_coerce(col, sa.BigInteger)
    return (
        sa.select(col)
        .where(
            _overrides.c.billable_type == _B_TYPE,
            _overrides.c.billable_id == _B_ID,
            _overrides.c.period_start <= _NOW,
            _overrides.c.period_end > _NOW,
            _overrides.c[column].is_not(None),
        )
        .order_by(_overrides.c.id.desc())
        .limit(1)
        .scalar_subquery()
    )


# Built once: statements are reused with new parameters on every call.
_POLICY = (
    sa.select(
        _subs.c.id,
        _subs.c.plan_id,
        _subs.c.billing_mode,
        _subs.c.started_at,
        _subs.c.ends_at,
        _subs.c.grace_period_ends_at,
        _subs.c.plan_version,
        _plans.c.slug,
        _plans.c.token_limit,
        sa.type_coerce(_plans.c.cost_limit, sa.BigInteger).label("cost_limit"),
        _plans.c.features,
        _plans.c.period,
        _plans.c.overage_price_per_1k_tokens,
        _override_column("token_limit").label("o_tokens"),
        _override_column("cost_limit").label("o_cost"),
    )
    .select_from(_subs.join(_plans, _plans.c.id == _subs.c.plan_id))
    .where(_subs.c.billable_type == _B_TYPE, _subs.c.billable_id == _B_ID)
)
_OVERRIDES_ONLY = sa.select(
    _override_column("token_limit").label("o_tokens"), _override_column("cost_limit").label("o_cost")
)


def resolve_policy(conn: sa.Connection, billable: Billable, now: dt.datetime, settings: Settings) -> Policy:
    """Build the :class:`Policy` of ``billable`` at ``now`` in one round trip."""
    row = conn.execute(_POLICY, {"b_type": billable[0], "b_id": billable[1], "now": now}).first()
    if row is None:
        return _unsubscribed(conn, billable, now, settings)
    period = period_for(
        now,
        period_type=row.period or settings.period_type,
        alignment=settings.period_alignment,
        timezone=settings.timezone,
        anchor=row.started_at,
    )
    expired = (
        row.ends_at is not None
        and row.ends_at <= now
        and not (row.grace_period_ends_at is not None and row.grace_period_ends_at > now)
    ) or row.started_at > now
    return Policy(
        billable=billable,
        period=period,
        plan_version=row.plan_version,
        token_limit=row.o_tokens if row.o_tokens is not None else row.token_limit,
        cost_limit_units=row.o_cost if row.o_cost is not None else row.cost_limit,
        billing_mode=row.billing_mode,
        plan_id=row.plan_id,
        plan_slug=row.slug,
        features=tuple(row.features) if row.features else None,
        overage_price_per_1k_tokens=row.overage_price_per_1k_tokens,
        subscription_id=row.id,
        expired=expired,
    )


def _unsubscribed(conn: sa.Connection, billable: Billable, now: dt.datetime, settings: Settings) -> Policy:
    """A billable without a subscription: metered, unlimited unless an override says otherwise."""
    row = conn.execute(_OVERRIDES_ONLY, {"b_type": billable[0], "b_id": billable[1], "now": now}).first()
    period = period_for(now, period_type=settings.period_type, alignment="calendar", timezone=settings.timezone)
    return Policy(
        billable=billable,
        period=period,
        token_limit=row.o_tokens if row is not None else None,
        cost_limit_units=row.o_cost if row is not None else None,
    )
