"""One statement per phase on PostgreSQL: the round trips a metered call cannot avoid.

A metered call's latency is dominated by round trips, not by work: the portable
path spends about ten (BEGIN, statements, COMMIT, twice). PostgreSQL runs
data-modifying CTEs, and a single statement is atomic on its own, so here each
phase is one statement in autocommit:

* reserve (:func:`reserve_pinned`): the policy query as a CTE, then ``UPDATE
  counters … WHERE used + reserved + :n <= limit`` against the counter a policy
  read named, then the reservation row (the idempotency claim) — the conditional
  UPDATE is still the admission decision, and the row is written in the same
  statement or not at all; :func:`reserve_pinned_many` does it for a group;
* commit (:func:`commit`, :func:`commit_many` for a group): the guarded
  reservation UPDATE, the counter true-up and the ledger INSERT.

Anything unusual (a counter not created yet, a refusal to explain, credits,
charged overage, queued recording) takes the portable path in :mod:`meter`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import typing as t

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert

from ..models import Usage as UsageRow
from ..models import table
from ..prepared import Prepared
from . import budgets
from . import engine as quota
from .policy import HAS_BUDGETS
from .policy import POLICY_QUERY
from .policy import TERMS
from .policy import Policy
from .policy import policy_params

counters = quota.counters
reservations = quota.reservations
usage_table = table(UsageRow)

_RESERVATION_COLUMNS = quota.RESERVATION_COLUMNS
#: The reservation columns' bind parameters: short names keep the one-statement reserve under
#: psycopg's 4 KiB statement cache limit.
_R = {name: f"r{i}" for i, name in enumerate(_RESERVATION_COLUMNS)}


def _param(column: sa.Column[t.Any], name: str | None = None) -> sa.BindParameter[t.Any]:
    return sa.bindparam(name or column.name, type_=column.type)


@dataclasses.dataclass(frozen=True)
class HoldRequest:
    """One call's hold: what its reservation row records."""

    tokens: int
    cost_units: int
    idempotency_key: str | None
    scope: str
    expires_at: dt.datetime
    created_at: dt.datetime
    #: Wait for the WAL flush when the hold commits (``AI_METERING_DURABLE_HOLDS``); see :data:`ASYNC_COMMIT`.
    durable: bool = False


#: A column of every one-statement hold: ``set_config`` with ``is_local`` sets the statement's own
#: implicit transaction to ``synchronous_commit = :sc`` (``off`` unless holds are durable). Its
#: commit then returns without waiting for the WAL flush (about 0.1 ms of a hold's 0.2 ms here).
#: A crash of PostgreSQL can lose holds made in the last moments before it (at most three
#: ``wal_writer_delay``, 600 ms by default): their quota is freed early, and the call's commit,
#: which stays synchronous and records the usage whether or not its hold survived, flushes every
#: hold written before it. README, "Performance". The budgeted hold (:func:`reserve_budgeted`)
#: stays synchronous: it may create a budget's counter, which the commit must find.
ASYNC_COMMIT = sa.func.set_config(
    sa.literal_column("'synchronous_commit'"), sa.bindparam("sc", type_=sa.String), sa.true()
).label("sc")


def _synchronous(durable: bool) -> str:
    return "on" if durable else "off"


_HOLD_COLUMNS = ("tokens", "cost_units", "idempotency_key", "idempotency_scope", "expires_at", "created_at")


def _pinned_conditions(pol: sa.CTE, c: sa.Alias, mode_from_plan: bool, feature: bool) -> list[sa.ColumnElement[bool]]:
    """What the remembered policy assumed, re-checked against the statement's own policy read.

    The rows that select the counter and its limits unchanged (the plan, which a plan
    change, a deleted subscription or a missing default plan changes; the counter segment,
    plan period and rolling anchor), the subscription active, the billing mode ``plan``
    and the feature allowed. NULL fails: the portable path then explains a refusal.
    """
    now = sa.bindparam("now", type_=pol.c.started_at.type)
    conditions: list[sa.ColumnElement[bool]] = [
        quota.key_clause(c),
        pol.c.plan_id.is_not_distinct_from(sa.bindparam("p_plan")),
        sa.func.coalesce(pol.c.counter_segment, 0) == c.c.plan_version,
        pol.c.period.is_not_distinct_from(sa.bindparam("p_period", type_=pol.c.period.type)),
        pol.c.started_at.is_not_distinct_from(sa.bindparam("p_anchor", type_=pol.c.started_at.type)),
        sa.or_(pol.c.ends_at.is_(None), pol.c.ends_at > now, pol.c.grace_period_ends_at > now),
        sa.or_(pol.c.started_at.is_(None), pol.c.started_at <= now),
    ]
    if mode_from_plan:
        conditions.append(sa.func.coalesce(pol.c.billing_mode, "plan") == "plan")
    if feature:
        features = sa.cast(pol.c.features, JSONB)
        conditions.append(
            sa.or_(
                pol.c.features.is_(None),
                features == sa.cast(sa.literal("[]"), JSONB),
                features.has_key(sa.bindparam("p_feature", type_=sa.String)),
            )
        )
    return conditions


def _pinned_params(recent: Policy, now: dt.datetime, feature: str | None) -> dict[str, t.Any]:
    return {
        **policy_params(recent.billable, now, recent.default_plan),
        **quota.key_params(recent),
        "p_plan": recent.plan_id,
        "p_period": recent.plan_period,
        "p_anchor": recent.anchor,
        "p_feature": feature,
    }


def _policy_and_counter() -> tuple[sa.CTE, sa.Alias]:
    # A short alias keeps the text under psycopg's 4 KiB limit for caching a parsed statement.
    return POLICY_QUERY.cte("pol"), t.cast(sa.Alias, sa.alias(counters, "c"))


@functools.cache
def _pinned_statement(enforce: bool, zero_tokens: bool, mode_from_plan: bool, feature: bool) -> Prepared:
    """The policy read and the reservation together, against the counter a recent read selected.

    The policy CTE is :data:`~flask_ai_metering.quota.policy.POLICY_QUERY` itself, so the
    limits are this statement's own reading. The remembered policy only names the
    counter (:func:`_pinned_conditions`). Anything else matches no row and writes nothing.
    """
    pol, c = _policy_and_counter()
    conditions = _pinned_conditions(pol, c, mode_from_plan, feature)
    if enforce:
        token_limit, cost_limit = pol.c.token_limit, pol.c.cost_limit
        conditions.append(sa.or_(token_limit.is_(None), sa.and_(*quota.admits(token_limit, None, zero_tokens, c))))
        conditions.append(sa.or_(cost_limit.is_(None), sa.and_(*quota.admits(None, cost_limit, False, c))))
    conditions.append(~HAS_BUDGETS)  # a billable with budgets takes _budgeted_statement
    claim = sa.update(c).where(*conditions).values(quota.hold_values(c)).returning(c.c.id).cte("claimed")
    # Labelled with the parameters' short names (else ``AS anon_10``…): the text must stay under 4 KiB.
    values = (_param(reservations.c[name], _R[name]).label(_R[name]) for name in _RESERVATION_COLUMNS)
    select = sa.select(claim.c.id, *values)
    held = (
        sa.insert(reservations)
        .from_select(["counter_id", *_RESERVATION_COLUMNS], select)
        .returning(reservations.c.id.label("reservation_id"), reservations.c.counter_id)
        .cte("held")
    )
    terms = (pol.c[name] for name in TERMS)
    return Prepared(
        sa.select(held.c.reservation_id, held.c.counter_id, *terms, ASYNC_COMMIT).select_from(held.join(pol, sa.true()))
    )


def reserve_pinned(
    conn: sa.Connection,
    recent: Policy,
    request: HoldRequest,
    *,
    enforce: bool,
    mode_from_plan: bool,
    feature: str | None,
) -> t.Any:
    """Read the policy, hold quota and write the reservation, in one statement.

    ``recent`` is the billable's last policy read, which names the counter to try.
    Returns the row (``reservation_id``, ``counter_id`` and the policy's :data:`TERMS`), or
    None when nothing was written: the caller then reads the policy and tries again.
    """
    params = _hold_params(recent, request, feature)
    statement = _pinned_statement(enforce, request.tokens == 0, mode_from_plan, feature is not None)
    rows = statement.execute(conn, params)
    return rows[0] if rows else None


@functools.cache
def _pinned_many_statement(enforce: bool, mode_from_plan: bool, feature: bool) -> t.Any:
    """:func:`_pinned_statement` for several calls of one billable: all held together, or none.

    The counter must have room for all of them as if admitted one by one: the
    zero-token calls first (they need a token left) and the costliest last (each
    call needs some cost left). A group that does not fit writes nothing, and each
    call then tries on its own.
    """
    pol, c = _policy_and_counter()
    conditions = _pinned_conditions(pol, c, mode_from_plan, feature)
    if enforce:
        held_tokens = c.c.used_tokens + c.c.reserved_tokens
        held_cost = c.c.used_cost_units + c.c.reserved_cost_units
        tokens = sa.bindparam("n", type_=sa.BigInteger)
        cost = sa.bindparam("c", type_=sa.BigInteger)
        token_limit, cost_limit = pol.c.token_limit, pol.c.cost_limit
        any_zero = sa.bindparam("any_zero", type_=sa.Boolean)
        most = sa.bindparam("c_max", type_=sa.BigInteger)
        conditions.append(
            sa.or_(
                token_limit.is_(None),
                sa.and_(held_tokens + tokens <= token_limit, sa.or_(~any_zero, held_tokens < token_limit)),
            )
        )
        conditions.append(
            sa.or_(cost_limit.is_(None), sa.and_(held_cost + cost <= cost_limit, held_cost + cost - most < cost_limit))
        )
    conditions.append(~HAS_BUDGETS)  # a billable with budgets takes _budgeted_statement
    claim = sa.update(c).where(*conditions).values(quota.hold_values(c)).returning(c.c.id).cte("claimed")
    arrays = {name: reservations.c[name].type for name in _HOLD_COLUMNS}
    requested = (
        sa.func.unnest(*(sa.bindparam("a_" + name, type_=ARRAY(type_)) for name, type_ in arrays.items()))
        .table_valued(*arrays)
        .render_derived(name="r")
    )
    rows = sa.select(
        claim.c.id,
        _param(reservations.c.billable_type, _R["billable_type"]),
        _param(reservations.c.billable_id, _R["billable_id"]),
        sa.literal("pending"),
        sa.literal(0),
        *(requested.c[name] for name in _HOLD_COLUMNS),
    ).select_from(claim.join(requested, sa.true()))
    columns = ["counter_id", "billable_type", "billable_id", "status", "credit_units", *_HOLD_COLUMNS]
    held = (
        sa.insert(reservations)
        .from_select(columns, rows)
        .returning(
            reservations.c.id.label("reservation_id"),
            *(reservations.c[name] for name in ("counter_id", *_HOLD_COLUMNS)),
        )
        .cte("held")
    )
    terms = (pol.c[name] for name in TERMS)
    return sa.select(*held.c, *terms, ASYNC_COMMIT).select_from(held.join(pol, sa.true()))


def reserve_pinned_many(
    conn: sa.Connection,
    recent: Policy,
    requests: t.Sequence[HoldRequest],
    *,
    enforce: bool,
    mode_from_plan: bool,
    feature: str | None,
    now: dt.datetime,
) -> list[t.Any] | None:
    """:func:`reserve_pinned` for several calls, in one statement.

    Returns one row per request, in order, or None when nothing was written.
    """
    params: dict[str, t.Any] = {
        **_pinned_params(recent, now, feature),
        _R["billable_type"]: recent.billable[0],
        _R["billable_id"]: recent.billable[1],
        "n": sum(r.tokens for r in requests),
        "c": sum(r.cost_units for r in requests),
        "any_zero": any(r.tokens == 0 for r in requests),
        "c_max": max(r.cost_units for r in requests),
        "a_tokens": [r.tokens for r in requests],
        "a_cost_units": [r.cost_units for r in requests],
        "a_idempotency_key": [r.idempotency_key for r in requests],
        "a_idempotency_scope": [r.scope for r in requests],
        "a_expires_at": [r.expires_at for r in requests],
        "a_created_at": [r.created_at for r in requests],
        "sc": _synchronous(any(r.durable for r in requests)),
    }
    rows = conn.execute(_pinned_many_statement(enforce, mode_from_plan, feature is not None), params).all()
    if not rows:
        return None
    # The held rows differ only in what the requests gave them: match them back on it.
    by_request: dict[tuple[t.Any, ...], list[t.Any]] = {}
    for row in rows:
        by_request.setdefault(tuple(getattr(row, name) for name in _HOLD_COLUMNS), []).append(row)
    return [
        by_request[(r.tokens, r.cost_units, r.idempotency_key, r.scope, r.expires_at, r.created_at)].pop()
        for r in requests
    ]


def _hold_params(recent: Policy, request: HoldRequest, feature: str | None) -> dict[str, t.Any]:
    """One call's one-statement hold: the remembered policy's checks, its reservation row, its size."""
    return {
        **_pinned_params(recent, request.created_at, feature),
        **_reservation_params(recent.billable, request),
        "n": request.tokens,
        "c": request.cost_units,
    }


def _reservation_params(billable: tuple[str, str], request: HoldRequest) -> dict[str, t.Any]:
    values = {
        "billable_type": billable[0],
        "billable_id": billable[1],
        "idempotency_key": request.idempotency_key,
        "idempotency_scope": request.scope,
        "status": "pending",
        "tokens": request.tokens,
        "cost_units": request.cost_units,
        "credit_units": 0,
        "expires_at": request.expires_at,
        "created_at": request.created_at,
    }
    return {**{_R[name]: value for name, value in values.items()}, "sc": _synchronous(request.durable)}


@dataclasses.dataclass(frozen=True)
class TrueUp:
    """What one commit settles: the reservation, its counter, the usage and the hold it returns."""

    reservation_id: int
    counter_id: int
    at: dt.datetime
    used_tokens: int
    used_cost_units: int
    hold_tokens: int
    hold_cost_units: int

    def params(self) -> dict[str, t.Any]:
        return {
            "rid": self.reservation_id,
            "status": "committed",
            "at": self.at,
            "cid": self.counter_id,
            "ut": self.used_tokens,
            "uc": self.used_cost_units,
            "rt": self.hold_tokens,
            "rc": self.hold_cost_units,
        }


def _true_up(won: sa.Exists, *conditions: sa.ColumnElement[bool]) -> t.Any:
    """The counter UPDATE of a commit: add the usage, return the hold if we settled it."""
    return (
        sa.update(counters)
        .where(counters.c.id == sa.bindparam("cid"), *conditions)
        .values(
            used_tokens=counters.c.used_tokens + sa.bindparam("ut", type_=sa.BigInteger),
            used_cost_units=counters.c.used_cost_units + sa.bindparam("uc", type_=sa.BigInteger),
            reserved_tokens=counters.c.reserved_tokens
            - sa.case((won, sa.bindparam("rt", type_=sa.BigInteger)), else_=0),
            reserved_cost_units=counters.c.reserved_cost_units
            - sa.case((won, sa.bindparam("rc", type_=sa.BigInteger)), else_=0),
            calls=counters.c.calls + 1,
        )
        .returning(*quota.USED_COLUMNS)
        .cte("counted")
    )


def _commit_parts() -> tuple[sa.Exists, sa.CTE, sa.CTE]:
    """The commit's settle (whether it won), counter true-up and ledger row, as CTEs."""
    settled = quota.settle_statement(keep_key=True).returning(reservations.c.id).cte("settled")
    won = sa.exists(sa.select(settled.c.id))
    counter = _true_up(won)
    values: dict[str, t.Any] = {c.name: _param(c, "u_" + c.name) for c in usage_table.c if c.name != "id"}
    values.update(_released_key(won, values["idempotency_key"], values["meta"]))
    ledger = sa.insert(usage_table).values(values).returning(usage_table.c.id).cte("recorded")
    return won, counter, ledger


def _released_key(
    won: sa.ColumnElement[bool], key: sa.ColumnElement[t.Any], meta: sa.ColumnElement[t.Any]
) -> dict[str, sa.ColumnElement[t.Any]]:
    """The ledger row's key and meta: a commit that lost its hold lost its key too.

    The sweeper expired the hold first (or a database crash undid it): a retry may hold the
    key now, so the row is recorded without it, the key kept in ``meta`` for the audit, as
    :func:`~flask_ai_metering.metering.ledger.released_key` does on the portable path.
    """
    kept = sa.or_(won, key.is_(None))
    empty = sa.cast(sa.literal_column("'{}'"), JSONB)
    note = sa.func.jsonb_build_object(sa.literal_column("'released_idempotency_key'"), key)
    noted = sa.cast(sa.func.coalesce(sa.cast(meta, JSONB), empty).op("||")(note), usage_table.c.meta.type)
    return {
        "idempotency_key": sa.case((won, key), else_=sa.null()),
        "meta": sa.case((kept, meta), else_=noted),
    }


@functools.lru_cache(maxsize=1)
def _commit_statement() -> Prepared:
    _, counter, ledger = _commit_parts()
    # Both CTEs return exactly one row: joining them on TRUE reads both in one result.
    return Prepared(sa.select(*counter.c, ledger.c.id).select_from(counter.join(ledger, sa.true())))


def commit(conn: sa.Connection, true_up: TrueUp, values: dict[str, t.Any]) -> tuple[int, quota.CounterState]:
    """Settle the reservation, true up the counter and write the ledger row, in one statement.

    A reservation the sweeper already expired returns nothing to the counter
    (the sweeper did), but the usage is still added and recorded.
    """
    params = {**true_up.params(), **{"u_" + name: value for name, value in values.items()}}
    (row,) = _commit_statement().execute(conn, params)
    return int(row.id), quota.CounterState.of(row[:5])


_LEDGER_COLUMNS = [c for c in usage_table.c if c.name != "id"]


@functools.lru_cache(maxsize=1)
def _commit_many_statement() -> t.Any:
    """:func:`_commit_statement` for several calls on one counter: one array per column.

    One shape whatever the number of calls (``unnest`` of the arrays), so it is
    parsed and planned once. The usage rows carry the true-up's amounts (their
    totals, reservation and time); only the holds to return come beside them.
    """
    arrays: dict[str, t.Any] = {c.name: c.type for c in _LEDGER_COLUMNS}
    arrays.update(hold_tokens=sa.BigInteger, hold_cost_units=sa.BigInteger)
    # Bound as "a_<column>": a parameter named like a column would also be SET by the UPDATEs.
    unnest = sa.func.unnest(*(sa.bindparam("a_" + name, type_=ARRAY(type_)) for name, type_ in arrays.items()))
    rows = sa.select(unnest.table_valued(*arrays).render_derived(name="i")).cte("rows")
    settled = (
        sa.update(reservations)
        .where(reservations.c.id == rows.c.reservation_id, reservations.c.status == "pending")
        .values(status="committed", settled_at=rows.c.occurred_at)
        .returning(reservations.c.id)
        .cte("settled")
    )
    won = rows.c.reservation_id.in_(sa.select(settled.c.id))

    def total(column: sa.ColumnElement[t.Any], *where: sa.ColumnElement[bool]) -> t.Any:
        return sa.select(sa.func.coalesce(sa.func.sum(column), 0)).where(*where).scalar_subquery()

    counted = (
        sa.update(counters)
        .where(counters.c.id == sa.bindparam("cid"))
        .values(
            used_tokens=counters.c.used_tokens + total(rows.c.total_tokens),
            used_cost_units=counters.c.used_cost_units + total(rows.c.total_cost),
            reserved_tokens=counters.c.reserved_tokens - total(rows.c.hold_tokens, won),
            reserved_cost_units=counters.c.reserved_cost_units - total(rows.c.hold_cost_units, won),
            calls=counters.c.calls + sa.select(sa.func.count()).select_from(rows).scalar_subquery(),
        )
        .returning(*quota.USED_COLUMNS)
        .cte("counted")
    )
    released = _released_key(won, rows.c.idempotency_key, rows.c.meta)
    values: list[sa.ColumnElement[t.Any]] = [released.get(c.name, rows.c[c.name]) for c in _LEDGER_COLUMNS]
    ledger = (
        sa.insert(usage_table)
        .from_select([c.name for c in _LEDGER_COLUMNS], sa.select(*values))
        .returning(usage_table.c.id, usage_table.c.reservation_id)
        .cte("recorded")
    )
    return sa.select(*counted.c, ledger.c.id, ledger.c.reservation_id).select_from(counted.join(ledger, sa.true()))


def commit_many(
    conn: sa.Connection, items: t.Sequence[tuple[TrueUp, dict[str, t.Any]]]
) -> tuple[dict[int, int], quota.CounterState]:
    """:func:`commit` for several calls on one counter: one statement and one durable commit.

    Returns the usage id of each reservation and the counter after all of them.
    """
    (counter_id,) = {true_up.counter_id for true_up, _ in items}
    params: dict[str, t.Any] = {
        "cid": counter_id,
        "a_hold_tokens": [true_up.hold_tokens for true_up, _ in items],
        "a_hold_cost_units": [true_up.hold_cost_units for true_up, _ in items],
    }
    for column in _LEDGER_COLUMNS:
        params["a_" + column.name] = [values[column.name] for _, values in items]
    rows = conn.execute(_commit_many_statement(), params).all()
    return {int(row.reservation_id): int(row.id) for row in rows}, quota.CounterState.of(rows[0][:5])


@functools.lru_cache(maxsize=1)
def _queued_statement() -> t.Any:
    settled = (
        quota.settle_statement(keep_key=True)
        .values(payload=_param(reservations.c.payload))
        .returning(reservations.c.id)
        .cte("settled")
    )
    won = sa.exists(sa.select(settled.c.id))
    # Only when the guarded settle won: otherwise nothing changes and the caller
    # takes the transactional path, which records a commit that lost to the sweeper.
    return sa.select(*_true_up(won, won).c)


def commit_queued(conn: sa.Connection, true_up: TrueUp, payload: dict[str, t.Any]) -> quota.CounterState | None:
    """Queued recording: settle, true up and leave the ledger row in the outbox, in one statement.

    None when the sweeper had already expired the reservation (nothing was changed).
    """
    params = {**true_up.params(), "payload": payload}
    row = conn.execute(_queued_statement(), params).first()
    return None if row is None else quota.CounterState.of(row)


# -- budgets: the plan's counter and every matching budget's, in one statement -----------------


def _period_bound(b: sa.FromClause, which: int) -> sa.ColumnElement[t.Any]:
    """The start (0) or end (1) of the budget's period: its item of the bound array of all six.

    Arrays and a constant list keep the statement short (psycopg converts it on every call).
    """
    names: sa.ColumnElement[t.Any] = sa.literal_column(
        "ARRAY[" + ",".join(f"'{name}'" for name in budgets.PERIODS) + "]"
    )
    kind = ARRAY(budgets.budget_counters.c.period_start.type)
    bounds: sa.ColumnElement[t.Any] = sa.Grouping(sa.bindparam(f"p_bounds_{which}", type_=kind))
    return bounds[sa.func.array_position(names, b.c.period)]


def _fresh_admits(bud: sa.CTE, zero_tokens: bool) -> sa.ColumnElement[bool]:
    """A new counter of ``bud``'s budget could take this hold (:func:`budgets.admits` on zeros)."""
    n = sa.bindparam("n", type_=sa.BigInteger)
    cost = sa.bindparam("c", type_=sa.BigInteger)
    token_ok = [n <= bud.c.token_limit] + ([bud.c.token_limit > 0] if zero_tokens else [])
    return sa.or_(
        bud.c.enforced == sa.false(),
        sa.and_(
            sa.or_(bud.c.token_limit.is_(None), sa.and_(*token_ok)),
            sa.or_(
                bud.c.cost_limit_units.is_(None), sa.and_(cost <= bud.c.cost_limit_units, bud.c.cost_limit_units > 0)
            ),
            sa.or_(bud.c.request_limit.is_(None), bud.c.request_limit >= 1),
        ),
    )


@functools.cache
def _budgeted_statement(enforce: bool, zero_tokens: bool, mode_from_plan: bool, feature: bool) -> Prepared:
    """:func:`_pinned_statement` that also holds on every budget matching the call, all or none.

    Each matching budget's counter of its period is created or updated by one
    ``INSERT … ON CONFLICT DO UPDATE … WHERE <it admits the hold>``, once the plan's counter
    took the hold (the upsert reads the plan's ``UPDATE``, so the plan's row is locked first,
    then the budgets' in id order, as on the portable path). A statement cannot undo part of
    itself, so when the plan's counter took the hold and a budget refused it the last column
    divides by zero: PostgreSQL aborts the whole statement and nothing is written. The caller
    then takes the portable path, which names the budget that refused.
    """
    pol, c = _policy_and_counter()
    conditions = _pinned_conditions(pol, c, mode_from_plan, feature)
    if enforce:
        token_limit, cost_limit = pol.c.token_limit, pol.c.cost_limit
        conditions.append(sa.or_(token_limit.is_(None), sa.and_(*quota.admits(token_limit, None, zero_tokens, c))))
        conditions.append(sa.or_(cost_limit.is_(None), sa.and_(*quota.admits(None, cost_limit, False, c))))
    claim = sa.update(c).where(*conditions).values(quota.hold_values(c)).returning(c.c.id).cte("claimed")
    b = budgets.budgets.alias("b")
    bud = (
        sa.select(
            b.c.id.label("budget_id"),
            _period_bound(b, 0).label("period_start"),
            _period_bound(b, 1).label("period_end"),
            b.c.token_limit,
            sa.type_coerce(b.c.cost_limit, sa.BigInteger).label("cost_limit_units"),
            b.c.request_limit,
            (b.c.mode == "hard").label("enforced"),
        )
        .where(budgets.matching_clause(b))
        .cte("bud")
    )
    bc = budgets.budget_counters
    fresh = (
        sa.select(
            *(bud.c[name] for name in _BUDGET_COUNTER_TERMS),
            sa.bindparam("n", type_=sa.BigInteger),
            sa.bindparam("c", type_=sa.BigInteger),
            sa.literal(1, sa.BigInteger),
            sa.bindparam("now", type_=bc.c.created_at.type),
            *(sa.literal_column("0") for _ in _ZEROED),
        )
        # Only once the plan's counter took the hold: that orders the locks (the plan's row first,
        # as everywhere), and a refusal by the plan writes nothing at all.
        .where(_fresh_admits(bud, zero_tokens), sa.exists(sa.select(claim.c.id)))
        .order_by(bud.c.budget_id)
    )
    upsert = pg_insert(bc).from_select(
        [*_BUDGET_COUNTER_TERMS, "reserved_tokens", "reserved_cost_units", "reserved_requests", "created_at", *_ZEROED],
        fresh,
    )
    bheld = (
        upsert.on_conflict_do_update(
            index_elements=[bc.c.budget_id, bc.c.period_start],
            set_=budgets.hold_values(bc),
            where=budgets.admits(bc, zero_tokens=zero_tokens),
        )
        .returning(bc.c.id, bc.c.budget_id)
        .cte("bheld")
    )
    held_ids = sa.select(sa.func.json_agg(bheld.c.id)).scalar_subquery()
    select = sa.select(claim.c.id, *(_param(reservations.c[name], _R[name]) for name in _RESERVATION_COLUMNS), held_ids)
    held = (
        sa.insert(reservations)
        .from_select(["counter_id", *_RESERVATION_COLUMNS, "budget_counter_ids"], select)
        .returning(reservations.c.id.label("reservation_id"), reservations.c.counter_id)
        .cte("held")
    )

    def count(cte: sa.CTE) -> sa.ScalarSelect[int]:
        return sa.select(sa.func.count()).select_from(cte).scalar_subquery()

    whole = sa.or_(
        sa.and_(count(claim) == 1, count(bheld) == count(bud)), sa.and_(count(claim) == 0, count(bheld) == 0)
    )
    guard = sa.literal(1) / sa.case((whole, 1), else_=0)
    pairs = sa.select(sa.func.json_agg(sa.func.json_build_array(bheld.c.id, bheld.c.budget_id))).scalar_subquery()
    terms = (pol.c[name] for name in TERMS)
    return Prepared(
        sa.select(
            held.c.reservation_id,
            held.c.counter_id,
            pairs.label("budget_counters"),
            *terms,
            guard.label("whole"),
        ).select_from(pol.outerjoin(held, sa.true()))
    )


#: A new budget counter's columns that start at zero (given, so no Python default is bound as NULL).
_ZEROED = ("used_tokens", "used_cost_units", "used_requests", "alert_level")
_BUDGET_COUNTER_TERMS = (
    "budget_id",
    "period_start",
    "period_end",
    "token_limit",
    "cost_limit_units",
    "request_limit",
    "enforced",
)


def reserve_budgeted(
    conn: sa.Connection,
    recent: Policy,
    request: HoldRequest,
    *,
    enforce: bool,
    mode_from_plan: bool,
    feature: str | None,
    user_id: str | None,
    model: str | None,
    timezone: str,
) -> t.Any:
    """:func:`reserve_pinned` for a billable with budgets: the plan's and the budgets' holds at once.

    Returns the row (``reservation_id``, ``counter_id``, ``budget_counters`` as ``[[counter id,
    budget id], …]`` and the :data:`TERMS`), or None when nothing was written.
    """
    bounds = budgets.period_bounds(request.created_at, timezone)
    params = {
        **_hold_params(recent, request, feature),
        **budgets.matching_params(recent.billable, user_id, feature, model),
        **{f"p_bounds_{i}": [bounds[name][i] for name in budgets.PERIODS] for i in (0, 1)},
    }
    statement = _budgeted_statement(enforce, request.tokens == 0, mode_from_plan, feature is not None)
    try:  # in autocommit: a statement that fails leaves nothing behind
        rows = statement.execute(conn, params)
    except sa_exc.DBAPIError as error:
        if getattr(error.orig, "sqlstate", None) not in _NOTHING_WRITTEN:
            raise
        return None  # a budget refused (or a deadlock was broken): nothing was written
    return None if not rows or rows[0].reservation_id is None else rows[0]


#: A budget refused the hold the plan's counter took (the guard's division by zero), or
#: PostgreSQL broke a deadlock: the statement wrote nothing, and the portable path decides.
_NOTHING_WRITTEN = {"22012", "40P01"}


@functools.lru_cache(maxsize=1)
def _commit_budgeted_statement() -> Prepared:
    """:func:`_commit_statement` that also trues up the budget counters the hold was on.

    Their rows come back as one JSON array (``json_agg``), beside the plan counter's amounts.
    """
    won, counter, ledger = _commit_parts()
    bc = t.cast(sa.Alias, sa.alias(budgets.budget_counters, "bc"))  # short: under psycopg's 4 KiB cache limit
    counted = (
        sa.update(bc)
        # After the plan's counter (it reads ``counter``): the locks are taken in the holds' order.
        .where(
            bc.c.id == sa.func.any(sa.bindparam("bids", type_=ARRAY(sa.BigInteger))),
            sa.exists(sa.select(counter.c.used_tokens)),
        )
        .values(
            used_tokens=bc.c.used_tokens + sa.bindparam("ut", type_=sa.BigInteger),
            used_cost_units=bc.c.used_cost_units + sa.bindparam("uc", type_=sa.BigInteger),
            used_requests=bc.c.used_requests + 1,
            reserved_tokens=bc.c.reserved_tokens - sa.case((won, sa.bindparam("rt", type_=sa.BigInteger)), else_=0),
            reserved_cost_units=bc.c.reserved_cost_units
            - sa.case((won, sa.bindparam("rc", type_=sa.BigInteger)), else_=0),
            reserved_requests=bc.c.reserved_requests - sa.case((won, 1), else_=0),
        )
        .returning(*(bc.c[name] for name in budgets.COUNTER_COLUMNS))
        .cte("bu")
    )
    states = sa.select(sa.func.json_agg(sa.literal_column("bu"))).select_from(counted).scalar_subquery()
    return Prepared(
        sa.select(*counter.c, ledger.c.id, states.label("budget_counters")).select_from(counter.join(ledger, sa.true()))
    )


def commit_budgeted(
    conn: sa.Connection,
    true_up: TrueUp,
    values: dict[str, t.Any],
    held: t.Sequence[tuple[int, budgets.Terms]],
) -> tuple[int, quota.CounterState, list[budgets.Standing]]:
    """:func:`commit` for a hold on budgets too: one statement; the budget counters after it."""
    params = {
        **true_up.params(),
        **{"u_" + name: value for name, value in values.items()},
        "bids": [counter_id for counter_id, _ in held],
    }
    (row,) = _commit_budgeted_statement().execute(conn, params)
    terms = dict(held)
    states = [[state[name] for name in budgets.COUNTER_COLUMNS] for state in row.budget_counters or []]
    standings = [budgets.standing_of(state, terms[int(state[0])]) for state in states]
    return int(row.id), quota.CounterState.of(row[:5]), standings
