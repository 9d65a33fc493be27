"""Atomic quota: reserve before the call, commit the actual usage after, or release.

Every admission decision is one conditional ``UPDATE`` on the billable's counter
row (``… WHERE used + reserved + :n <= :limit``) with a row-count check, so
committed + reserved never exceeds a hard limit under any concurrency, on any of
the supported databases. Nothing is read and then incremented.

The phases mirror a two-phase transfer: *reserve* holds ``max_tokens`` and their
worst-case cost; *commit* moves the actual usage to ``used`` and returns the rest
of the hold (usage above the hold is committed too: a provider can exceed
``max_tokens`` only by what it really spent); *release* returns the whole hold;
*expire* releases holds whose process died. A reservation's status changes once,
by a guarded UPDATE, so a late commit and the sweeper cannot both count it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import typing as t
from decimal import Decimal

import sqlalchemy as sa

from ..models import Counter
from ..models import Reservation
from ..models import table
from ..money import from_units
from ..prepared import Prepared
from ..prepared import PreparedInsert
from .policy import Billable
from .policy import Policy

if t.TYPE_CHECKING:
    from ..transactions import Transactions

counters = table(Counter)
reservations = table(Reservation)

#: A counter's amounts, then the alert threshold it last announced (:class:`CounterState`'s fields).
USED_COLUMNS = _USED = (
    counters.c.used_tokens,
    counters.c.reserved_tokens,
    counters.c.used_cost_units,
    counters.c.reserved_cost_units,
    counters.c.alert_level,
)


@dataclasses.dataclass(frozen=True)
class LimitCheck:
    """Where a billable stands against its limits in the current period.

    ``remaining_*`` count quota held by reservations as spent; ``None`` means
    unlimited. ``usage_percentage`` is the fuller of the two dimensions.
    """

    allowed: bool
    approaching: bool
    hard_limit_reached: bool
    remaining_tokens: int | None
    remaining_cost: Decimal | None
    usage_percentage: float
    period_start: dt.datetime
    period_end: dt.datetime
    token_limit: int | None = None
    cost_limit: Decimal | None = None
    used_tokens: int = 0
    reserved_tokens: int = 0
    used_cost: Decimal = Decimal(0)
    reserved_cost: Decimal = Decimal(0)
    #: Why the call was refused, in words fit for an end user.
    reason: str | None = None
    #: The subscription has ended (or not started): the period's reset does not lift the refusal.
    expired: bool = False
    #: False when the call asked for more than a whole period allows: no reset lifts the refusal.
    fits_a_period: bool = True
    #: Requests per period, for a budget with a ``request_limit`` (None: not limited).
    request_limit: int | None = None
    remaining_requests: int | None = None
    used_requests: int = 0
    #: The budget this check is about (None: the plan's counter).
    budget_id: int | None = None
    #: Who the budget limits, in words (``Team:1 user 7``).
    budget_scope: str | None = None
    #: The budget's period: ``minute``, ``hour``, ``day``, ``week``, ``month`` or ``year``.
    budget_period: str | None = None

    @property
    def resets_at(self) -> dt.datetime:
        return self.period_end

    def retry_after(self, now: dt.datetime | None = None) -> int:
        """Whole seconds until the period resets (at least 1)."""
        now = now or dt.datetime.now(dt.timezone.utc)
        return max(1, int((self.period_end - now).total_seconds() + 0.999))

    def as_json(self) -> dict[str, t.Any]:
        """The fields a 429/402 body carries, money as decimal strings.

        A budget's check adds ``budget`` (``id``, ``scope``, ``period``) and its request counts.
        """
        body: dict[str, t.Any] = {
            "remaining_tokens": self.remaining_tokens,
            "remaining_cost": None if self.remaining_cost is None else str(self.remaining_cost),
            "usage_percentage": self.usage_percentage,
            "token_limit": self.token_limit,
            "cost_limit": None if self.cost_limit is None else str(self.cost_limit),
            "period_start": self.period_start.isoformat(),
            "resets_at": self.period_end.isoformat(),
        }
        if self.request_limit is not None:
            body["request_limit"] = self.request_limit
            body["remaining_requests"] = self.remaining_requests
        if self.budget_id is not None:
            body["budget"] = {"id": self.budget_id, "scope": self.budget_scope, "period": self.budget_period}
        return body


@dataclasses.dataclass(frozen=True)
class CounterState:
    """A counter row's amounts (costs in pico-units) and the alert threshold it last announced."""

    used_tokens: int = 0
    reserved_tokens: int = 0
    used_cost_units: int = 0
    reserved_cost_units: int = 0
    alert_level: int = 0

    @classmethod
    def of(cls, row: t.Any) -> CounterState:
        """From the :data:`USED_COLUMNS` of a row."""
        if row is None:
            return cls()
        return cls(int(row[0]), int(row[1]), int(row[2]), int(row[3]), int(row[4]))


def limit_check(
    policy: Policy,
    state: CounterState,
    *,
    warning_threshold: int,
    want_tokens: int = 0,
    reason: str | None = None,
) -> LimitCheck:
    """Judge ``state`` against ``policy``: is a call of ``want_tokens`` allowed now?

    With ``want_tokens`` 0 a call is allowed while anything remains; otherwise while
    at least ``want_tokens`` remain. Cost only needs something left, because the
    cost of a call is not known before it runs (reservations hold their own).
    """
    held_tokens = state.used_tokens + state.reserved_tokens
    held_cost = state.used_cost_units + state.reserved_cost_units
    percentages = [0.0]
    remaining_tokens = remaining_cost_units = None
    allowed = not policy.expired
    if policy.token_limit is not None:
        remaining_tokens = max(0, policy.token_limit - held_tokens)
        percentages.append(percent(held_tokens, policy.token_limit))
        allowed &= remaining_tokens >= max(want_tokens, 1)
    if policy.cost_limit_units is not None:
        remaining_cost_units = max(0, policy.cost_limit_units - held_cost)
        percentages.append(percent(held_cost, policy.cost_limit_units))
        allowed &= remaining_cost_units > 0
    percentage = max(percentages)
    if policy.expired and reason is None:
        reason = "The subscription has expired."
    return LimitCheck(
        allowed=allowed,
        approaching=percentage >= warning_threshold,
        hard_limit_reached=not allowed,
        remaining_tokens=remaining_tokens,
        remaining_cost=None if remaining_cost_units is None else from_units(remaining_cost_units),
        usage_percentage=percentage,
        period_start=policy.period.start,
        period_end=policy.period.end,
        token_limit=policy.token_limit,
        cost_limit=None if policy.cost_limit_units is None else from_units(policy.cost_limit_units),
        used_tokens=state.used_tokens,
        reserved_tokens=state.reserved_tokens,
        used_cost=from_units(state.used_cost_units),
        reserved_cost=from_units(state.reserved_cost_units),
        reason=reason,
        expired=policy.expired,
        fits_a_period=policy.token_limit is None or want_tokens <= policy.token_limit,
    )


def percent(part: int, whole: int) -> float:
    """``part`` of ``whole`` in percent, capped at 100 and rounded to 2 places (100 for a zero limit)."""
    if whole <= 0:
        return 100.0
    return round(min(100.0, part * 100 / whole), 2)


def refusal_reason(policy: Policy, state: CounterState, tokens: int, cost_units: int) -> str:
    """Say which limit refused a reservation of ``tokens`` and when it resets."""
    resets = policy.period.end.isoformat()
    if policy.expired:
        return "The subscription has expired."
    if policy.token_limit is not None and state.used_tokens + state.reserved_tokens + tokens > policy.token_limit:
        left = max(0, policy.token_limit - state.used_tokens - state.reserved_tokens)
        return (
            f"Token limit of {policy.token_limit} reached: {left} tokens remain this period and the call"
            f" needs up to {tokens}. The limit resets at {resets}."
        )
    limit = policy.cost_limit_units
    return (
        f"Cost limit of {from_units(limit or 0).normalize()} reached for this period (a call may cost up to"
        f" {from_units(cost_units).normalize()}). The limit resets at {resets}."
    )


def counter_key(policy: Policy) -> dict[str, t.Any]:
    """The unique key of the counter ``policy`` counts on: its billable, period and counter segment."""
    return {
        "billable_type": policy.billable[0],
        "billable_id": policy.billable[1],
        "period_start": policy.period.start,
        "plan_version": policy.counter_segment,
    }


#: Each key column's bind parameter in the statements that select a counter by its key.
_KEY_BINDS = {"billable_type": "k_type", "billable_id": "k_id", "period_start": "k_start", "plan_version": "k_version"}


def key_clause(c: sa.FromClause = counters) -> sa.ColumnElement[bool]:
    """Selects a period's counter by its unique key (``c``: the table or an alias of it)."""
    return sa.and_(*(c.c[name] == sa.bindparam(bind, type_=counters.c[name].type) for name, bind in _KEY_BINDS.items()))


KEY_CLAUSE = key_clause()


def key_params(policy: Policy) -> dict[str, t.Any]:
    """:func:`counter_key` as the parameters of :func:`key_clause`."""
    return {_KEY_BINDS[name]: value for name, value in counter_key(policy).items()}


def ensure_counter(store: Transactions, conn: sa.Connection, policy: Policy, now: dt.datetime) -> None:
    """Create the period's counter row if it is missing (race-free, insert-if-absent)."""
    store.insert_ignore(
        conn,
        counters,
        {**counter_key(policy), "period_end": policy.period.end, "created_at": now},
    )


_READ = sa.select(counters.c.id, *_USED).where(KEY_CLAUSE)


def read_counter(conn: sa.Connection, policy: Policy) -> tuple[int | None, CounterState]:
    """The counter's id and amounts (``None``, zeros when it does not exist yet)."""
    row = conn.execute(_READ, key_params(policy)).first()
    if row is None:
        return None, CounterState()
    return int(row[0]), CounterState.of(row[1:])


@functools.cache
def admits(
    token_limit: sa.ColumnElement[t.Any] | None,
    cost_limit: sa.ColumnElement[t.Any] | None,
    zero_tokens: bool,
    c: sa.FromClause = counters,
) -> list[sa.ColumnElement[bool]]:
    """The conditions under which a counter can hold ``:n`` more tokens and ``:c`` more cost.

    A call of zero tokens (or unpriced cost) is still refused once the limit is
    reached: something must remain.
    """
    conditions: list[sa.ColumnElement[bool]] = []
    held_tokens = c.c.used_tokens + c.c.reserved_tokens
    held_cost = c.c.used_cost_units + c.c.reserved_cost_units
    if token_limit is not None:
        conditions.append(held_tokens + sa.bindparam("n", type_=sa.BigInteger) <= token_limit)
        if zero_tokens:
            conditions.append(held_tokens < token_limit)
    if cost_limit is not None:
        conditions.append(held_cost + sa.bindparam("c", type_=sa.BigInteger) <= cost_limit)
        conditions.append(held_cost < cost_limit)
    return conditions


def hold_values(c: sa.FromClause = counters) -> dict[str, sa.ColumnElement[t.Any]]:
    """The SET clause that holds ``:n`` tokens and ``:c`` cost on a counter."""
    return {
        "reserved_tokens": c.c.reserved_tokens + sa.bindparam("n", type_=sa.BigInteger),
        "reserved_cost_units": c.c.reserved_cost_units + sa.bindparam("c", type_=sa.BigInteger),
    }


def reserve_update(tokens_limited: bool, cost_limited: bool, zero_tokens: bool) -> t.Any:
    """The conditional UPDATE for one shape of limits, built once (statements are reused)."""
    token_limit: sa.BindParameter[int] | None = sa.bindparam("token_limit") if tokens_limited else None
    cost_limit: sa.BindParameter[int] | None = sa.bindparam("cost_limit") if cost_limited else None
    return sa.update(counters).where(KEY_CLAUSE, *admits(token_limit, cost_limit, zero_tokens)).values(hold_values())


@functools.cache
def _reserve_returning(tokens_limited: bool, cost_limited: bool, zero_tokens: bool) -> Prepared:
    return Prepared(reserve_update(tokens_limited, cost_limited, zero_tokens).returning(counters.c.id))


def reserve_params(
    policy: Policy, tokens: int, cost_units: int, tokens_limited: bool, cost_limited: bool
) -> dict[str, t.Any]:
    params = {**key_params(policy), "n": tokens, "c": cost_units}
    if tokens_limited:
        params["token_limit"] = policy.token_limit
    if cost_limited:
        params["cost_limit"] = policy.cost_limit_units
    return params


_COUNTER_ID = sa.select(counters.c.id).where(KEY_CLAUSE)


def try_reserve(
    store: Transactions, conn: sa.Connection, policy: Policy, tokens: int, cost_units: int, *, enforce: bool
) -> int | None:
    """Hold ``tokens`` and ``cost_units`` on the counter in one conditional UPDATE.

    Returns the counter id, or None when a limit refuses the hold. The WHERE
    clause is the admission decision: the database re-evaluates it on the latest
    committed row, so two racing callers can never both take the last tokens.
    """
    tokens_limited = enforce and policy.token_limit is not None
    cost_limited = enforce and policy.cost_limit_units is not None
    params = reserve_params(policy, tokens, cost_units, tokens_limited, cost_limited)
    if store.engine.dialect.update_returning:
        rows = _reserve_returning(tokens_limited, cost_limited, tokens == 0).execute(conn, params)
        return int(rows[0][0]) if rows else None
    if conn.execute(reserve_update(tokens_limited, cost_limited, tokens == 0), params).rowcount != 1:
        return None
    return int(conn.execute(_COUNTER_ID, key_params(policy)).scalar_one())


#: What every hold writes into its reservation row (PostgreSQL's one-statement hold binds these).
RESERVATION_COLUMNS = (
    "billable_type",
    "billable_id",
    "idempotency_key",
    "idempotency_scope",
    "status",
    "tokens",
    "cost_units",
    "credit_units",
    "expires_at",
    "created_at",
)
_INSERT_RESERVATION = PreparedInsert(
    reservations, ("counter_id", *RESERVATION_COLUMNS, "wallet_id", "budget_counter_ids")
)


def add_reservation(
    conn: sa.Connection,
    *,
    counter_id: int,
    billable: Billable,
    tokens: int,
    cost_units: int,
    idempotency_key: str | None,
    scope: str,
    expires_at: dt.datetime,
    now: dt.datetime,
    wallet_id: int | None = None,
    credit_units: int = 0,
    budget_counter_ids: list[int] | None = None,
) -> int:
    """Write the reservation row; its unique key is the idempotency claim."""
    values = {
        "counter_id": counter_id,
        "billable_type": billable[0],
        "billable_id": billable[1],
        "idempotency_key": idempotency_key,
        "idempotency_scope": scope,
        "status": "pending",
        "tokens": tokens,
        "cost_units": cost_units,
        "credit_units": credit_units,
        "wallet_id": wallet_id,
        "expires_at": expires_at,
        "created_at": now,
        "budget_counter_ids": budget_counter_ids or None,
    }
    return _INSERT_RESERVATION.id(conn, values)


@dataclasses.dataclass(frozen=True)
class Settled:
    """What a reservation held."""

    counter_id: int
    tokens: int
    cost_units: int
    credit_units: int
    wallet_id: int | None
    budget_counter_ids: list[int] | None = None


def settle_statement(keep_key: bool) -> t.Any:
    return _SETTLE[keep_key]


_SETTLE = {
    keep_key: sa.update(reservations)
    .where(reservations.c.id == sa.bindparam("rid"), reservations.c.status == "pending")
    .values(
        status=sa.bindparam("status"),
        settled_at=sa.bindparam("at", type_=reservations.c.settled_at.type),
        **({} if keep_key else {"idempotency_key": None}),
    )
    for keep_key in (True, False)
}
_HOLD = sa.select(
    reservations.c.counter_id,
    reservations.c.tokens,
    reservations.c.cost_units,
    reservations.c.credit_units,
    reservations.c.wallet_id,
    reservations.c.budget_counter_ids,
).where(reservations.c.id == sa.bindparam("rid"))
_SETTLE_PREPARED = {keep_key: Prepared(statement) for keep_key, statement in _SETTLE.items()}
_HOLD_PREPARED = Prepared(_HOLD)


def settle_reservation(
    conn: sa.Connection, reservation_id: int, status: str, now: dt.datetime, *, keep_key: bool
) -> bool:
    """Move a pending reservation to ``status`` by a guarded UPDATE; True if we moved it.

    False means another actor (the sweeper, a racing commit) settled it first.
    """
    params = {"rid": reservation_id, "status": status, "at": now}
    return _SETTLE_PREPARED[keep_key].rowcount(conn, params) == 1


def held_by(conn: sa.Connection, reservation_id: int) -> Settled:
    """What a reservation holds, as stored."""
    (row,) = _HOLD_PREPARED.execute(conn, {"rid": reservation_id})
    return Settled(int(row[0]), int(row[1]), int(row[2]), int(row[3]), row[4], row[5])


_APPLY = (
    sa.update(counters)
    .where(counters.c.id == sa.bindparam("cid"))
    .values(
        used_tokens=counters.c.used_tokens + sa.bindparam("ut", type_=sa.BigInteger),
        used_cost_units=counters.c.used_cost_units + sa.bindparam("uc", type_=sa.BigInteger),
        reserved_tokens=counters.c.reserved_tokens - sa.bindparam("rt", type_=sa.BigInteger),
        reserved_cost_units=counters.c.reserved_cost_units - sa.bindparam("rc", type_=sa.BigInteger),
        calls=counters.c.calls + sa.bindparam("calls", type_=sa.BigInteger),
    )
)
_APPLY_RETURNING = Prepared(_APPLY.returning(*_USED))
_AMOUNTS = sa.select(*_USED).where(counters.c.id == sa.bindparam("cid"))


def apply_to_counter(
    store: Transactions,
    conn: sa.Connection,
    counter_id: int,
    *,
    used_tokens: int = 0,
    used_cost_units: int = 0,
    release_tokens: int = 0,
    release_cost_units: int = 0,
    calls: int = 0,
) -> CounterState:
    """Add usage and return held quota on one counter row; return its new amounts."""
    params = {
        "cid": counter_id,
        "ut": used_tokens,
        "uc": used_cost_units,
        "rt": release_tokens,
        "rc": release_cost_units,
        "calls": calls,
    }
    if store.engine.dialect.update_returning:
        (row,) = _APPLY_RETURNING.execute(conn, params)
        return CounterState.of(row)
    conn.execute(_APPLY, params)
    return CounterState.of(conn.execute(_AMOUNTS, {"cid": counter_id}).one())


def counter_state(conn: sa.Connection, counter_id: int) -> CounterState:
    """A counter's amounts as they stand."""
    return CounterState.of(conn.execute(_AMOUNTS, {"cid": counter_id}).one())


def mark_approaching(conn: sa.Connection, *, counter_id: int) -> bool:
    """Flag the counter as warned; True only for the one caller that flipped it."""
    return (
        conn.execute(
            sa.update(counters)
            .where(counters.c.id == counter_id, counters.c.approaching_notified == sa.false())
            .values(approaching_notified=True)
        ).rowcount
        == 1
    )


def pending_expired(conn: sa.Connection, now: dt.datetime, limit: int) -> list[int]:
    """Ids of pending reservations past their expiry, oldest first."""
    return [
        int(r[0])
        for r in conn.execute(
            sa.select(reservations.c.id)
            .where(reservations.c.status == "pending", reservations.c.expires_at < now)
            .order_by(reservations.c.expires_at)
            .limit(limit)
        )
    ]
