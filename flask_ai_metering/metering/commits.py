"""Commit a call's actual usage against its hold: the true-up, in one transaction.

The usage moves to the counter's ``used`` amounts and the rest of the hold is
returned; the ledger row is written (or queued in the reservation's outbox); the
wallet is charged in credits mode; the period's warning flag and, with
``charge``, the overage are set off by the same transaction. Signals and
immediate billing follow once it is durable.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import typing as t

import sqlalchemy as sa

from .. import queueing
from .. import signals
from ..billing import wallets
from ..billing.overages import record_overage
from ..models import utcnow
from ..money import from_units
from ..money import to_units
from ..quota import engine as quota
from .ledger import insert_usage
from .ledger import released_key
from .ledger import reservations
from .ledger import to_payload
from .ledger import usage_values
from .spec import Recorded
from .usage import PricedUsage

if t.TYPE_CHECKING:
    from ..quota.policy import Billable
    from ..quota.policy import Policy
    from ..runtime import Runtime
    from .spec import CallSpec
    from .spec import Hold
    from .usage import Extracted


@dataclasses.dataclass
class Effects:
    """What usage added to a counter sets off, to announce once its transaction committed."""

    check: quota.LimitCheck
    #: The check to announce as ``limit_approaching``, when this commit set the period's flag.
    approaching: list[quota.LimitCheck] = dataclasses.field(default_factory=list)
    #: Overages charged (``AI_METERING_OVERAGE_BEHAVIOR=charge``), as ``overage_charged`` sends them.
    overages: list[dict[str, t.Any]] = dataclasses.field(default_factory=list)
    #: ``(deducted, balance)`` pico-units when a credits billable's wallet paid.
    charged: tuple[int, int] | None = None


def commit(
    rt: Runtime,
    spec: CallSpec,
    hold: Hold,
    extracted: Extracted,
    *,
    duration_ms: int | None = None,
    occurred_at: dt.datetime | None = None,
) -> Recorded:
    """Record the actual usage against the hold; announce it once durable."""
    model = extracted.model or spec.model
    tokens = extracted.tokens
    at = occurred_at or utcnow()
    costs = rt.prices.cost(spec.provider, model, tokens, at)
    cost_units = to_units(costs.total_cost)
    values = usage_values(
        spec, tokens, costs, model, at, estimated=extracted.estimated, hold=hold, duration_ms=duration_ms
    )
    fast = rt.fast.try_commit(rt, hold, values, cost_units)
    if fast is not None:
        usage_id, state = fast
        effects = Effects(quota.limit_check(hold.policy, state, warning_threshold=rt.settings.warning_threshold))
        # Its own statement, after the commit: retrying it must not re-run the commit.
        if hold.policy.limited and effects.check.approaching:
            if rt.store.run(functools.partial(quota.mark_approaching, counter_id=hold.counter_id), autocommit=True):
                effects.approaching.append(effects.check)
    else:
        usage_id, effects = rt.store.run(functools.partial(_commit_portably, rt, hold, values, cost_units))
    if usage_id is None:  # queued: the row waits in the outbox for the publisher thread
        queueing.enqueue_usage(rt, hold.reservation_id)
    usage = PricedUsage.of(tokens, costs, provider=spec.provider, model=model, estimated=extracted.estimated)
    announce(rt, spec.billable, usage, usage_id, spec.feature, effects)
    return Recorded(usage, usage_id, effects.check)


def _commit_portably(
    rt: Runtime, hold: Hold, values: dict[str, t.Any], cost_units: int, conn: sa.Connection
) -> tuple[int | None, Effects]:
    at = values["occurred_at"]
    total_tokens = values["total_tokens"]
    won = quota.settle_reservation(conn, hold.reservation_id, "committed", at, keep_key=True)
    # A commit that lost to the sweeper still records what the provider spent;
    # the sweeper already returned the hold, so only the usage is added.
    state = quota.apply_to_counter(
        rt.store,
        conn,
        hold.counter_id,
        used_tokens=total_tokens,
        used_cost_units=cost_units,
        release_tokens=hold.tokens if won else 0,
        release_cost_units=hold.cost_units if won else 0,
        calls=1,
    )
    # A commit that lost to the sweeper lost its key too, and a retry may have claimed
    # it since: the row is recorded without it (the key is kept in meta, for audit).
    row = values if won else {**values, **released_key(values)}
    usage_id: int | None = None
    if rt.settings.queue_recording:
        conn.execute(
            sa.update(reservations).where(reservations.c.id == hold.reservation_id).values(payload=to_payload(row))
        )
    else:
        usage_id = insert_usage(conn, row)
    charged = None
    if hold.wallet_id is not None:
        charged = wallets.settle(
            conn,
            hold.wallet_id,
            hold_units=hold.credit_units if won else 0,
            cost_units=cost_units,
            usage_id=usage_id,
            overdraft=rt.settings.credit_overdraft,
            now=at,
        )
    effects = apply_usage_effects(rt, conn, hold.policy, state, hold.counter_id, total_tokens, usage_id, at)
    effects.charged = charged
    return usage_id, effects


def apply_usage_effects(
    rt: Runtime,
    conn: sa.Connection,
    policy: Policy,
    state: quota.CounterState,
    counter_id: int,
    total_tokens: int,
    usage_id: int | None,
    at: dt.datetime,
) -> Effects:
    """Set off, in the same transaction, what usage just added to a counter triggers.

    The limit check; the period's warning flag, set once (the check to announce,
    if this transaction set it); and, with ``charge``, the overage priced from
    the locked counter.
    """
    effects = Effects(quota.limit_check(policy, state, warning_threshold=rt.settings.warning_threshold))
    if policy.limited and effects.check.approaching and quota.mark_approaching(conn, counter_id=counter_id):
        effects.approaching.append(effects.check)
    if rt.settings.overage_behavior == "charge":
        overage = record_overage(conn, policy, state, total_tokens, usage_id, at, rt.settings.currency)
        if overage is not None:
            effects.overages.append(overage)
    return effects


def announce(
    rt: Runtime,
    billable: Billable,
    usage: PricedUsage,
    usage_id: int | None,
    feature: str | None,
    effects: Effects,
) -> None:
    """Signals and immediate billing, once the ledger is durable."""
    signals.usage_recorded.send(
        rt.app, billable=billable, usage=usage, usage_id=usage_id, feature=feature, replayed=False
    )
    for check in effects.approaching:
        signals.limit_approaching.send(rt.app, billable=billable, check=check)
    for overage in effects.overages:
        signals.overage_charged.send(rt.app, billable=billable, **overage)
    if effects.overages and rt.settings.overage_sync_strategy == "immediate":
        rt.billing.sync_after_commit([o["overage_id"] for o in effects.overages])
    if effects.charged and effects.charged[0]:
        deducted, balance = effects.charged
        signals.credits_deducted.send(
            rt.app,
            billable=billable,
            amount=from_units(deducted),
            balance=from_units(balance),
            transaction_id=None,
            reason="usage",
        )
