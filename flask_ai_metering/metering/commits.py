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
import logging
import time
import typing as t
from types import SimpleNamespace

import sqlalchemy as sa

from .. import queueing
from .. import signals
from ..alerts import worker
from ..billing import wallets
from ..billing.overages import record_overage
from ..errors import AiMeteringError
from ..models import utcnow
from ..money import from_units
from ..money import to_units
from ..quota import budgets
from ..quota import engine as quota
from ..quota import thresholds
from ..quota.policy import resolve_policy
from .ledger import from_payload
from .ledger import insert_usage
from .ledger import normalised_model
from .ledger import released_key
from .ledger import reservations
from .ledger import to_payload
from .ledger import usage_from_row
from .ledger import usage_table
from .ledger import usage_values
from .safekeeping import keep
from .spec import Hold
from .spec import Recorded
from .usage import PricedUsage

if t.TYPE_CHECKING:
    from ..quota.policy import Billable
    from ..quota.policy import Policy
    from ..runtime import Runtime
    from .spec import CallSpec
    from .usage import Extracted
    from .usage import TokenCounts

log = logging.getLogger("flask_ai_metering")

#: Attempts of a commit after the provider answered, each on a fresh connection.
COMMIT_ATTEMPTS = 3


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
    #: ``(wallet id, (balance, available))`` when this commit took the wallet under
    #: ``AI_METERING_CREDITS_LOW_THRESHOLD`` (and marked it, so ``credits_low`` fires once).
    low: tuple[int, tuple[int, int]] | None = None
    #: Alert thresholds this commit crossed (``threshold_crossed``, once each).
    crossings: list[thresholds.Crossing] = dataclasses.field(default_factory=list)


def commit(
    rt: Runtime,
    spec: CallSpec,
    hold: Hold,
    extracted: Extracted,
    *,
    duration_ms: int | None = None,
    occurred_at: dt.datetime | None = None,
) -> Recorded:
    """Record the actual usage against the hold; announce it once durable.

    The provider has answered, so the usage is owed: a failed write is retried on
    a fresh connection, and one that still fails is kept (:mod:`.safekeeping`) for
    ``expire-reservations`` to commit. The caller gets its response either way.
    """
    model = normalised_model(extracted.model) or spec.model
    tokens, clamped = clamp_counts(extracted.tokens, rt.settings.max_reported_tokens)
    estimated = extracted.estimated or bool(clamped)
    at = occurred_at or utcnow()
    costs = rt.prices.cost(spec.provider, model, tokens, at)
    cost_units = to_units(costs.total_cost)
    values = usage_values(spec, tokens, costs, model, at, estimated=estimated, hold=hold, duration_ms=duration_ms)
    if clamped:
        values["meta"] = {**(values["meta"] or {}), "ai_metering_clamped": clamped}
    usage = PricedUsage.of(tokens, costs, provider=spec.provider, model=model, estimated=estimated)
    try:
        usage_id, effects = _write(rt, hold, values, cost_units)
    except Exception as error:
        if isinstance(error, AiMeteringError):
            raise
        where = keep(rt, hold.reservation_id, values)
        log.error(
            "could not commit reservation %s's usage (%s); kept in %s for expire-reservations",
            hold.reservation_id,
            type(error).__name__,
            where,
        )
        return Recorded(usage, None, None)
    if usage_id is None and rt.settings.queue_recording:  # the row waits in the outbox
        queueing.enqueue_usage(rt, hold.reservation_id)
    announce(rt, spec.billable, usage, usage_id, spec.feature, effects)
    return Recorded(usage, usage_id, effects.check)


def _write(rt: Runtime, hold: Hold, values: dict[str, t.Any], cost_units: int) -> tuple[int | None, Effects]:
    """The commit's transaction, retried on a fresh connection when the database fails it.

    A retry is safe: the reservation's status changes once, and a retry that finds
    its earlier attempt committed returns that outcome instead of writing again.
    """
    for attempt in range(COMMIT_ATTEMPTS):
        try:
            if attempt == 0:
                fast = _write_fast(rt, hold, values, cost_units)
                if fast is not None:
                    return fast
            work = functools.partial(_commit_portably, rt, hold, values, cost_units, retry=attempt > 0)
            return rt.store.run(work)
        except Exception as error:
            if isinstance(error, AiMeteringError) or attempt == COMMIT_ATTEMPTS - 1:
                raise
            log.warning(
                "commit of reservation %s failed (%s); retrying on a fresh connection",
                hold.reservation_id,
                type(error).__name__,
            )
            # A dead server leaves every pooled connection dead: start the pool afresh.
            rt.store.engine.dispose(close=False)
            time.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


def _write_fast(
    rt: Runtime, hold: Hold, values: dict[str, t.Any], cost_units: int
) -> tuple[int | None, Effects] | None:
    fast = rt.fast.try_commit(rt, hold, values, cost_units)
    if fast is None:
        return None
    usage_id, state, standings = fast
    policy = hold.policy
    effects = Effects(quota.limit_check(policy, state, warning_threshold=rt.settings.warning_threshold))
    # Their own statements, after the commit: retrying them must not re-run the commit.
    if policy.limited and effects.check.approaching:
        if rt.store.run(functools.partial(quota.mark_approaching, counter_id=hold.counter_id), autocommit=True):
            effects.approaching.append(effects.check)
    checks = _budget_checks(rt, standings)
    counted = thresholds.pending(rt.settings, plan=(policy, hold.counter_id, state, effects.check), budgets=checks)
    if counted:
        work = functools.partial(thresholds.cross, settings=rt.settings, at=values["occurred_at"], counters=counted)
        effects.crossings = rt.store.run(work)
    effects.check = _tightest(effects.check, checks)
    return usage_id, effects


def _budget_checks(
    rt: Runtime, standings: t.Sequence[budgets.Standing]
) -> list[tuple[budgets.Standing, quota.LimitCheck]]:
    return [(s, s.check(warning_threshold=rt.settings.warning_threshold)) for s in standings]


def _tightest(
    plan_check: quota.LimitCheck, checks: t.Sequence[tuple[budgets.Standing, quota.LimitCheck]]
) -> quota.LimitCheck:
    """The check a caller sees: the plan's, or a budget's closer to its limit."""
    return budgets.tightest([plan_check, *(check for _, check in checks)]) if checks else plan_check


def clamp_counts(tokens: TokenCounts, ceiling: int) -> tuple[TokenCounts, dict[str, int]]:
    """Counts no larger than ``ceiling`` each, and the reported ones that were larger."""
    over = {f.name: getattr(tokens, f.name) for f in dataclasses.fields(tokens) if getattr(tokens, f.name) > ceiling}
    if not over:
        return tokens, {}
    return dataclasses.replace(tokens, **{name: ceiling for name in over}), over


def _commit_portably(
    rt: Runtime, hold: Hold, values: dict[str, t.Any], cost_units: int, conn: sa.Connection, *, retry: bool = False
) -> tuple[int | None, Effects]:
    if retry:
        done = _recorded_before(rt, hold, conn)
        if done is not None:
            return done
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
    budgets.apply(
        conn,
        hold.budget_counter_ids,
        used_tokens=total_tokens,
        used_cost_units=cost_units,
        requests=1,
        release_tokens=hold.tokens if won else 0,
        release_cost_units=hold.cost_units if won else 0,
        release_requests=1 if won else 0,
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
        policy = hold.policy
        due = wallets.beyond_allowance(
            policy.token_limit,
            policy.cost_limit_units,
            state.used_tokens,
            state.used_cost_units,
            total_tokens,
            cost_units,
        )
        charged = wallets.settle(
            conn,
            hold.wallet_id,
            hold_units=hold.credit_units if won else 0,
            cost_units=due,
            usage_id=usage_id,
            overdraft=rt.settings.credit_overdraft,
            now=at,
        )
    effects = apply_usage_effects(
        rt,
        conn,
        hold.policy,
        state,
        hold.counter_id,
        total_tokens,
        usage_id,
        at,
        overage=hold.billing_mode != "credits",
        budget_standings=budgets.standings(conn, hold.budget_counter_ids),
    )
    effects.charged = charged
    if hold.wallet_id is not None:
        effects.low = low_after_charge(rt, conn, hold.wallet_id)
    return usage_id, effects


def low_after_charge(rt: Runtime, conn: sa.Connection, wallet_id: int) -> tuple[int, tuple[int, int]] | None:
    """Mark the wallet low if this charge took it under the threshold (``credits_low`` to announce)."""
    threshold = rt.settings.credits_low_threshold
    crossed = wallets.mark_low(conn, wallet_id, None if threshold is None else to_units(threshold))
    return None if crossed is None else (wallet_id, crossed)


def _recorded_before(rt: Runtime, hold: Hold, conn: sa.Connection) -> tuple[int | None, Effects] | None:
    """The outcome of an earlier attempt of this commit that did reach the database, if one did."""
    status = conn.execute(sa.select(reservations.c.status).where(reservations.c.id == hold.reservation_id)).scalar()
    usage_id = conn.execute(
        sa.select(usage_table.c.id).where(usage_table.c.reservation_id == hold.reservation_id)
    ).scalar()
    if status != "committed" and usage_id is None:
        return None
    state = quota.counter_state(conn, hold.counter_id)
    return usage_id, Effects(quota.limit_check(hold.policy, state, warning_threshold=rt.settings.warning_threshold))


def commit_kept(
    rt: Runtime, conn: sa.Connection, reservation_id: int, payload: dict[str, t.Any]
) -> tuple[int | None, Effects] | None:
    """Commit usage that :func:`.safekeeping.keep` kept for ``reservation_id``; None if it is recorded already.

    The hold is rebuilt from the reservation, the policy read for the time the call
    happened; the same transaction as a live commit then records it (a hold the
    sweeper already released only adds the usage).
    """
    values = from_payload(payload)
    settled = quota.held_by(conn, reservation_id)
    billable = (values["billable_type"], values["billable_id"])
    policy = resolve_policy(conn, billable, values["occurred_at"], rt.settings)
    hold = Hold(
        reservation_id,
        settled.counter_id,
        policy,
        values["billing_mode"],
        settled.tokens,
        settled.cost_units,
        settled.wallet_id,
        settled.credit_units,
        budgets=tuple((s.counter_id, s.budget) for s in budgets.standings(conn, settled.budget_counter_ids or [])),
    )
    if _recorded_before(rt, hold, conn) is not None:
        return None
    usage_id, effects = _commit_portably(rt, hold, values, to_units(values["total_cost"]), conn)
    if not rt.settings.queue_recording:
        conn.execute(sa.update(reservations).where(reservations.c.id == reservation_id).values(payload=None))
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
    *,
    overage: bool = True,
    budget_standings: t.Sequence[budgets.Standing] = (),
) -> Effects:
    """Set off, in the same transaction, what usage just added to a counter triggers.

    The limit check (the tightest of the plan's and the budgets' it was added to); the
    period's warning flag, set once (the check to announce, if this transaction set it);
    the alert thresholds crossed; and, with ``charge``, the overage priced from the locked
    counter (``overage=False`` for credits mode: the wallet pays past the allowance).
    """
    effects = Effects(quota.limit_check(policy, state, warning_threshold=rt.settings.warning_threshold))
    if policy.limited and effects.check.approaching and quota.mark_approaching(conn, counter_id=counter_id):
        effects.approaching.append(effects.check)
    checks = _budget_checks(rt, budget_standings)
    counted = thresholds.pending(rt.settings, plan=(policy, counter_id, state, effects.check), budgets=checks)
    effects.crossings = thresholds.cross(conn, rt.settings, at, counted)
    effects.check = _tightest(effects.check, checks)
    if overage and rt.settings.overage_behavior == "charge":
        charged = record_overage(conn, policy, state, total_tokens, usage_id, at, rt.settings.currency)
        if charged is not None:
            effects.overages.append(charged)
    return effects


def announce_kept(rt: Runtime, payload: dict[str, t.Any], usage_id: int | None, effects: Effects) -> None:
    """Announce usage committed from what was kept, as its live commit would have."""
    values = from_payload(payload)
    usage = usage_from_row(SimpleNamespace(**values))
    announce(rt, (values["billable_type"], values["billable_id"]), usage, usage_id, values["feature"], effects)


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
    for crossing in effects.crossings:
        signals.threshold_crossed.send(rt.app, **crossing.send_kwargs())
    if any(crossing.queued for crossing in effects.crossings):
        worker.wake(rt)
    for overage in effects.overages:
        signals.overage_charged.send(rt.app, billable=billable, **overage)
    if effects.overages and rt.settings.overage_sync_strategy == "immediate":
        rt.billing.sync_after_commit([o["overage_id"] for o in effects.overages])
    if effects.low is not None and rt.settings.credits_low_threshold is not None:
        wallets.announce_low(rt.app, billable, effects.low[0], effects.low[1], rt.settings.credits_low_threshold)
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
