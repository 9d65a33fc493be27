"""``reconcile``: prove the counters and wallets equal the ledgers they summarise.

Counters are checked for the periods whose usage is fully retained (``cleanup``
never prunes inside them): used tokens, cost and calls against the usage rows
that counted on them, and reserved amounts against the pending reservations.
Budget counters are checked the same way, against the calls that counted on them
(:mod:`.budget_drift`). Wallets are checked against the sum of their transactions
and the holds of pending calls. ``--fix`` sets each drifting value from its ledger (an absolute
SET, so running it twice changes nothing more).
"""

from __future__ import annotations

import datetime as dt
import typing as t

import sqlalchemy as sa

from ..billing.reconcile import check_overages
from ..metering.safekeeping import journal_lines
from ..metering.safekeeping import journal_path
from ..models import AggregationState
from ..models import Counter
from ..models import CreditTransaction
from ..models import CreditWallet
from ..models import Reservation
from ..models import Usage
from ..models import table
from . import budget_drift

if t.TYPE_CHECKING:
    from ..runtime import Runtime

counters = table(Counter)
state = table(AggregationState)
usage = table(Usage)
reservations = table(Reservation)
wallets = table(CreditWallet)
transactions = table(CreditTransaction)

_cost = sa.type_coerce(usage.c.total_cost, sa.BigInteger)


def _ledger_sums(counter_ids: sa.Select[t.Any]) -> dict[str, sa.ScalarSelect[t.Any]]:
    """Per-counter ledger totals as correlated scalar subqueries."""
    by_usage = usage.c.counter_id == counters.c.id
    pending = sa.and_(reservations.c.counter_id == counters.c.id, reservations.c.status == "pending")
    return {
        "used_tokens": sa.select(sa.func.coalesce(sa.func.sum(usage.c.total_tokens), 0))
        .where(by_usage)
        .scalar_subquery(),
        "used_cost_units": sa.select(sa.func.coalesce(sa.func.sum(_cost), 0)).where(by_usage).scalar_subquery(),
        # Adjustments (refunds) net out of the sums above, but are not calls.
        "calls": sa.select(sa.func.count())
        .select_from(usage)
        .where(by_usage, usage.c.kind == "usage")
        .scalar_subquery(),
        "reserved_tokens": sa.select(sa.func.coalesce(sa.func.sum(reservations.c.tokens), 0))
        .where(pending)
        .scalar_subquery(),
        "reserved_cost_units": sa.select(sa.func.coalesce(sa.func.sum(reservations.c.cost_units), 0))
        .where(pending)
        .scalar_subquery(),
    }


#: The marker ``cleanup`` writes: no usage older than its ``marked_at`` is kept.
PRUNED_BEFORE = "pruned_before"


def retained_since(conn: sa.Connection) -> dt.datetime | None:
    """Periods starting at or after this instant have all their usage; None: nothing was pruned."""
    return conn.execute(sa.select(state.c.marked_at).where(state.c.name == PRUNED_BEFORE)).scalar()


def counter_drift(conn: sa.Connection, since: dt.datetime | None) -> list[tuple[t.Any, dict[str, tuple[int, int]]]]:
    """Counters whose amounts differ from the ledger: ``(row, {column: (counter, ledger)})``."""
    sums = _ledger_sums(sa.select(counters.c.id))
    columns = list(sums)
    rows = conn.execute(
        sa.select(
            counters.c.id,
            counters.c.billable_type,
            counters.c.billable_id,
            counters.c.period_start,
            *(counters.c[c] for c in columns),
            *(sums[c].label("ledger_" + c) for c in columns),
        ).where(sa.true() if since is None else counters.c.period_start >= since)
    )
    drifted = []
    for row in rows:
        diff = {
            c: (int(getattr(row, c)), int(getattr(row, "ledger_" + c)))
            for c in columns
            if int(getattr(row, c)) != int(getattr(row, "ledger_" + c))
        }
        if diff:
            drifted.append((row, diff))
    return drifted


def wallet_drift(conn: sa.Connection) -> list[tuple[t.Any, dict[str, tuple[int, int]]]]:
    """Wallets whose balance or held amount differs from their ledgers."""
    balance = sa.type_coerce(wallets.c.balance, sa.BigInteger)
    held = sa.type_coerce(wallets.c.held, sa.BigInteger)
    ledger = (
        sa.select(sa.func.coalesce(sa.func.sum(sa.type_coerce(transactions.c.amount, sa.BigInteger)), 0))
        .where(transactions.c.wallet_id == wallets.c.id)
        .scalar_subquery()
    )
    holds = (
        sa.select(sa.func.coalesce(sa.func.sum(reservations.c.credit_units), 0))
        .where(reservations.c.wallet_id == wallets.c.id, reservations.c.status == "pending")
        .scalar_subquery()
    )
    out = []
    for row in conn.execute(
        sa.select(
            wallets.c.id,
            wallets.c.billable_type,
            wallets.c.billable_id,
            balance.label("balance"),
            held.label("held"),
            ledger.label("ledger"),
            holds.label("holds"),
        )
    ):
        diff = {}
        if int(row.balance) != int(row.ledger):
            diff["balance"] = (int(row.balance), int(row.ledger))
        if int(row.held) != int(row.holds):
            diff["held"] = (int(row.held), int(row.holds))
        if diff:
            out.append((row, diff))
    return out


def reconcile(rt: Runtime, *, fix: bool = False, now: dt.datetime | None = None) -> list[str]:
    """One line per drift found; with ``fix`` each drifting value is set from its ledger.

    Overages are checked against what was synced (``now`` dates a sync as stuck).
    """

    def work(conn: sa.Connection) -> list[str]:
        problems = []
        since = retained_since(conn)
        for row, diff in counter_drift(conn, since):
            parts = ", ".join(f"{c} {have} != ledger {want}" for c, (have, want) in diff.items())
            problems.append(
                f"counter {row.id} ({row.billable_type}:{row.billable_id}, period {row.period_start:%Y-%m-%d}): {parts}"
            )
            if fix:
                conn.execute(
                    sa.update(counters)
                    .where(counters.c.id == row.id)
                    .values({c: want for c, (_, want) in diff.items()})
                )
        for row, diff in budget_drift.budget_counter_drift(conn, since):
            problems.append(budget_drift.describe(row, diff))
            if fix:
                budget_drift.fix(conn, row, diff)
        for row, diff in wallet_drift(conn):
            parts = ", ".join(f"{c} {have} != ledger {want} (pico-units)" for c, (have, want) in diff.items())
            problems.append(f"wallet {row.id} ({row.billable_type}:{row.billable_id}): {parts}")
            if fix:
                conn.execute(
                    sa.update(wallets)
                    .where(wallets.c.id == row.id)
                    .values({c: sa.literal(want, sa.BigInteger) for c, (_, want) in diff.items()})
                )
        problems.extend(check_overages(rt, conn, fix=fix, now=now))
        problems.extend(kept_usage(rt, conn))
        return problems

    return rt.store.run(work)


def kept_usage(rt: Runtime, conn: sa.Connection) -> list[str]:
    """Spent usage the database failed to commit, kept for ``expire-reservations``: not in the ledger yet."""
    waiting = conn.execute(
        sa.select(sa.func.count())
        .select_from(reservations)
        .where(reservations.c.status == "pending", reservations.c.payload.is_not(None))
    ).scalar_one()
    problems = []
    if waiting:
        problems.append(
            f"{waiting} call(s) spent usage whose commit failed; it is kept in their reservations"
            " and expire-reservations commits it once they expire"
        )
    journaled = journal_lines(rt)
    if journaled:
        problems.append(
            f"{journaled} call(s) spent usage kept in the journal {journal_path(rt)};"
            " run expire-reservations to commit it"
        )
    return problems
