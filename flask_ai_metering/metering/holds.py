"""Reserve before the call, release when it raised, expire what dead processes left.

A reserve claims the idempotency key and holds ``max_tokens`` and their
worst-case cost (and, in credits mode, that much of the wallet) in one
transaction. The dialect's fast path (:mod:`.fast_path`) is tried first; the
portable transaction below is the general case and explains every refusal.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import time
import typing as t

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from .. import observability
from .. import signals
from ..billing import wallets
from ..errors import AiLimitExceeded
from ..errors import CreditsInsufficient
from ..errors import FeatureNotAllowed
from ..errors import IdempotencyConflict
from ..models import utcnow
from ..money import from_units
from ..quota import budgets
from ..quota import engine as quota
from ..quota.policy import resolve_policy
from ..transactions import is_duplicate
from .ledger import replay_of
from .spec import Hold
from .spec import Replay
from .spec import reservation_size

if t.TYPE_CHECKING:
    from ..quota.policy import Policy
    from ..runtime import Runtime
    from .spec import CallSpec

#: A refusal the portable hold explains: raised by :func:`reserve` once its transaction ended.
Refusal = AiLimitExceeded | CreditsInsufficient


@dataclasses.dataclass(frozen=True)
class HoldSize:
    """What one call holds: tokens and worst-case cost, and whether limits refuse."""

    tokens: int
    cost_units: int
    #: ``AI_METERING_OVERAGE_BEHAVIOR`` is ``block``: a hold that does not fit is refused.
    enforce: bool


def reserve(rt: Runtime, spec: CallSpec, now: dt.datetime | None = None) -> Hold | Replay:
    """Claim the idempotency key and hold quota, atomically; raise if refused.

    :raises AiLimitExceeded: a limit refuses the hold.
    :raises CreditsInsufficient: the wallet cannot pay the hold.
    :raises FeatureNotAllowed: the plan does not list ``spec.feature``.
    :raises IdempotencyConflict: the key's first call is still in flight.
    """
    entered = time.perf_counter()
    tokens, cost_units = reservation_size(rt, spec)
    size = HoldSize(tokens, cost_units, enforce=rt.settings.overage_behavior == "block")
    for _ in range(3):
        try:
            outcome: Hold | Replay | Refusal | None = rt.fast.try_hold(rt, spec, size, now or utcnow())
            if outcome is None:
                outcome = rt.store.run(functools.partial(_hold_portably, rt, spec, size, now))
        except sa_exc.IntegrityError as error:
            # A racing call claimed the same key between our look-up and insert:
            # the unique key refused us and rolled everything back; look again.
            if spec.idempotency_key is None or not is_duplicate(error):
                raise
            continue
        except FeatureNotAllowed as refused:
            observability.call_refused(rt, spec, refused)
            raise
        if isinstance(outcome, (AiLimitExceeded, CreditsInsufficient)):
            signals.limit_reached.send(rt.app, billable=spec.billable, check=outcome.check)
            observability.call_refused(rt, spec, outcome)
            raise outcome
        if rt.observers and isinstance(outcome, Hold):
            outcome = dataclasses.replace(outcome, reserved_in=time.perf_counter() - entered)
        return outcome
    raise IdempotencyConflict(f"idempotency key {spec.idempotency_key!r} is still in flight")


def current_policy(rt: Runtime, spec: CallSpec, conn: sa.Connection, at: dt.datetime) -> Policy:
    """The billable's policy now, remembered for the fast path; refuses a feature the plan forbids."""
    policy = resolve_policy(conn, spec.billable, at, rt.settings)
    rt.fast.remember(policy)
    if not policy.allows_feature(spec.feature):
        raise FeatureNotAllowed(spec.feature, policy.plan_slug or "")
    return policy


def _hold_portably(
    rt: Runtime, spec: CallSpec, size: HoldSize, now: dt.datetime | None, conn: sa.Connection
) -> Hold | Replay | Refusal:
    """The general hold, in one transaction: replay, policy, counter, wallet, reservation."""
    at = now or utcnow()
    replay = replay_of(conn, spec)
    if replay is not None:
        return replay
    policy = current_policy(rt, spec, conn, at)
    mode = spec.billing_mode or policy.billing_mode
    counter_id = None
    if mode == "credits":  # the plan's limits are an allowance: past them the wallet pays, nothing refuses
        size = dataclasses.replace(size, enforce=False)
    if not policy.expired:
        counter_id = _hold_on_counter(rt, conn, policy, size, at)
    matched = (
        budgets.matching(conn, spec.billable, spec.user_id, spec.feature, spec.model) if policy.has_budgets else []
    )
    if counter_id is None:
        return _refusal(rt, conn, policy, size, matched, at)
    held_budgets: tuple[tuple[int, budgets.Terms], ...] = ()
    if matched:
        ids, refused = budgets.hold(rt.store, conn, matched, size.tokens, size.cost_units, at, rt.settings.timezone)
        if refused is not None:
            conn.rollback()  # every hold this transaction made, the plan's included
            return _refusal(rt, conn, policy, size, matched, at)
        held_budgets = tuple(zip(ids, matched, strict=True))
    wallet_id, credit_units = None, 0
    if mode == "credits":
        credit_units = _credits_to_hold(conn, policy, counter_id, size)
        if credit_units == 0 and policy.limited:  # all inside the allowance: an empty wallet is fine
            wallet_id = wallets.wallet_id_of(conn, spec.billable)
        else:
            wallet_id = wallets.hold(conn, spec.billable, credit_units, overdraft=rt.settings.credit_overdraft)
        if wallet_id is None and not (credit_units == 0 and policy.limited):
            conn.rollback()
            return _credits_refusal(rt, conn, policy, credit_units)
    reservation_id = quota.add_reservation(
        conn,
        counter_id=counter_id,
        billable=spec.billable,
        tokens=size.tokens,
        cost_units=size.cost_units,
        idempotency_key=spec.idempotency_key,
        scope=spec.scope,
        expires_at=at + dt.timedelta(seconds=rt.settings.reservation_ttl),
        now=at,
        wallet_id=wallet_id,
        credit_units=credit_units,
        budget_counter_ids=[counter_id for counter_id, _ in held_budgets],
    )
    return Hold(
        reservation_id,
        counter_id,
        policy,
        mode,
        size.tokens,
        size.cost_units,
        wallet_id,
        credit_units,
        budgets=held_budgets,
    )


def _credits_to_hold(conn: sa.Connection, policy: Policy, counter_id: int, size: HoldSize) -> int:
    """The worst-case cost the wallet must hold: the part past the plan's allowance (all of it without one).

    Quota others hold counts as used here, so the hold is never short; the commit charges
    what actually fell past the allowance.
    """
    if not policy.limited:
        return size.cost_units
    state = quota.counter_state(conn, counter_id)
    return wallets.beyond_allowance(
        policy.token_limit,
        policy.cost_limit_units,
        state.used_tokens + state.reserved_tokens,
        state.used_cost_units + state.reserved_cost_units,
        size.tokens,
        size.cost_units,
    )


def _hold_on_counter(rt: Runtime, conn: sa.Connection, policy: Policy, size: HoldSize, at: dt.datetime) -> int | None:
    """Hold on the period's counter (created on its first use); None when the limits refuse."""
    counter_id = quota.try_reserve(rt.store, conn, policy, size.tokens, size.cost_units, enforce=size.enforce)
    if counter_id is None:
        quota.ensure_counter(rt.store, conn, policy, at)
        counter_id = quota.try_reserve(rt.store, conn, policy, size.tokens, size.cost_units, enforce=size.enforce)
    return counter_id


def _refusal(
    rt: Runtime,
    conn: sa.Connection,
    policy: Policy,
    size: HoldSize,
    matched: t.Sequence[budgets.Terms],
    at: dt.datetime,
) -> AiLimitExceeded:
    """The refusal to explain: the narrowest of the call's budgets that refuses it, else the plan."""
    if matched:
        refused = budgets.refusal(
            conn, matched, size.tokens, size.cost_units, at, rt.settings.timezone, rt.settings.warning_threshold
        )
        if refused is not None:
            assert refused.reason is not None
            return AiLimitExceeded(refused.reason, refused)
    _, state = quota.read_counter(conn, policy)
    reason = quota.refusal_reason(policy, state, size.tokens, size.cost_units)
    check = quota.limit_check(policy, state, warning_threshold=rt.settings.warning_threshold, reason=reason)
    fits = (policy.token_limit is None or size.tokens <= policy.token_limit) and (
        policy.cost_limit_units is None or size.cost_units <= policy.cost_limit_units
    )
    return AiLimitExceeded(reason, dataclasses.replace(check, fits_a_period=fits))


def _credits_refusal(rt: Runtime, conn: sa.Connection, policy: Policy, credit_units: int) -> CreditsInsufficient:
    _, state = quota.read_counter(conn, policy)
    check = quota.limit_check(policy, state, warning_threshold=rt.settings.warning_threshold)
    message = (
        "The credit wallet cannot pay for this call"
        f" (it may cost up to {from_units(credit_units).normalize()} {rt.settings.currency})."
    )
    return CreditsInsufficient(message, check)


def release(rt: Runtime, hold: Hold, *, status: str = "released") -> bool:
    """Return a hold whose call raised (the key is freed so a retry can run)."""
    return rt.store.run(functools.partial(release_reservation, rt, reservation_id=hold.reservation_id, status=status))


def release_reservation(
    rt: Runtime, conn: sa.Connection, reservation_id: int, status: str, now: dt.datetime | None = None
) -> bool:
    """Settle a pending reservation as ``status`` and give its quota and credits back."""
    if not quota.settle_reservation(conn, reservation_id, status, now or utcnow(), keep_key=False):
        return False
    settled = quota.held_by(conn, reservation_id)
    quota.apply_to_counter(
        rt.store, conn, settled.counter_id, release_tokens=settled.tokens, release_cost_units=settled.cost_units
    )
    budgets.apply(
        conn,
        settled.budget_counter_ids,
        release_tokens=settled.tokens,
        release_cost_units=settled.cost_units,
        release_requests=1,
    )
    if settled.wallet_id is not None and settled.credit_units:
        wallets.release(conn, settled.wallet_id, settled.credit_units)
    return True
