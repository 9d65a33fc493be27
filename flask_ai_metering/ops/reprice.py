"""``reprice``: price ``unpriced`` and ``estimated`` calls once a price exists, through ledger adjustments.

A call recorded without a price (a model the catalogue did not know) or with
estimated counts keeps its row as it was. Once a price exists (an
``AI_METERING_PROVIDERS`` override, or a newer genai-prices), ``reprice`` prices
its tokens as of the time of the call and, when that differs from what the row
says, writes a ``reprice`` adjustment: a ledger row with ``kind = 'reprice'``,
``adjusts_id`` naming the call, no tokens, the cost difference, and the new
``price_source``. In the same transaction, per call:

* the counter of the call's period gets the difference while that period runs
  (the adjustment then names it, so ``reconcile`` stays clean);
* a credits-mode call whose plan has no allowance is charged the difference from
  its wallet (capped at what it holds without overdraft, as a commit is); inside
  a plan allowance nothing is charged (the allowance absorbed the tokens);
* overage is priced per token, not per cost, so it does not change.

A call is repriced once: one with a ``reprice`` adjustment, or one refunded since,
is not taken again. Rollups, reports and the dashboard add the adjustment up like
any ledger row.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import typing as t

import sqlalchemy as sa

from ..billing import wallets
from ..metering.usage import TOKEN_FIELDS
from ..metering.usage import TokenCounts
from ..models import TOKEN_COLUMNS
from ..models import Counter
from ..models import Usage
from ..models import table
from ..models import utcnow
from ..money import from_units
from ..money import to_units
from ..quota import budgets
from ..quota import engine as quota
from ..quota.policy import resolve_policy

if t.TYPE_CHECKING:
    from decimal import Decimal

    from ..runtime import Runtime

usage = table(Usage)
counters = table(Counter)
adjusted = usage.alias("adjusted")

#: Rows read and repriced per transaction.
BATCH = 200


class Progress(t.Protocol):
    def start(self, total: int) -> None: ...

    def update(self, n: int) -> None: ...


@dataclasses.dataclass
class RepriceReport:
    """What one run found and did; ``str()`` is the CLI's summary."""

    #: Calls looked at (unpriced or estimated, not repriced or refunded yet).
    candidates: int = 0
    #: Calls given an adjustment (or that would be, with ``dry_run``).
    repriced: int = 0
    #: Calls whose model still has no price.
    still_unpriced: int = 0
    #: Sum of the cost differences (pico-units).
    delta_units: int = 0
    #: Charged to wallets (pico-units).
    charged_units: int = 0
    dry_run: bool = False

    def __str__(self) -> str:
        verb = "would reprice" if self.dry_run else "repriced"
        return (
            f"{self.candidates} call(s) unpriced or estimated; {verb} {self.repriced}"
            f" (cost {from_units(self.delta_units).normalize():f} more, {from_units(self.charged_units).normalize():f}"
            f" from wallets); {self.still_unpriced} still without a price."
        )


def _candidates(model: str | None, since: dt.datetime | None) -> sa.Select[t.Any]:
    taken = (
        sa.select(adjusted.c.id)
        .where(adjusted.c.adjusts_id == usage.c.id, adjusted.c.kind.in_(("reprice", "refund")))
        .exists()
    )
    conditions = [usage.c.kind == "usage", sa.or_(usage.c.unpriced.is_(True), usage.c.estimated.is_(True)), ~taken]
    if model is not None:
        conditions.append(usage.c.model == model)
    if since is not None:
        conditions.append(usage.c.occurred_at >= since)
    return sa.select(usage).where(*conditions).order_by(usage.c.id)


def reprice(
    rt: Runtime,
    *,
    model: str | None = None,
    since: dt.datetime | None = None,
    dry_run: bool = False,
    progress: Progress | None = None,
    now: dt.datetime | None = None,
) -> RepriceReport:
    """Reprice the ``unpriced`` and ``estimated`` calls (of ``model``, since ``since``); see the module doc."""
    report = RepriceReport(dry_run=dry_run)
    at = now or utcnow()
    with rt.store.engine.connect() as conn:
        total = conn.execute(sa.select(sa.func.count()).select_from(_candidates(model, since).subquery())).scalar_one()
    if progress is not None:
        progress.start(int(total))
    last = 0
    while True:

        def batch(conn: sa.Connection, after: int = last) -> int:
            rows = conn.execute(_candidates(model, since).where(usage.c.id > after).limit(BATCH)).all()
            for row in rows:
                _one(rt, conn, row, report, at, dry_run)
            return int(rows[-1].id) if rows else -1

        last = rt.store.run(batch)
        if progress is not None and last > 0:
            progress.update(min(BATCH, int(total)))
        if last < 0:
            return report


def _one(rt: Runtime, conn: sa.Connection, row: t.Any, report: RepriceReport, at: dt.datetime, dry_run: bool) -> None:
    report.candidates += 1
    tokens = TokenCounts(**{name: int(getattr(row, name)) for name in TOKEN_FIELDS})
    costs = rt.prices.cost(row.provider, row.model, tokens, row.occurred_at)
    if costs.unpriced:
        report.still_unpriced += 1
        return
    delta = to_units(costs.total_cost) - to_units(row.total_cost)
    if delta == 0:
        return
    report.repriced += 1
    report.delta_units += delta
    if dry_run:
        return
    counter_id = _counter_in_force(rt, conn, row.counter_id, delta, at)
    budgets.adjust_for_call(conn, row, tokens=0, cost_units=delta, at=at)
    input_delta = to_units(costs.input_cost) - to_units(row.input_cost)
    adjustment_id = _insert(conn, row, costs.source, delta, input_delta, counter_id, at)
    if row.billing_mode == "credits":
        report.charged_units += _charge(rt, conn, row, adjustment_id, delta, at)


def _counter_in_force(
    rt: Runtime, conn: sa.Connection, counter_id: int | None, delta: int, at: dt.datetime
) -> int | None:
    if counter_id is None:
        return None
    end = conn.execute(sa.select(counters.c.period_end).where(counters.c.id == counter_id)).scalar()
    if end is None or end <= at:
        return None
    quota.apply_to_counter(rt.store, conn, counter_id, used_cost_units=delta)
    return counter_id


def _insert(
    conn: sa.Connection,
    row: t.Any,
    source: str,
    delta: int,
    input_delta: int,
    counter_id: int | None,
    at: dt.datetime,
) -> int:
    values = {
        **{name: getattr(row, name) for name in ("billable_type", "billable_id", "user_id", "tenant_id")},
        **{name: getattr(row, name) for name in ("provider", "model", "feature", "currency", "billing_mode")},
        **dict.fromkeys(TOKEN_COLUMNS, 0),
        "input_cost": from_units(input_delta),
        "output_cost": from_units(delta - input_delta),
        "total_cost": from_units(delta),
        "unpriced": False,
        "estimated": False,
        "price_source": source,
        "idempotency_scope": "",
        "meta": {"repriced_from": str(row.total_cost), "previous_source": row.price_source},
        "counter_id": counter_id,
        "kind": "reprice",
        "adjusts_id": row.id,
        "occurred_at": at,
        "created_at": at,
    }
    return int(conn.execute(sa.insert(usage).values(**values)).inserted_primary_key[0])  # type: ignore[index]


def _charge(rt: Runtime, conn: sa.Connection, row: t.Any, adjustment_id: int, delta: int, at: dt.datetime) -> int:
    """Charge (or, for a lower price, credit) a credits call's wallet the difference, outside any allowance."""
    billable = (row.billable_type, row.billable_id)
    if resolve_policy(conn, billable, at, rt.settings).limited:
        return 0  # a plan allowance took the call's tokens: the wallet did not pay for them
    wallet_id = wallets.wallet_id_of(conn, billable)
    if wallet_id is None:
        return 0
    if delta < 0:
        return -_credit(conn, wallet_id, -delta, adjustment_id, at)
    charged, _ = wallets.settle(
        conn,
        wallet_id,
        hold_units=0,
        cost_units=delta,
        usage_id=adjustment_id,
        overdraft=rt.settings.credit_overdraft,
        now=at,
    )
    return charged


def _credit(conn: sa.Connection, wallet_id: int, units: int, adjustment_id: int, at: dt.datetime) -> int:
    balance = sa.type_coerce(wallets.wallets.c.balance, sa.BigInteger)
    conn.execute(sa.update(wallets.wallets).where(wallets.wallets.c.id == wallet_id).values(balance=balance + units))
    amount: Decimal = from_units(units)
    conn.execute(
        sa.insert(wallets.transactions).values(
            wallet_id=wallet_id, amount=amount, reason="reprice", usage_id=adjustment_id, created_at=at
        )
    )
    return units
