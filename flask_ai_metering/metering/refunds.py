"""``meter.refund``: give a call's tokens and cost back, through an adjustment in the ledger.

A refund is a ledger row of its own, never an edit of the call's row:
``kind = 'refund'``, ``adjusts_id`` naming the call, and the refunded tokens and
cost as *negative* amounts. Every SUM over the ledger (reports, rollups, the
dashboard, ``reconcile``) therefore nets it out with no special case; only call
counts skip it (a refund is not a call). In the same transaction:

* the counter of the call's period gets the tokens and cost back while that
  period is still running (the refund row then names the counter, so
  ``reconcile``'s counter == ledger holds); a finished period is left as it was;
* a call paid from a credit wallet is credited back, up to what the wallet paid;
* an overage the call caused is reduced by the refunded tokens (taken from the
  overage first): in place while it is ``pending`` and unpriced, else by a
  negative overage row that the billing driver syncs like any other, exactly
  once (a negative invoice item on Stripe).

The call's row is locked first, so two refunds of one call run one after the
other and can never give back more than was charged together.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import typing as t
from decimal import ROUND_HALF_EVEN
from decimal import Decimal

import sqlalchemy as sa

from .. import signals
from .. import validation as v
from ..billing.wallets import rearm_low
from ..errors import InvalidUsage
from ..errors import UsageNotFound
from ..models import TOKEN_COLUMNS
from ..models import Counter
from ..models import CreditTransaction
from ..models import CreditWallet
from ..models import Overage
from ..models import Subscription
from ..models import Usage
from ..models import table
from ..models import utcnow
from ..money import from_units
from ..money import parse_money
from ..money import to_units
from ..quota import budgets
from ..quota import engine as quota

if t.TYPE_CHECKING:
    from ..runtime import Runtime

usage = table(Usage)
counters = table(Counter)
overages = table(Overage)
subs = table(Subscription)
wallets = table(CreditWallet)
transactions = table(CreditTransaction)

_cost = sa.type_coerce(usage.c.total_cost, sa.BigInteger)
_in_cost = sa.type_coerce(usage.c.input_cost, sa.BigInteger)
_amount = sa.type_coerce(overages.c.amount, sa.BigInteger)
_txn_amount = sa.type_coerce(transactions.c.amount, sa.BigInteger)
_balance = sa.type_coerce(wallets.c.balance, sa.BigInteger)
_REASON_MAX = 255


@dataclasses.dataclass(frozen=True)
class Refund:
    """What one ``meter.refund`` gave back."""

    #: The adjustment's id in the ledger (a ``Usage`` row with ``kind = 'refund'``).
    id: int
    #: The refunded call's usage id.
    usage_id: int
    tokens: int
    cost: Decimal
    reason: str
    #: Given back to the counter of the call's period (False once that period has ended).
    counter_credited: bool
    #: Credited back to the billable's wallet (credits mode).
    credited: Decimal
    #: Tokens and amount taken off the call's overage.
    overage_tokens: int
    overage_amount: Decimal
    #: True when ``idempotency_key`` found an earlier refund: that one is returned, nothing changed.
    replayed: bool = False


def _scope(usage_id: int) -> str:
    """The idempotency scope of a call's refunds: keys are per refunded call."""
    return f"refund:{usage_id}"


def _check(usage_id: t.Any, reason: t.Any, tokens: t.Any, cost: t.Any) -> tuple[int, str, int | None, int | None]:
    if isinstance(usage_id, bool) or not isinstance(usage_id, int) or usage_id <= 0:
        raise InvalidUsage(f"usage_id must be a positive int, got {usage_id!r}")
    if not isinstance(reason, str) or not reason.strip() or len(reason) > _REASON_MAX:
        raise InvalidUsage(f"reason must be a non-empty str of at most {_REASON_MAX} characters, got {reason!r}")
    want_tokens = v.token_count(tokens, "tokens")
    want_units = None
    if cost is not None:
        amount = parse_money(cost, "cost")
        if amount < 0:
            raise InvalidUsage(f"cost must not be negative, got {cost!r}")
        want_units = to_units(amount)
    if want_tokens == 0 and want_units in (0, None) or want_units == 0 and want_tokens is None:
        raise InvalidUsage("tokens and cost are both 0: nothing to refund")
    return usage_id, reason, want_tokens, want_units


def refund(
    rt: Runtime,
    usage_id: t.Any,
    *,
    reason: t.Any,
    tokens: t.Any = None,
    cost: t.Any = None,
    idempotency_key: t.Any = None,
    now: dt.datetime | None = None,
) -> Refund:
    """Refund a call (all that is left of it, or ``tokens`` and/or ``cost``); see the module doc."""
    usage_id, reason, want_tokens, want_units = _check(usage_id, reason, tokens, cost)
    key = v.idempotency_key(idempotency_key)
    at = now or utcnow()

    #: ``[balance units, transaction id]`` of a wallet credited back, for ``credits_added``.
    wallet: list[int] = []

    def work(conn: sa.Connection) -> tuple[Refund, tuple[str, str]]:
        wallet.clear()
        original = conn.execute(sa.select(usage).where(usage.c.id == usage_id).with_for_update()).first()
        if original is None:
            raise UsageNotFound(usage_id)
        billable = (original.billable_type, original.billable_id)
        if key is not None:
            earlier = _earlier(conn, original, key)
            if earlier is not None:
                _same_request(earlier, key, want_tokens, want_units)
                return earlier, billable
        if original.kind != "usage":
            raise InvalidUsage(f"usage_id {usage_id} is a {original.kind} adjustment, not a call")
        left = _left(conn, original)
        tokens_back, units_back = _amounts(original, left, want_tokens, want_units)
        overage = _overage_of(conn, original.id)
        if overage is not None and tokens_back:
            # The subscription row serialises overage pricing (billing.sync): take it before the counter.
            of_billable = sa.and_(subs.c.billable_type == billable[0], subs.c.billable_id == billable[1])
            conn.execute(sa.select(subs.c.id).where(of_billable).with_for_update())
        counter_id = _give_back_to_counter(rt, conn, original.counter_id, tokens_back, units_back, at)
        budgets.adjust_for_call(conn, original, tokens=-tokens_back, cost_units=-units_back, at=at)
        refund_id = _insert(conn, original, left, tokens_back, units_back, counter_id, key, reason, at)
        if original.billing_mode == "credits":
            credited, wallet[:] = _credit_wallet(rt, conn, original, refund_id, units_back, at)
        else:
            credited = 0
        overage_tokens, overage_units = (0, 0)
        if overage is not None and tokens_back:
            overage_tokens, overage_units = _reduce_overage(conn, overage, refund_id, tokens_back, at)
            # Kept on the adjustment, so a replay reports it whichever way the overage was reduced.
            meta = {"reason": reason, "overage_tokens": overage_tokens, "overage_units": overage_units}
            conn.execute(sa.update(usage).where(usage.c.id == refund_id).values(meta=meta))
        done = Refund(
            id=refund_id,
            usage_id=usage_id,
            tokens=tokens_back,
            cost=from_units(units_back),
            reason=reason,
            counter_credited=counter_id is not None,
            credited=from_units(credited),
            overage_tokens=overage_tokens,
            overage_amount=from_units(overage_units),
        )
        return done, billable

    done, billable = rt.store.run(work)
    if done.replayed:
        return done
    signals.usage_refunded.send(
        rt.app,
        billable=billable,
        usage_id=done.usage_id,
        refund_id=done.id,
        tokens=done.tokens,
        cost=done.cost,
        reason=done.reason,
        credited=done.credited,
        overage_tokens=done.overage_tokens,
        overage_amount=done.overage_amount,
    )
    if done.credited and wallet:
        balance, txn_id = wallet
        signals.credits_added.send(
            rt.app,
            billable=billable,
            amount=done.credited,
            balance=from_units(balance),
            transaction_id=txn_id,
            reason="refund",
        )
    if done.overage_amount and rt.settings.overage_sync_strategy == "immediate":
        negative = rt.store.run(
            lambda conn: conn.execute(sa.select(overages.c.id).where(overages.c.usage_id == done.id)).scalar(),
            write=False,
        )
        if negative is not None:
            rt.billing.sync_after_commit([int(negative)])
    return done


def _earlier(conn: sa.Connection, original: t.Any, key: str) -> Refund | None:
    """The refund of ``original`` recorded under ``key``, as a replayed :class:`Refund`."""
    row = conn.execute(
        sa.select(usage.c.id, usage.c.total_tokens, _cost.label("units"), usage.c.counter_id, usage.c.meta).where(
            usage.c.billable_type == original.billable_type,
            usage.c.billable_id == original.billable_id,
            usage.c.idempotency_scope == _scope(original.id),
            usage.c.idempotency_key == key,
        )
    ).first()
    if row is None:
        return None
    credited = conn.execute(
        sa.select(sa.func.coalesce(sa.func.sum(_txn_amount), 0)).where(
            transactions.c.usage_id == row.id, transactions.c.reason == "refund"
        )
    ).scalar_one()
    back = conn.execute(
        sa.select(sa.func.coalesce(sa.func.sum(overages.c.tokens), 0), sa.func.coalesce(sa.func.sum(_amount), 0)).where(
            overages.c.usage_id == row.id
        )
    ).one()
    meta = row.meta or {}
    return Refund(
        id=int(row.id),
        usage_id=int(original.id),
        tokens=-int(row.total_tokens),
        cost=from_units(-int(row.units)),
        reason=str(meta.get("reason", "")),
        counter_credited=row.counter_id is not None,
        credited=from_units(int(credited)),
        overage_tokens=int(meta.get("overage_tokens", -int(back[0]))),
        overage_amount=from_units(int(meta.get("overage_units", -int(back[1])))),
        replayed=True,
    )


def _same_request(earlier: Refund, key: str, tokens: int | None, units: int | None) -> None:
    """A replay must ask for what the first refund under ``key`` gave (or leave the amounts out)."""
    if tokens is not None and tokens != earlier.tokens or units is not None and units != to_units(earlier.cost):
        raise InvalidUsage(
            f"idempotency_key {key!r} was used for a refund of {earlier.tokens} tokens and"
            f" {earlier.cost.normalize()}, not this one"
        )


def _left(conn: sa.Connection, original: t.Any) -> dict[str, int]:
    """What of ``original`` is not refunded yet: each token column, ``cost_units``, ``input_cost_units``.

    A ``reprice`` adjustment's cost counts as charged (it has no tokens).
    """
    sums = conn.execute(
        sa.select(
            *(sa.func.coalesce(sa.func.sum(usage.c[name]), 0) for name in TOKEN_COLUMNS),
            sa.func.coalesce(sa.func.sum(_cost), 0),
            sa.func.coalesce(sa.func.sum(_in_cost), 0),
        ).where(usage.c.adjusts_id == original.id, usage.c.kind.in_(("refund", "reprice")))
    ).one()
    left = {name: int(getattr(original, name)) + int(sums[i]) for i, name in enumerate(TOKEN_COLUMNS)}
    left["cost_units"] = to_units(original.total_cost) + int(sums[len(TOKEN_COLUMNS)])
    left["input_cost_units"] = to_units(original.input_cost) + int(sums[len(TOKEN_COLUMNS) + 1])
    return left


def _amounts(original: t.Any, left: dict[str, int], tokens: int | None, units: int | None) -> tuple[int, int]:
    """The tokens and pico-units to give back: all that is left, or what was asked (the other 0)."""
    if tokens is None and units is None:
        tokens, units = left["total_tokens"], left["cost_units"]
        if tokens == 0 and units == 0:
            raise InvalidUsage(f"usage_id {original.id} is refunded in full already")
        return tokens, units
    tokens, units = tokens or 0, units or 0
    if tokens > left["total_tokens"]:
        raise InvalidUsage(
            f"tokens: {tokens} is more than the {left['total_tokens']} of usage {original.id} not refunded yet"
        )
    if units > left["cost_units"]:
        raise InvalidUsage(
            f"cost: {from_units(units).normalize()} is more than the {from_units(left['cost_units']).normalize()}"
            f" of usage {original.id} not refunded yet"
        )
    return tokens, units


def _give_back_to_counter(
    rt: Runtime, conn: sa.Connection, counter_id: int | None, tokens: int, units: int, at: dt.datetime
) -> int | None:
    """Return the amounts to the call's counter if its period is still running; the counter's id, or None."""
    if counter_id is None:
        return None
    end = conn.execute(sa.select(counters.c.period_end).where(counters.c.id == counter_id)).scalar()
    if end is None or end <= at:
        return None
    quota.apply_to_counter(rt.store, conn, counter_id, used_tokens=-tokens, used_cost_units=-units)
    return counter_id


def _split(left: dict[str, int], tokens: int) -> dict[str, int]:
    """``tokens`` spread over the token columns in proportion to what is left of each (rounded down)."""
    whole = left["total_tokens"]
    if tokens == whole:
        return {name: left[name] for name in TOKEN_COLUMNS}
    out = {name: left[name] * tokens // whole if whole else 0 for name in TOKEN_COLUMNS}
    out["total_tokens"] = tokens
    return out


def _insert(
    conn: sa.Connection,
    original: t.Any,
    left: dict[str, int],
    tokens: int,
    units: int,
    counter_id: int | None,
    key: str | None,
    reason: str,
    at: dt.datetime,
) -> int:
    counts = _split(left, tokens)
    if units == left["cost_units"]:
        input_units = left["input_cost_units"]
    else:
        input_units = left["input_cost_units"] * units // left["cost_units"] if left["cost_units"] else 0
    values = {
        "billable_type": original.billable_type,
        "billable_id": original.billable_id,
        "user_id": original.user_id,
        "tenant_id": original.tenant_id,
        "provider": original.provider,
        "model": original.model,
        "feature": original.feature,
        **{name: -n for name, n in counts.items()},
        "input_cost": from_units(-input_units),
        "output_cost": from_units(-(units - input_units)),
        "total_cost": from_units(-units),
        "currency": original.currency,
        "unpriced": False,
        "estimated": False,
        "price_source": original.price_source,
        "billing_mode": original.billing_mode,
        "idempotency_key": key,
        "idempotency_scope": _scope(original.id) if key is not None else "",
        "meta": {"reason": reason},
        "counter_id": counter_id,
        "kind": "refund",
        "adjusts_id": original.id,
        "occurred_at": at,
        "created_at": at,
    }
    return int(conn.execute(sa.insert(usage).values(**values)).inserted_primary_key[0])  # type: ignore[index]


def _credit_wallet(
    rt: Runtime, conn: sa.Connection, original: t.Any, refund_id: int, units: int, at: dt.datetime
) -> tuple[int, list[int]]:
    """Credit back what the wallet paid for the call, up to ``units``.

    Returns the pico-units credited and, when some were, ``[balance units, transaction id]``.
    """
    repriced = sa.select(usage.c.id).where(usage.c.adjusts_id == original.id, usage.c.kind == "reprice")
    paid = conn.execute(
        sa.select(transactions.c.wallet_id, sa.func.sum(_txn_amount))
        .where(
            sa.or_(transactions.c.usage_id == original.id, transactions.c.usage_id.in_(repriced)),
            transactions.c.reason.in_(("usage", "reprice")),
        )
        .group_by(transactions.c.wallet_id)
    ).first()
    if paid is None:
        return 0, []
    refund_ids = sa.select(usage.c.id).where(usage.c.adjusts_id == original.id, usage.c.kind == "refund")
    credited_before = conn.execute(
        sa.select(sa.func.coalesce(sa.func.sum(_txn_amount), 0)).where(
            transactions.c.usage_id.in_(refund_ids), transactions.c.reason == "refund"
        )
    ).scalar_one()
    credit = min(units, -int(paid[1]) - int(credited_before))
    if credit <= 0:
        return 0, []
    wallet_id = int(paid[0])
    conn.execute(sa.update(wallets).where(wallets.c.id == wallet_id).values(balance=_balance + credit, updated_at=at))
    txn = conn.execute(
        sa.insert(transactions).values(
            wallet_id=wallet_id,
            amount=from_units(credit),
            reason="refund",
            meta={"refund_of": original.id},
            usage_id=refund_id,
            created_at=at,
        )
    )
    threshold = rt.settings.credits_low_threshold
    rearm_low(conn, wallet_id, None if threshold is None else to_units(threshold))
    balance = conn.execute(sa.select(_balance).where(wallets.c.id == wallet_id)).scalar_one()
    return credit, [int(balance), int(txn.inserted_primary_key[0])]  # type: ignore[index]


def _overage_of(conn: sa.Connection, usage_id: int) -> t.Any:
    return conn.execute(sa.select(overages).where(overages.c.usage_id == usage_id)).first()


def _reduce_overage(
    conn: sa.Connection, overage: t.Any, refund_id: int, tokens: int, at: dt.datetime
) -> tuple[int, int]:
    """Take up to ``tokens`` off the call's overage; ``(tokens, pico-units)`` taken.

    A pending overage not priced for billing yet is reduced in place (guarded, so a
    sync that claimed it first wins and the refund takes the other branch); one
    already claimed or synced gets a negative overage row, billed as a credit.
    """
    refund_ids = sa.select(usage.c.id).where(usage.c.adjusts_id == overage.usage_id, usage.c.kind == "refund")
    credited = conn.execute(
        sa.select(sa.func.coalesce(sa.func.sum(overages.c.tokens), 0), sa.func.coalesce(sa.func.sum(_amount), 0)).where(
            overages.c.usage_id.in_(refund_ids), overages.c.id != overage.id
        )
    ).one()
    left_tokens = int(overage.tokens) + int(credited[0])
    left_units = to_units(overage.amount) + int(credited[1])
    take = min(tokens, left_tokens)
    if take <= 0:
        return 0, 0
    if take == left_tokens:
        units = left_units
    else:
        units = int((Decimal(left_units) * take / left_tokens).to_integral_value(ROUND_HALF_EVEN))
    in_place = conn.execute(
        sa.update(overages)
        .where(overages.c.id == overage.id, overages.c.status == "pending", overages.c.synced_amount_minor.is_(None))
        .values({overages.c.tokens: overages.c.tokens - take, overages.c.amount: _amount - units})
    ).rowcount
    if in_place != 1:
        conn.execute(
            sa.insert(overages).values(
                billable_type=overage.billable_type,
                billable_id=overage.billable_id,
                usage_id=refund_id,
                tokens=-take,
                amount=from_units(-units),
                currency=overage.currency,
                period_start=overage.period_start,
                period_end=overage.period_end,
                status="pending",
                created_at=at,
            )
        )
    return take, units
