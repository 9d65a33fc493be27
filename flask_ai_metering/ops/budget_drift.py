"""``reconcile`` for budgets: each budget counter against the ledger rows that counted on it.

A plan's counter is named by the usage rows it counted (``Usage.counter_id``); a
budget counter is not, so what counted on it is found the way the engine counted:

* a metered call held on the budget counters its reservation lists
  (``Reservation.budget_counter_ids``) and committed onto exactly those, so its usage
  row is matched through ``Usage.reservation_id``. That is exact where a time window
  would not be: a call held in one minute may commit in the next, and a call reserved
  before its budget was added is on no budget even if it ends after;
* usage recorded with ``meter.record`` (no reservation) counted on every live budget
  whose scope it matched when it was written, in the period of its ``occurred_at``: it
  is matched by scope, by that period, and by being written (``Usage.created_at``)
  while the budget was live.

A refund or a repricing (an adjustment row naming its call in ``adjusts_id``) counts
on the budget counters its call counted on whose period had not ended when it was
made, as the engine applies it. Reserved amounts are
checked against the pending reservations that hold on the counter, like a plan's.
Each query groups in the database; the reservation lists are few distinct values,
spread over their counters here.
"""

from __future__ import annotations

import collections
import datetime as dt
import json
import typing as t

import sqlalchemy as sa

from ..models import Reservation
from ..models import Usage
from ..models import budget_scope
from ..models import table
from ..quota.budgets import budget_counters
from ..quota.budgets import budgets
from ..quota.budgets import counters_of_call

usage = table(Usage)
reservations = table(Reservation)

#: The amounts of a budget counter that ``reconcile`` checks (and ``--fix`` sets).
COLUMNS = (
    "used_tokens",
    "used_cost_units",
    "used_requests",
    "reserved_tokens",
    "reserved_cost_units",
    "reserved_requests",
)
_cost = sa.type_coerce(usage.c.total_cost, sa.BigInteger)
_calls = usage.c.kind == "usage"

Drift = list[tuple[t.Any, dict[str, tuple[int, int]]]]


def _spread(
    conn: sa.Connection,
    query: sa.Select[t.Any, t.Any, t.Any, t.Any],
    names: tuple[str, str, str],
    into: dict[int, collections.Counter[str]],
) -> None:
    """Add each group's sums to every counter id its reservation list names."""
    for ids_text, *sums in conn.execute(query):
        ids = ids_text if isinstance(ids_text, list) else json.loads(ids_text) if ids_text else None
        for counter_id in ids or ():
            for name, value in zip(names, sums, strict=True):
                into[int(counter_id)][name] += int(value or 0)


def ledger_amounts(conn: sa.Connection, since: dt.datetime | None) -> dict[int, collections.Counter[str]]:
    """What the ledger says each budget counter (of periods starting at or after ``since``) holds."""
    out: dict[int, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    ids = sa.cast(reservations.c.budget_counter_ids, sa.Text)
    listed = reservations.c.budget_counter_ids.is_not(None)
    # A call commits no earlier than it was held, so its row is no older than its counter's period.
    recent = [] if since is None else [usage.c.occurred_at >= sa.literal(since, usage.c.occurred_at.type)]
    held_calls = (
        sa.select(ids, sa.func.sum(usage.c.total_tokens), sa.func.sum(_cost), sa.func.count())
        .select_from(usage.join(reservations, reservations.c.id == usage.c.reservation_id))
        .where(_calls, listed, *recent)
        .group_by(ids)
    )
    _spread(conn, held_calls, ("used_tokens", "used_cost_units", "used_requests"), out)
    pending = (
        sa.select(ids, sa.func.sum(reservations.c.tokens), sa.func.sum(reservations.c.cost_units), sa.func.count())
        .where(listed, reservations.c.status == "pending")
        .group_by(ids)
    )
    _spread(conn, pending, ("reserved_tokens", "reserved_cost_units", "reserved_requests"), out)
    bc, b = budget_counters.c, budgets.c

    def either(column: str) -> sa.ColumnElement[bool]:
        return sa.or_(b[column].is_(None), b[column] == usage.c[column])

    recorded = (
        sa.select(bc.id, sa.func.sum(usage.c.total_tokens), sa.func.sum(_cost), sa.func.count())
        .select_from(budget_counters)
        .join(budgets, b.id == bc.budget_id)
        .join(
            usage,
            sa.and_(
                usage.c.billable_type == b.billable_type,
                usage.c.billable_id == b.billable_id,
                usage.c.occurred_at >= bc.period_start,
                usage.c.occurred_at < bc.period_end,
            ),
        )
        .where(
            _calls,
            usage.c.reservation_id.is_(None),
            either("user_id"),
            either("feature"),
            either("model"),
            usage.c.created_at >= b.created_at,
            sa.or_(b.removed_at.is_(None), usage.c.created_at < b.removed_at),
            *([] if since is None else [bc.period_start >= sa.literal(since, bc.period_start.type)]),
        )
        .group_by(bc.id)
    )
    for counter_id, tokens, cost, calls in conn.execute(recorded):
        amounts = out[int(counter_id)]
        amounts["used_tokens"] += int(tokens or 0)
        amounts["used_cost_units"] += int(cost or 0)
        amounts["used_requests"] += int(calls or 0)
    _add_adjustments(conn, since, out)
    return out


def _add_adjustments(conn: sa.Connection, since: dt.datetime | None, out: dict[int, collections.Counter[str]]) -> None:
    """Refunds and repricings, on the counters their calls counted on that still ran when they were made.

    Adjustments are few (one per refund or repriced call), so each is matched on its own,
    by the engine's own rule (:func:`~flask_ai_metering.quota.budgets.counters_of_call`).
    """
    call = usage.alias("call")
    query = (
        sa.select(
            usage.c.total_tokens.label("adj_tokens"), _cost.label("adj_cost"), usage.c.occurred_at.label("adj_at"), call
        )
        .join_from(usage, call, call.c.id == usage.c.adjusts_id)
        .where(
            ~_calls, *([] if since is None else [usage.c.occurred_at >= sa.literal(since, usage.c.occurred_at.type)])
        )
    )
    ends = dict(conn.execute(sa.select(budget_counters.c.id, budget_counters.c.period_end)).all())
    for row in conn.execute(query):
        for counter_id in counters_of_call(conn, row):
            if ends[counter_id] > row.adj_at:
                out[counter_id]["used_tokens"] += int(row.adj_tokens or 0)
                out[counter_id]["used_cost_units"] += int(row.adj_cost or 0)


def budget_counter_drift(conn: sa.Connection, since: dt.datetime | None) -> Drift:
    """Budget counters whose amounts differ from the ledger: ``(row, {column: (counter, ledger)})``."""
    ledger = ledger_amounts(conn, since)
    query = sa.select(
        budget_counters.c.id,
        budget_counters.c.budget_id,
        budget_counters.c.period_start,
        budgets.c.billable_type,
        budgets.c.billable_id,
        budgets.c.user_id,
        budgets.c.feature,
        budgets.c.model,
        budgets.c.period,
        *(budget_counters.c[name] for name in COLUMNS),
    ).join_from(budget_counters, budgets, budgets.c.id == budget_counters.c.budget_id)
    if since is not None:
        query = query.where(budget_counters.c.period_start >= sa.literal(since, budget_counters.c.period_start.type))
    drifted = []
    for row in conn.execute(query.order_by(budget_counters.c.id)):
        want = ledger.get(int(row.id), collections.Counter())
        diff = {c: (int(getattr(row, c)), want[c]) for c in COLUMNS if int(getattr(row, c)) != want[c]}
        if diff:
            drifted.append((row, diff))
    return drifted


def describe(row: t.Any, diff: dict[str, tuple[int, int]]) -> str:
    """One ``reconcile`` line for a drifting budget counter."""
    scope = budget_scope((row.billable_type, row.billable_id), row.user_id, row.feature, row.model)
    parts = ", ".join(f"{c} {have} != ledger {want}" for c, (have, want) in diff.items())
    when = f"{row.period_start:%Y-%m-%d %H:%M}"
    return f"budget counter {row.id} (budget {row.budget_id}, {scope}, per {row.period} from {when}): {parts}"


def fix(conn: sa.Connection, row: t.Any, diff: dict[str, tuple[int, int]]) -> None:
    """Set the drifting amounts from the ledger (an absolute SET: running it twice changes nothing more)."""
    conn.execute(
        sa.update(budget_counters)
        .where(budget_counters.c.id == row.id)
        .values({c: sa.literal(want, sa.BigInteger) for c, (_, want) in diff.items()})
    )
