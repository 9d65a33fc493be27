"""Budgets: extra limits inside a billable's plan, held with the plan's counter, all or none.

A budget limits the calls of one billable that match it: all of them, or those of
one user, feature or model (or a combination). Each period it counts on its own
row, a :class:`~flask_ai_metering.models.BudgetCounter`, which a hold changes by the
same conditional ``UPDATE`` as a plan's counter (``… WHERE used + reserved + :n <=
limit``), so no budget is exceeded under any concurrency. Requests are counted too,
and only held calls count: a refused call never does, unlike a fixed-window limiter.

A call holds on the plan's counter first and then on its budgets in id order, in
one transaction, so two calls of a billable always lock in the same order and
never deadlock; a refusal anywhere rolls all of it back. PostgreSQL does the same
in one statement (:func:`flask_ai_metering.quota.postgres.reserve_budgeted`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import typing as t
from decimal import Decimal

import sqlalchemy as sa

from .. import validation as v
from ..config import thresholds as check_thresholds
from ..errors import InvalidUsage
from ..models import Budget
from ..models import BudgetCounter
from ..models import Reservation
from ..models import budget_scope
from ..models import budget_scope_items
from ..models import table
from ..models import utcnow
from ..money import from_units
from ..money import parse_money
from ..money import to_units
from ..prepared import Prepared
from .engine import LimitCheck
from .engine import percent
from .periods import Period
from .periods import period_for
from .policy import resolve_policy

if t.TYPE_CHECKING:
    from ..config import Settings
    from ..transactions import Transactions
    from .policy import Billable

budgets = table(Budget)
budget_counters = table(BudgetCounter)
reservations = table(Reservation)

#: A budget's periods, shortest first; ``minute`` and ``hour`` are UTC, the others calendar
#: periods in ``AI_METERING_TIMEZONE`` like a plan's.
PERIODS = ("minute", "hour", "day", "week", "month", "year")
_UNITS = dict(zip(PERIODS, ("minutely", "hourly", "daily", "weekly", "monthly", "yearly"), strict=True))
MODES = ("hard", "soft")


@dataclasses.dataclass(frozen=True)
class Terms:
    """A budget as a hold needs it: its scope, period and limits (cost in pico-units)."""

    id: int
    billable: Billable
    user_id: str | None
    feature: str | None
    model: str | None
    period: str
    token_limit: int | None
    cost_limit_units: int | None
    request_limit: int | None
    enforced: bool
    thresholds: tuple[int, ...] | None

    @property
    def scope(self) -> str:
        return budget_scope(self.billable, self.user_id, self.feature, self.model)

    def scope_items(self) -> list[tuple[str, str]]:
        return budget_scope_items(self.user_id, self.feature, self.model)

    def narrowness(self) -> tuple[int, int]:
        """Sorts narrower budgets last: more scope fields set, then a shorter period."""
        return (len(self.scope_items()), -PERIODS.index(self.period))

    @classmethod
    def of(cls, row: t.Any) -> Terms:
        return cls(
            id=int(row.id),
            billable=(row.billable_type, row.billable_id),
            user_id=row.user_id,
            feature=row.feature,
            model=row.model,
            period=row.period,
            token_limit=row.token_limit,
            cost_limit_units=None if row.cost_limit is None else to_units(row.cost_limit),
            request_limit=row.request_limit,
            enforced=row.mode == "hard",
            thresholds=None if row.thresholds is None else tuple(row.thresholds),
        )


def period_of(period: str, at: dt.datetime, timezone: str) -> Period:
    """The budget period containing ``at``."""
    zone = "UTC" if period in ("minute", "hour") else timezone
    return period_for(at, period_type=_UNITS[period], alignment="calendar", timezone=zone)


def period_bounds(at: dt.datetime, timezone: str) -> dict[str, tuple[dt.datetime, dt.datetime]]:
    """Every budget period containing ``at``: what a statement that picks by ``period`` needs."""
    return {name: (p.start, p.end) for name in PERIODS for p in (period_of(name, at, timezone),)}


# -- adding and removing ---------------------------------------------------------------------


def validate_budget(
    *,
    period: t.Any,
    token_limit: t.Any,
    cost_limit: t.Any,
    request_limit: t.Any,
    mode: t.Any,
    thresholds: t.Any,
) -> dict[str, t.Any]:
    """The budget's limits and options checked, naming the bad field; its column values."""
    if period not in PERIODS:
        raise InvalidUsage(f"period must be one of {', '.join(PERIODS)}; got {period!r}")
    if mode not in MODES:
        raise InvalidUsage(f"mode must be 'hard' or 'soft'; got {mode!r}")
    values: dict[str, t.Any] = {"period": period, "mode": mode}
    for field, value in (("token_limit", token_limit), ("request_limit", request_limit)):
        values[field] = v.token_count(value, field)
    if cost_limit is None:
        values["cost_limit"] = None
    else:
        amount = parse_money(cost_limit, "cost_limit")
        if amount < 0:
            raise InvalidUsage(f"cost_limit must not be negative, got {cost_limit!r}")
        values["cost_limit"] = amount
    if values["token_limit"] is None and values["cost_limit"] is None and values["request_limit"] is None:
        raise InvalidUsage("a budget needs a limit: token_limit, cost_limit or request_limit")
    values["thresholds"] = None if thresholds is None else list(check_thresholds(thresholds, "thresholds"))
    return values


def add_budget(
    store: Transactions,
    settings: Settings,
    billable: Billable,
    *,
    user_id: str | None,
    feature: str | None,
    model: str | None,
    now: dt.datetime | None = None,
    **options: t.Any,
) -> int:
    """Validate and insert a budget in a transaction of our own; its id.

    :raises InvalidUsage: naming the bad field; a ``feature`` the billable's plan forbids.
    """
    values = validate_budget(**options)

    def work(conn: sa.Connection) -> int:
        at = now or utcnow()
        policy = resolve_policy(conn, billable, at, settings)
        if feature is not None and not policy.allows_feature(feature):
            raise InvalidUsage(
                f"feature {feature!r} is not allowed by plan {policy.plan_slug!r}: a budget on it could never be used"
            )
        row = {
            "billable_type": billable[0],
            "billable_id": billable[1],
            "user_id": user_id,
            "feature": feature,
            "model": model,
            "created_at": at,
            **values,
        }
        return int(conn.execute(sa.insert(budgets).values(row)).inserted_primary_key[0])  # type: ignore[index]

    return store.run(work)


def remove_budget(store: Transactions, budget_id: int, now: dt.datetime | None = None) -> bool:
    """Retire a budget: calls stop holding on it; its counters stay for the record."""
    statement = (
        sa.update(budgets)
        .where(budgets.c.id == budget_id, budgets.c.removed_at.is_(None))
        .values(removed_at=now or utcnow())
    )
    return bool(store.run(lambda conn: conn.execute(statement).rowcount == 1))


# -- holding ---------------------------------------------------------------------------------


def matching_clause(b: sa.FromClause = budgets) -> sa.ColumnElement[bool]:
    """The live budgets of ``:k_type``/``:k_id`` that match a call's ``:b_user``, ``:b_feature``, ``:b_model``."""

    def either(column: str, bind: str) -> sa.ColumnElement[bool]:
        return sa.or_(b.c[column].is_(None), b.c[column] == sa.bindparam(bind, type_=sa.String))

    return sa.and_(
        b.c.billable_type == sa.bindparam("k_type", type_=sa.String),
        b.c.billable_id == sa.bindparam("k_id", type_=sa.String),
        b.c.removed_at.is_(None),
        either("user_id", "b_user"),
        either("feature", "b_feature"),
        either("model", "b_model"),
    )


def matching_params(
    billable: Billable, user_id: str | None, feature: str | None, model: str | None
) -> dict[str, t.Any]:
    return {"k_type": billable[0], "k_id": billable[1], "b_user": user_id, "b_feature": feature, "b_model": model}


_MATCHING = Prepared(sa.select(budgets).where(matching_clause()).order_by(budgets.c.id))


def matching(
    conn: sa.Connection, billable: Billable, user_id: str | None, feature: str | None, model: str | None
) -> list[Terms]:
    """The live budgets a call holds on, in id order (the order every hold locks them in)."""
    return [Terms.of(row) for row in _MATCHING.execute(conn, matching_params(billable, user_id, feature, model))]


class TermsCache:
    """Budgets' :class:`Terms` by id, read once per process: a budget's terms never change.

    Only a hold already written consults it, for budgets the statement matched itself:
    a stale entry cannot admit a call (a removed budget no longer matches).
    """

    def __init__(self, size: int = 10_000) -> None:
        self._size = size
        self._terms: dict[int, Terms] = {}

    def get(self, conn: sa.Connection, ids: t.Sequence[int]) -> dict[int, Terms]:
        missing = [budget_id for budget_id in ids if budget_id not in self._terms]
        if missing:
            if len(self._terms) + len(missing) > self._size:
                self._terms.clear()
            rows = conn.execute(sa.select(budgets).where(budgets.c.id.in_(missing)))
            self._terms.update((int(row.id), Terms.of(row)) for row in rows)
        return {budget_id: self._terms[budget_id] for budget_id in ids}


def admits(c: sa.FromClause = budget_counters, *, zero_tokens: bool = False) -> sa.ColumnElement[bool]:
    """A budget counter can hold ``:n`` tokens, ``:c`` cost and one more request (or does not enforce).

    As on a plan's counter, a limit reached refuses even a call of zero tokens or cost.
    """
    n = sa.bindparam("n", type_=sa.BigInteger)
    cost = sa.bindparam("c", type_=sa.BigInteger)
    tokens = c.c.used_tokens + c.c.reserved_tokens
    spent = c.c.used_cost_units + c.c.reserved_cost_units
    requests = c.c.used_requests + c.c.reserved_requests
    token_ok = [tokens + n <= c.c.token_limit] + ([tokens < c.c.token_limit] if zero_tokens else [])
    return sa.or_(
        c.c.enforced == sa.false(),
        sa.and_(
            sa.or_(c.c.token_limit.is_(None), *([sa.and_(*token_ok)])),
            sa.or_(
                c.c.cost_limit_units.is_(None),
                sa.and_(spent + cost <= c.c.cost_limit_units, spent < c.c.cost_limit_units),
            ),
            sa.or_(c.c.request_limit.is_(None), requests + 1 <= c.c.request_limit),
        ),
    )


def hold_values(c: sa.FromClause = budget_counters) -> dict[str, sa.ColumnElement[t.Any]]:
    return {
        "reserved_tokens": c.c.reserved_tokens + sa.bindparam("n", type_=sa.BigInteger),
        "reserved_cost_units": c.c.reserved_cost_units + sa.bindparam("c", type_=sa.BigInteger),
        "reserved_requests": c.c.reserved_requests + 1,
    }


@functools.cache
def _hold_returning(zero_tokens: bool) -> Prepared:
    return Prepared(_hold_statement(zero_tokens, True))


@functools.cache
def _hold_statement(zero_tokens: bool, returning: bool) -> t.Any:
    statement = (
        sa.update(budget_counters)
        .where(
            budget_counters.c.budget_id == sa.bindparam("bid"),
            budget_counters.c.period_start == sa.bindparam("start", type_=budget_counters.c.period_start.type),
            admits(zero_tokens=zero_tokens),
        )
        .values(hold_values())
    )
    return statement.returning(budget_counters.c.id) if returning else statement


_COUNTER_ID = sa.select(budget_counters.c.id).where(
    budget_counters.c.budget_id == sa.bindparam("bid"),
    budget_counters.c.period_start == sa.bindparam("start", type_=budget_counters.c.period_start.type),
)


def _try_hold(
    store: Transactions, conn: sa.Connection, budget_id: int, start: dt.datetime, tokens: int, cost: int
) -> int | None:
    params = {"bid": budget_id, "start": start, "n": tokens, "c": cost}
    if store.engine.dialect.update_returning:
        rows = _hold_returning(tokens == 0).execute(conn, params)
        return int(rows[0][0]) if rows else None
    if conn.execute(_hold_statement(tokens == 0, False), params).rowcount != 1:
        return None
    return int(conn.execute(_COUNTER_ID, params).scalar_one())


def counter_row(budget: Terms, period: Period, now: dt.datetime) -> dict[str, t.Any]:
    """A new counter's row: the budget's limits copied, nothing used yet."""
    return {
        "budget_id": budget.id,
        "period_start": period.start,
        "period_end": period.end,
        "token_limit": budget.token_limit,
        "cost_limit_units": budget.cost_limit_units,
        "request_limit": budget.request_limit,
        "enforced": budget.enforced,
        "created_at": now,
    }


def hold(
    store: Transactions,
    conn: sa.Connection,
    matched: t.Sequence[Terms],
    tokens: int,
    cost_units: int,
    at: dt.datetime,
    timezone: str,
) -> tuple[list[int], Terms | None]:
    """Hold on each budget in ``matched`` (id order); the counter ids, or the first budget that refused.

    The caller rolls its transaction back on a refusal: the holds made before it are undone with it.
    """
    held: list[int] = []
    for budget in matched:
        period = period_of(budget.period, at, timezone)
        counter_id = _try_hold(store, conn, budget.id, period.start, tokens, cost_units)
        if counter_id is None:
            store.insert_ignore(conn, budget_counters, counter_row(budget, period, at))
            counter_id = _try_hold(store, conn, budget.id, period.start, tokens, cost_units)
        if counter_id is None:
            return held, budget
        held.append(counter_id)
    return held, None


def record(
    store: Transactions,
    conn: sa.Connection,
    matched: t.Sequence[Terms],
    tokens: int,
    cost_units: int,
    at: dt.datetime,
    timezone: str,
) -> list[int]:
    """Add usage that already happened to each budget's counter of its period (never refused)."""
    counter_ids = []
    for budget in matched:
        period = period_of(budget.period, at, timezone)
        store.insert_ignore(conn, budget_counters, counter_row(budget, period, at))
        counter_ids.append(int(conn.execute(_COUNTER_ID, {"bid": budget.id, "start": period.start}).scalar_one()))
    apply(conn, counter_ids, used_tokens=tokens, used_cost_units=cost_units, requests=1)
    return counter_ids


# -- settling --------------------------------------------------------------------------------

_APPLY = (
    sa.update(budget_counters)
    .where(budget_counters.c.id.in_(sa.bindparam("ids", expanding=True)))
    .values(
        used_tokens=budget_counters.c.used_tokens + sa.bindparam("ut", type_=sa.BigInteger),
        used_cost_units=budget_counters.c.used_cost_units + sa.bindparam("uc", type_=sa.BigInteger),
        used_requests=budget_counters.c.used_requests + sa.bindparam("ureq", type_=sa.BigInteger),
        reserved_tokens=budget_counters.c.reserved_tokens - sa.bindparam("rt", type_=sa.BigInteger),
        reserved_cost_units=budget_counters.c.reserved_cost_units - sa.bindparam("rc", type_=sa.BigInteger),
        reserved_requests=budget_counters.c.reserved_requests - sa.bindparam("rreq", type_=sa.BigInteger),
    )
)


def apply(
    conn: sa.Connection,
    counter_ids: t.Sequence[int] | None,
    *,
    used_tokens: int = 0,
    used_cost_units: int = 0,
    requests: int = 0,
    release_tokens: int = 0,
    release_cost_units: int = 0,
    release_requests: int = 0,
) -> None:
    """Add usage to, and return held quota from, the budget counters a reservation held on."""
    if not counter_ids:
        return
    conn.execute(
        _APPLY,
        {
            "ids": list(counter_ids),
            "ut": used_tokens,
            "uc": used_cost_units,
            "ureq": requests,
            "rt": release_tokens,
            "rc": release_cost_units,
            "rreq": release_requests,
        },
    )


def counters_of_call(conn: sa.Connection, call: t.Any) -> list[int]:
    """The budget counters a ledger row's call counted on.

    A metered call's reservation lists them. Recorded usage (no reservation) counted
    on the budgets live when it was written, in the period containing its ``occurred_at``.
    """
    if call.reservation_id is not None:
        held = conn.execute(
            sa.select(reservations.c.budget_counter_ids).where(reservations.c.id == call.reservation_id)
        ).scalar()
        return [int(counter_id) for counter_id in held or []]
    written, at = call.created_at, call.occurred_at
    live = sa.and_(
        budgets.c.created_at <= written,
        sa.or_(budgets.c.removed_at.is_(None), budgets.c.removed_at > written),
        budget_counters.c.period_start <= at,
        budget_counters.c.period_end > at,
    )
    query = (
        sa.select(budget_counters.c.id)
        .join_from(budget_counters, budgets, budgets.c.id == budget_counters.c.budget_id)
        .where(matching_clause().self_group(), live)
    )
    params = matching_params((call.billable_type, call.billable_id), call.user_id, call.feature, call.model)
    return [int(row[0]) for row in conn.execute(query, params)]


def adjust_for_call(conn: sa.Connection, call: t.Any, *, tokens: int, cost_units: int, at: dt.datetime) -> list[int]:
    """Add an adjustment of a call (a refund's negative amounts, a repricing's cost) to its budgets.

    Only the counters the call counted on whose period still runs at ``at`` change, as a
    plan's counter does; requests stay counted (the call was made). Returns those counters.
    """
    counted = counters_of_call(conn, call)
    if not counted:
        return []
    running = [
        int(row[0])
        for row in conn.execute(
            sa.select(budget_counters.c.id).where(budget_counters.c.id.in_(counted), budget_counters.c.period_end > at)
        )
    ]
    apply(conn, running, used_tokens=tokens, used_cost_units=cost_units)
    return running


# -- where a budget stands -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Standing:
    """A budget counter's amounts with its budget (cost in pico-units)."""

    counter_id: int
    budget: Terms
    period_start: dt.datetime
    period_end: dt.datetime
    used_tokens: int
    reserved_tokens: int
    used_cost_units: int
    reserved_cost_units: int
    used_requests: int
    reserved_requests: int
    alert_level: int

    def percentages(self) -> list[float]:
        b = self.budget
        pairs = (
            (self.used_tokens + self.reserved_tokens, b.token_limit),
            (self.used_cost_units + self.reserved_cost_units, b.cost_limit_units),
            (self.used_requests + self.reserved_requests, b.request_limit),
        )
        return [percent(used, limit) for used, limit in pairs if limit is not None]

    def used_percentage(self) -> float:
        """The fuller dimension of the usage committed (what alerts judge)."""
        b = self.budget
        pairs = (
            (self.used_tokens, b.token_limit),
            (self.used_cost_units, b.cost_limit_units),
            (self.used_requests, b.request_limit),
        )
        return max([percent(used, limit) for used, limit in pairs if limit is not None] or [0.0])

    def check(
        self, *, warning_threshold: int, tokens: int = 0, cost_units: int = 0, reason: str | None = None
    ) -> LimitCheck:
        """This budget as a :class:`LimitCheck`, ``allowed`` if a call of ``tokens`` and ``cost_units`` fits."""
        b = self.budget
        held_tokens = self.used_tokens + self.reserved_tokens
        held_cost = self.used_cost_units + self.reserved_cost_units
        held_requests = self.used_requests + self.reserved_requests
        remaining_tokens = None if b.token_limit is None else max(0, b.token_limit - held_tokens)
        remaining_cost = None if b.cost_limit_units is None else max(0, b.cost_limit_units - held_cost)
        remaining_requests = None if b.request_limit is None else max(0, b.request_limit - held_requests)
        allowed = not b.enforced or (
            (remaining_tokens is None or remaining_tokens >= max(tokens, 1))
            and (remaining_cost is None or (remaining_cost >= cost_units and remaining_cost > 0))
            and (remaining_requests is None or remaining_requests >= 1)
        )
        percentage = max(self.percentages() or [0.0])
        return LimitCheck(
            allowed=allowed,
            approaching=percentage >= warning_threshold,
            hard_limit_reached=not allowed,
            remaining_tokens=remaining_tokens,
            remaining_cost=None if remaining_cost is None else from_units(remaining_cost),
            usage_percentage=percentage,
            period_start=self.period_start,
            period_end=self.period_end,
            token_limit=b.token_limit,
            cost_limit=None if b.cost_limit_units is None else from_units(b.cost_limit_units),
            used_tokens=self.used_tokens,
            reserved_tokens=self.reserved_tokens,
            used_cost=from_units(self.used_cost_units),
            reserved_cost=from_units(self.reserved_cost_units),
            reason=reason,
            fits_a_period=_fits(b, tokens, cost_units),
            request_limit=b.request_limit,
            remaining_requests=remaining_requests,
            used_requests=self.used_requests,
            budget_id=b.id,
            budget_scope=b.scope,
            budget_period=b.period,
        )


def _fits(b: Terms, tokens: int, cost_units: int) -> bool:
    return (b.token_limit is None or tokens <= b.token_limit) and (
        b.cost_limit_units is None or cost_units <= b.cost_limit_units
    )


COUNTER_COLUMNS = (
    "id",
    "period_start",
    "period_end",
    "used_tokens",
    "reserved_tokens",
    "used_cost_units",
    "reserved_cost_units",
    "used_requests",
    "reserved_requests",
    "alert_level",
)
_STANDINGS = (
    sa.select(*(budget_counters.c[name].label("bc_" + name) for name in COUNTER_COLUMNS), budgets)
    .join_from(budget_counters, budgets, budgets.c.id == budget_counters.c.budget_id)
    .where(budget_counters.c.id.in_(sa.bindparam("ids", expanding=True)))
    .order_by(budget_counters.c.id)
)


def _standing(row: t.Any) -> Standing:
    return standing_of([row[i] for i in range(len(COUNTER_COLUMNS))], Terms.of(row))


def standing_of(values: t.Sequence[t.Any], budget: Terms) -> Standing:
    """A :class:`Standing` from a counter's :data:`COUNTER_COLUMNS` (times may come as JSON strings)."""
    start, end = (_utc(value) for value in values[1:3])
    return Standing(int(values[0]), budget, start, end, *(int(x) for x in values[3:]))


def _utc(value: t.Any) -> dt.datetime:
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    return t.cast(dt.datetime, value).replace(tzinfo=dt.timezone.utc)


def standings(conn: sa.Connection, counter_ids: t.Sequence[int]) -> list[Standing]:
    """The budget counters ``counter_ids`` as they stand, with their budgets."""
    if not counter_ids:
        return []
    return [_standing(row) for row in conn.execute(_STANDINGS, {"ids": list(counter_ids)})]


def current_standing(conn: sa.Connection, budget: Terms, at: dt.datetime, timezone: str) -> Standing:
    """Where ``budget`` stands in the period containing ``at`` (zeros before its first call)."""
    period = period_of(budget.period, at, timezone)
    row = conn.execute(_COUNTER_ID, {"bid": budget.id, "start": period.start}).first()
    if row is not None:
        return standings(conn, [int(row[0])])[0]
    return Standing(0, budget, period.start, period.end, 0, 0, 0, 0, 0, 0, 0)


def refusal(
    conn: sa.Connection,
    matched: t.Sequence[Terms],
    tokens: int,
    cost_units: int,
    at: dt.datetime,
    timezone: str,
    warning_threshold: int,
) -> LimitCheck | None:
    """The narrowest of ``matched`` that refuses a call of ``tokens`` and ``cost_units``, as a check."""
    refusing = []
    for budget in matched:
        standing = current_standing(conn, budget, at, timezone)
        if not standing.check(warning_threshold=warning_threshold, tokens=tokens, cost_units=cost_units).allowed:
            refusing.append(standing)
    if not refusing:
        return None
    narrowest = max(refusing, key=lambda s: s.budget.narrowness())
    check = narrowest.check(warning_threshold=warning_threshold, tokens=tokens, cost_units=cost_units)
    return dataclasses.replace(check, reason=refusal_reason(check, tokens, cost_units))


def refusal_reason(check: LimitCheck, tokens: int, cost_units: int) -> str:
    """Which budget refused, what remains of it, and when it resets, in words for an end user."""
    resets = check.period_end.isoformat()
    what = f"The budget for {check.budget_scope} (per {check.budget_period})"
    if check.request_limit is not None and check.remaining_requests == 0:
        return f"{what} allows {check.request_limit} requests and none remain. It resets at {resets}."
    if check.token_limit is not None and (check.remaining_tokens or 0) < max(tokens, 1):
        return (
            f"{what} has {check.remaining_tokens} of {check.token_limit} tokens left and the call needs up to"
            f" {tokens}. It resets at {resets}."
        )
    cost = Decimal(cost_units).scaleb(-12).normalize()
    return (
        f"{what} has {check.remaining_cost} of its {check.cost_limit} cost limit left and the call may cost up to"
        f" {cost}. It resets at {resets}."
    )


def tightest(checks: t.Iterable[LimitCheck]) -> LimitCheck:
    """The check closest to its limit (ties: the one that resets first): what headers report."""
    return max(checks, key=lambda c: (c.usage_percentage, -c.period_end.timestamp()))


def budgets_of(conn: sa.Connection, billable: Billable | None = None, *, include_removed: bool = False) -> list[t.Any]:
    """Budget rows, of one billable or all, in id order."""
    query = sa.select(budgets).order_by(budgets.c.id)
    if billable is not None:
        query = query.where(budgets.c.billable_type == billable[0], budgets.c.billable_id == billable[1])
    if not include_removed:
        query = query.where(budgets.c.removed_at.is_(None))
    return list(conn.execute(query))
