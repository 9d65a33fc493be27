"""What applies to a billable right now: its plan, limits, period and billing mode.

Read fresh for every metered call (a cached limit is a stale limit), in one query
that returns one row whether or not the billable has a subscription.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
import typing as t
from decimal import Decimal

import sqlalchemy as sa

from ..models import Budget
from ..models import Plan
from ..models import Subscription
from ..models import UsageLimitOverride
from ..models import table
from ..prepared import Prepared
from .periods import Period
from .periods import period_for

if t.TYPE_CHECKING:
    from ..config import Settings

Billable = tuple[str, str]

# Short aliases: the query is embedded in PostgreSQL's one-statement reserve, whose
# text must stay under psycopg's 4 KiB limit for caching a parsed statement.
_subs = table(Subscription).alias("s")
_plans = table(Plan).alias("p")
_overrides = table(UsageLimitOverride).alias("o")


@dataclasses.dataclass(frozen=True)
class Policy:
    """The rules one metered call or check runs under."""

    billable: Billable
    period: Period
    #: Selects the counter row (``Counter.plan_version``): the subscription's counter segment,
    #: which a plan change moves only under ``AI_METERING_PLAN_CHANGE = "reset"``.
    counter_segment: int = 0
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
    #: The plan's own period type (None: ``AI_METERING_PERIOD_TYPE``).
    plan_period: str | None = None
    #: The subscription's start, which rolling periods are anchored on.
    anchor: dt.datetime | None = None
    #: ``AI_METERING_DEFAULT_PLAN``, a parameter of the policy query (it holds billables
    #: without a subscription to that plan's limits).
    default_plan: str | None = None
    #: The billable has live budgets: a call must also hold on those that match it.
    has_budgets: bool = False

    @property
    def limited(self) -> bool:
        return self.token_limit is not None or self.cost_limit_units is not None

    def allows_feature(self, feature: str | None) -> bool:
        return not self.features or feature is None or feature in self.features


_B_TYPE: sa.BindParameter[str] = sa.bindparam("b_type")
_DEFAULT: sa.BindParameter[str] = sa.bindparam("default_plan")
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


def _prorated(prorated: sa.ColumnElement[t.Any], plan: sa.ColumnElement[t.Any]) -> sa.ColumnElement[t.Any]:
    """The prorated limit while its period runs (NULL there: unlimited), else the plan's."""
    return sa.case((_subs.c.prorated_until > _NOW, prorated), else_=plan)


_ONE_ROW = sa.select(sa.literal(1).label("one")).subquery("one_row")

#: The policy's inputs in one row, subscribed or not (the subscription columns are
#: NULL for a billable without one). Built once: reused with new parameters on
#: every call, and embedded whole in PostgreSQL's one-statement reserve.
POLICY_QUERY = sa.select(
    _subs.c.id,
    _plans.c.id.label("plan_id"),  # the subscription's plan, or the default plan
    _subs.c.billing_mode,
    _subs.c.started_at,
    _subs.c.ends_at,
    _subs.c.grace_period_ends_at,
    _subs.c.counter_segment,
    _plans.c.slug,
    # The limits in force: the newest override's, else the prorated ones, else the plan's.
    sa.func.coalesce(
        _override_column("token_limit"), _prorated(_subs.c.prorated_token_limit, _plans.c.token_limit)
    ).label("token_limit"),
    sa.func.coalesce(
        _override_column("cost_limit"),
        _prorated(_subs.c.prorated_cost_units, sa.type_coerce(_plans.c.cost_limit, sa.BigInteger)),
    ).label("cost_limit"),
    _plans.c.features,
    _plans.c.period,
    _plans.c.overage_price_per_1k_tokens,
).select_from(
    _ONE_ROW.outerjoin(_subs, sa.and_(_subs.c.billable_type == _B_TYPE, _subs.c.billable_id == _B_ID)).outerjoin(
        # The subscription's plan; without a subscription, the default plan (if one is set).
        _plans,
        sa.or_(_plans.c.id == _subs.c.plan_id, sa.and_(_subs.c.id.is_(None), _plans.c.slug == _DEFAULT)),
    )
)


_budgets = table(Budget).alias("b")
#: Whether the billable has a live budget (read with the policy: most have none).
HAS_BUDGETS = sa.exists(
    sa.select(_budgets.c.id).where(
        _budgets.c.billable_type == _B_TYPE, _budgets.c.billable_id == _B_ID, _budgets.c.removed_at.is_(None)
    )
)
_RESOLVE_QUERY = Prepared(POLICY_QUERY.add_columns(HAS_BUDGETS.label("has_budgets")))


def policy_params(billable: Billable, now: dt.datetime, default_plan: str | None) -> dict[str, t.Any]:
    return {"b_type": billable[0], "b_id": billable[1], "now": now, "default_plan": default_plan}


def resolve_policy(conn: sa.Connection, billable: Billable, now: dt.datetime, settings: Settings) -> Policy:
    """Build the :class:`Policy` of ``billable`` at ``now`` in one round trip.

    :raises ConfigurationError: ``AI_METERING_DEFAULT_PLAN`` names a plan that does not exist
        (checked here, at first use, since it needs the database).
    """
    params = policy_params(billable, now, settings.default_plan)
    (row,) = _RESOLVE_QUERY.execute(conn, params)
    return policy_from_row(row, billable, now, settings)


#: The columns of :data:`POLICY_QUERY` that may change while a billable stays on the
#: same counter. PostgreSQL's one-statement reserve requires the others unchanged and
#: returns only these.
TERMS = ("plan_id", "billing_mode", "slug", "token_limit", "cost_limit", "features", "overage_price_per_1k_tokens")


def _terms(row: t.Any) -> dict[str, t.Any]:
    return {
        "plan_id": row.plan_id,
        "billing_mode": row.billing_mode or "plan",
        "plan_slug": row.slug,
        "token_limit": row.token_limit,
        "cost_limit_units": row.cost_limit,
        "features": tuple(row.features) if row.features else None,
        "overage_price_per_1k_tokens": row.overage_price_per_1k_tokens,
    }


def policy_from_row(row: t.Any, billable: Billable, now: dt.datetime, settings: Settings) -> Policy:
    """The :class:`Policy` a :data:`POLICY_QUERY` row describes at ``now``."""
    if row.id is None:
        # No subscription: the default plan's limits on the billable's own counter, in
        # calendar periods (there is no start to anchor on); else unlimited unless an
        # override says otherwise.
        if settings.default_plan is not None and row.slug is None:
            raise settings.missing_default_plan()
        period = period_for(
            now, period_type=row.period or settings.period_type, alignment="calendar", timezone=settings.timezone
        )
        return Policy(
            billable=billable,
            period=period,
            plan_period=row.period,
            default_plan=settings.default_plan,
            has_budgets=bool(getattr(row, "has_budgets", False)),
            **_terms(row),
        )
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
        counter_segment=row.counter_segment,
        subscription_id=row.id,
        expired=expired,
        plan_period=row.period,
        anchor=row.started_at,
        default_plan=settings.default_plan,
        has_budgets=bool(getattr(row, "has_budgets", False)),
        **_terms(row),
    )


def with_terms(recent: Policy, row: t.Any) -> Policy:
    """``recent`` with the :data:`TERMS` of ``row``, read while the subscription was active."""
    return dataclasses.replace(recent, expired=False, **_terms(row))


class RecentPolicies:
    """The last policy read per billable: which counter its next call will most likely hit.

    Never trusted for a limit. PostgreSQL's one-statement reserve re-reads the
    policy's rows in the same statement and holds quota only if they still select
    the remembered counter; otherwise nothing is written and the call reads the
    policy afresh. Bounded: past ``size`` billables the oldest are forgotten.
    """

    def __init__(self, size: int = 10_000) -> None:
        self._size = size
        self._policies: dict[Billable, Policy] = {}
        self._lock = threading.Lock()

    def get(self, billable: Billable, now: dt.datetime) -> Policy | None:
        """The remembered policy, if ``now`` is still in its period."""
        policy = self._policies.get(billable)
        if policy is None or not policy.period.start <= now < policy.period.end:
            return None
        return policy

    def remember(self, policy: Policy) -> None:
        if self._policies.get(policy.billable) == policy:
            return
        with self._lock:
            while len(self._policies) >= self._size:
                del self._policies[next(iter(self._policies))]
            self._policies[policy.billable] = policy
