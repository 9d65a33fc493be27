"""The metered call: claim → reserve → call → extract → price → commit (or release).

Each phase is one short transaction of its own on the app's engine; no
transaction is held open across the provider call. :class:`Runtime` captures
the engine, settings and prices when the call starts, so a stream that finishes
in another thread or outside the app context commits with what it began with.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import logging
import typing as t

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from . import postgres
from . import quota
from . import signals
from . import wallets
from .errors import AiLimitExceeded
from .errors import CreditsInsufficient
from .errors import FeatureNotAllowed
from .errors import IdempotencyConflict
from .errors import InvalidUsage
from .group_commit import GroupCommit
from .group_hold import GroupHold
from .models import Usage as UsageRow
from .models import table
from .models import utcnow
from .money import MAX_UNITS
from .money import from_units
from .money import to_units
from .policy import Billable
from .policy import Policy
from .policy import RecentPolicies
from .policy import resolve_policy
from .policy import with_terms
from .storage import is_duplicate
from .usage import Extracted
from .usage import TokenCounts
from .usage import Usage

if t.TYPE_CHECKING:
    from flask import Flask

    from .billing import BillingDriver
    from .config import Settings
    from .pricing import PriceBook
    from .providers import Provider
    from .storage import Store

log = logging.getLogger("flask_ai_metering")
usage_table = table(UsageRow)
reservations = quota.reservations


@dataclasses.dataclass(frozen=True)
class Runtime:
    """What a metered call needs, captured when it starts."""

    app: Flask
    settings: Settings
    store: Store
    prices: PriceBook
    providers: t.Mapping[str, Provider]
    billing: BillingDriver
    #: The last policy read per billable, which names the counter PostgreSQL's
    #: one-statement reserve tries first (never trusted for a limit).
    recent: RecentPolicies
    #: Writes PostgreSQL's one-statement commits, several at once on a busy counter.
    commits: GroupCommit
    #: Holds quota for PostgreSQL's calls, several at once on a busy counter.
    holds: GroupHold

    def provider(self, name: str) -> Provider:
        try:
            return self.providers[name]
        except KeyError:
            known = ", ".join(sorted(self.providers))
            raise InvalidUsage(
                f"provider {name!r} is not registered (known: {known}); add it to AI_METERING_PROVIDERS"
            ) from None


@dataclasses.dataclass(frozen=True)
class CallSpec:
    """One call's attribution and options, validated."""

    billable: Billable
    provider: str
    model: str | None = None
    user_id: str | None = None
    tenant_id: str | None = None
    feature: str | None = None
    meta: dict[str, t.Any] | None = None
    idempotency_key: str | None = None
    max_tokens: int | None = None
    usage: TokenCounts | None = None
    billing_mode: str | None = None

    @property
    def scope(self) -> str:
        """The idempotency scope: keys are unique per billable and tenant."""
        return self.tenant_id or ""


@dataclasses.dataclass(frozen=True)
class Hold:
    """A committed reservation: quota (and credits) held for the call in flight."""

    reservation_id: int
    counter_id: int
    policy: Policy
    billing_mode: str
    tokens: int
    cost_units: int
    wallet_id: int | None
    credit_units: int


@dataclasses.dataclass(frozen=True)
class Replay:
    """A recorded idempotency key: the first call's usage, without calling again."""

    usage: Usage
    usage_id: int | None


@dataclasses.dataclass(frozen=True)
class Recorded:
    usage: Usage
    #: None when the row was queued (``AI_METERING_QUEUE_RECORDING``) and is not written yet.
    usage_id: int | None
    check: quota.LimitCheck


def reservation_size(rt: Runtime, spec: CallSpec) -> tuple[int, int]:
    """Tokens and worst-case cost (pico-units) to hold before the call.

    ``max_tokens``, else the manual usage's total, else the configured default;
    the cost is those tokens at the higher of the model's input and output price.
    With no model known before the call nothing can be priced: the cost hold is 0
    and the cost check only asks that some cost remains.
    """
    tokens = spec.max_tokens
    if tokens is None:
        tokens = spec.usage.total_tokens if spec.usage is not None else rt.settings.default_max_tokens
    price = rt.prices.max_token_price(spec.provider, spec.model) if spec.model else None
    cost = 0 if price is None else to_units_ceil(price * tokens)
    if cost > MAX_UNITS:
        raise InvalidUsage(f"max_tokens {tokens} at the price of {spec.model!r} costs more than can be held")
    return tokens, cost


def to_units_ceil(amount: t.Any) -> int:
    """Pico-units rounded up: a hold must never be smaller than the cost it covers."""
    from decimal import ROUND_CEILING

    from .money import QUANTUM

    return to_units(amount.quantize(QUANTUM, rounding=ROUND_CEILING))


def find_replay(conn: sa.Connection, billable: Billable, key: str, scope: str) -> Replay | None:
    """The usage already recorded under ``key`` for ``billable`` in tenant ``scope``, if any."""
    row = conn.execute(
        sa.select(usage_table).where(
            usage_table.c.billable_type == billable[0],
            usage_table.c.billable_id == billable[1],
            usage_table.c.idempotency_scope == scope,
            usage_table.c.idempotency_key == key,
        )
    ).first()
    return None if row is None else Replay(usage=usage_from_row(row), usage_id=int(row.id))


def usage_from_row(row: t.Any) -> Usage:
    """A ``Usage`` from a ledger row (or anything with its column names as attributes)."""
    return Usage(**{f.name: getattr(row, f.name) for f in dataclasses.fields(Usage)})


def reserve(rt: Runtime, spec: CallSpec, now: dt.datetime | None = None) -> Hold | Replay:
    """Claim the idempotency key and hold quota, atomically; raise if refused.

    On PostgreSQL the common case is one autocommitted statement that reads the
    policy and holds quota (:mod:`flask_ai_metering.postgres`), made together with
    other calls of the billable that queue behind it when they carry no idempotency
    key (:mod:`flask_ai_metering.group_hold`); a first use of a period, a refusal,
    or a credits call takes the transactional path below.
    """
    tokens, cost_units = reservation_size(rt, spec)
    enforce = rt.settings.overage_behavior == "block"
    refused: list[Exception] = []

    def replayed(conn: sa.Connection) -> Replay | None:
        key = spec.idempotency_key
        if key is None:
            return None
        return find_replay(conn, spec.billable, key, spec.scope) or claimed(conn, spec.billable, key, spec.scope)

    if postgres.usable(rt.store):
        replay = rt.store.run(replayed, autocommit=True) if spec.idempotency_key is not None else None
        if replay is not None:
            return replay
        held = grouped(rt, spec, tokens, cost_units, enforce, now or utcnow())
        if held is not None:
            return held

    def current_policy(conn: sa.Connection, at: dt.datetime) -> Policy:
        policy = resolve_policy(conn, spec.billable, at, rt.settings)
        rt.recent.remember(policy)
        if not policy.allows_feature(spec.feature):
            raise FeatureNotAllowed(spec.feature, policy.plan_slug or "")
        return policy

    def fast(conn: sa.Connection) -> Hold | Replay | None:
        at = now or utcnow()
        replay = replayed(conn)
        if replay is not None:
            return replay
        policy = current_policy(conn, at)
        mode = spec.billing_mode or policy.billing_mode
        if mode != "plan" or policy.expired:
            return None
        row = postgres.reserve_pinned(
            conn,
            policy,
            hold_request(rt, spec, tokens, cost_units, at),
            enforce=enforce,
            mode_from_plan=spec.billing_mode is None,
            feature=spec.feature,
        )
        return None if row is None else pinned_hold(row, policy, tokens, cost_units)

    def work(conn: sa.Connection) -> Hold | Replay | None:
        at = now or utcnow()
        refused.clear()
        replay = replayed(conn)
        if replay is not None:
            return replay
        policy = current_policy(conn, at)
        mode = spec.billing_mode or policy.billing_mode
        counter_id = None
        if not policy.expired:
            counter_id = quota.try_reserve(rt.store, conn, policy, tokens, cost_units, enforce=enforce)
            if counter_id is None:
                quota.ensure_counter(rt.store, conn, policy, at)
                counter_id = quota.try_reserve(rt.store, conn, policy, tokens, cost_units, enforce=enforce)
        if counter_id is None:
            _, state = quota.read_counter(conn, policy)
            reason = quota.refusal_reason(policy, state, tokens, cost_units)
            check = quota.limit_check(policy, state, warning_threshold=rt.settings.warning_threshold, reason=reason)
            refused.append(AiLimitExceeded(reason, check))
            return None
        wallet_id, credit_units = None, 0
        if mode == "credits":
            credit_units = cost_units
            wallet_id = wallets.hold(conn, spec.billable, credit_units, overdraft=rt.settings.credit_overdraft)
            if wallet_id is None:
                conn.rollback()
                _, state = quota.read_counter(conn, policy)
                check = quota.limit_check(policy, state, warning_threshold=rt.settings.warning_threshold)
                message = (
                    "The credit wallet cannot pay for this call"
                    f" (it may cost up to {from_units(credit_units).normalize()} {rt.settings.currency})."
                )
                refused.append(CreditsInsufficient(message, check))
                return None
        reservation_id = quota.add_reservation(
            conn,
            counter_id=counter_id,
            billable=spec.billable,
            tokens=tokens,
            cost_units=cost_units,
            idempotency_key=spec.idempotency_key,
            scope=spec.scope,
            expires_at=at + dt.timedelta(seconds=rt.settings.reservation_ttl),
            now=at,
            wallet_id=wallet_id,
            credit_units=credit_units,
        )
        return Hold(reservation_id, counter_id, policy, mode, tokens, cost_units, wallet_id, credit_units)

    for _ in range(3):
        try:
            outcome = rt.store.run(fast, autocommit=True) if postgres.usable(rt.store) else None
            if outcome is None:
                outcome = rt.store.run(work)
        except sa_exc.IntegrityError as error:
            # A racing call claimed the same key between our look-up and insert:
            # the unique key refused us and rolled everything back; look again.
            if spec.idempotency_key is None or not is_duplicate(error):
                raise
            continue
        if outcome is None:
            error_ = refused[0]
            signals.limit_reached.send(rt.app, billable=spec.billable, check=t.cast(t.Any, error_).check)
            raise error_
        return outcome
    raise IdempotencyConflict(f"idempotency key {spec.idempotency_key!r} is still in flight")


def hold_request(rt: Runtime, spec: CallSpec, tokens: int, cost_units: int, at: dt.datetime) -> postgres.HoldRequest:
    expires_at = at + dt.timedelta(seconds=rt.settings.reservation_ttl)
    return postgres.HoldRequest(tokens, cost_units, spec.idempotency_key, spec.scope, expires_at, at)


def grouped(rt: Runtime, spec: CallSpec, tokens: int, cost_units: int, enforce: bool, at: dt.datetime) -> Hold | None:
    """A PostgreSQL call's hold, in one statement (shared with the calls queued beside it).

    On the counter the billable's last policy read named; None when there is no
    such policy or nothing was written (the general path then reads the policy
    afresh, and explains a refusal or a key already claimed).
    """
    recent = rt.recent.get(spec.billable, at)
    if recent is None or spec.billing_mode not in (None, "plan"):
        return None
    request = hold_request(rt, spec, tokens, cost_units, at)
    row = rt.holds.hold(
        rt.store, recent, request, enforce=enforce, mode_from_plan=spec.billing_mode is None, feature=spec.feature
    )
    return None if row is None else pinned_hold(row, recent, tokens, cost_units)


def pinned_hold(row: t.Any, policy: Policy, tokens: int, cost_units: int) -> Hold:
    """The hold a one-statement reserve wrote, under the policy terms it read."""
    return Hold(row.reservation_id, row.counter_id, with_terms(policy, row), "plan", tokens, cost_units, None, 0)


def claimed(conn: sa.Connection, billable: Billable, key: str, scope: str) -> Replay | None:
    """Look at the reservation holding ``key``: in flight raises; queued replays its outbox."""
    row = conn.execute(
        sa.select(reservations.c.status, reservations.c.payload).where(
            reservations.c.billable_type == billable[0],
            reservations.c.billable_id == billable[1],
            reservations.c.idempotency_scope == scope,
            reservations.c.idempotency_key == key,
        )
    ).first()
    if row is None:
        return None
    if row.status == "pending":
        raise IdempotencyConflict(f"idempotency key {key!r} is still in flight; retry when it finishes")
    if row.payload is not None:
        from types import SimpleNamespace

        return Replay(usage=usage_from_row(SimpleNamespace(**from_payload(row.payload))), usage_id=None)
    return None


def release(rt: Runtime, hold: Hold, *, status: str = "released") -> bool:
    """Return a hold whose call raised (the key is freed so a retry can run)."""

    def work(conn: sa.Connection) -> bool:
        return release_reservation(rt, conn, hold.reservation_id, status, utcnow())

    return rt.store.run(work)


def release_reservation(rt: Runtime, conn: sa.Connection, reservation_id: int, status: str, now: dt.datetime) -> bool:
    if not quota.settle_reservation(conn, reservation_id, status, now, keep_key=False):
        return False
    settled = quota.held_by(conn, reservation_id)
    quota.apply_to_counter(
        rt.store, conn, settled.counter_id, release_tokens=settled.tokens, release_cost_units=settled.cost_units
    )
    if settled.wallet_id is not None and settled.credit_units:
        wallets.release(conn, settled.wallet_id, settled.credit_units)
    return True


def expire_reservations(rt: Runtime, *, now: dt.datetime | None = None, batch: int = 500) -> int:
    """Release every pending reservation past its expiry; safe beside live traffic."""
    total = 0
    while True:

        def work(conn: sa.Connection) -> tuple[int, int]:
            at = now or utcnow()
            ids = quota.pending_expired(conn, at, batch)
            return len(ids), sum(release_reservation(rt, conn, rid, "expired", at) for rid in ids)

        seen, released = rt.store.run(work)
        total += released
        if seen < batch:
            return total


def commit(
    rt: Runtime,
    spec: CallSpec,
    hold: Hold,
    extracted: Extracted,
    *,
    duration_ms: int | None = None,
    occurred_at: dt.datetime | None = None,
) -> Recorded:
    """Record the actual usage against the hold: the true-up, in one transaction."""
    model = extracted.model or spec.model
    tokens = extracted.tokens
    at = occurred_at or utcnow()
    costs = rt.prices.cost(spec.provider, model, tokens, at)
    cost_units = to_units(costs.total_cost)
    approaching: list[quota.LimitCheck] = []
    overages: list[dict[str, t.Any]] = []
    charged: list[tuple[int, int]] = []
    values = usage_values(
        spec, tokens, costs, model, at, estimated=extracted.estimated, hold=hold, duration_ms=duration_ms
    )

    # PostgreSQL: one autocommitted statement settles, trues up and writes (or queues) the row.
    one_statement = postgres.usable(rt.store) and hold.wallet_id is None and rt.settings.overage_behavior != "charge"

    def fast() -> tuple[int | None, quota.LimitCheck] | None:
        true_up = postgres.TrueUp(
            hold.reservation_id, hold.counter_id, at, tokens.total_tokens, cost_units, hold.tokens, hold.cost_units
        )
        usage_id: int | None = None
        if rt.settings.queue_recording:
            queued = rt.store.run(
                functools.partial(postgres.commit_queued, true_up=true_up, payload=to_payload(values)), autocommit=True
            )
            if queued is None:
                return None  # the sweeper expired the hold first: the transactional path records it
            state = queued
        else:
            usage_id, state = rt.commits.commit(rt.store, true_up, {**values, "created_at": utcnow()})
        return usage_id, quota.limit_check(hold.policy, state, warning_threshold=rt.settings.warning_threshold)

    def work(conn: sa.Connection) -> tuple[int | None, quota.LimitCheck]:
        approaching.clear()
        overages.clear()
        charged.clear()
        won = quota.settle_reservation(conn, hold.reservation_id, "committed", at, keep_key=True)
        # A commit that lost to the sweeper still records what the provider spent;
        # the sweeper already returned the hold, so only the usage is added.
        state = quota.apply_to_counter(
            rt.store,
            conn,
            hold.counter_id,
            used_tokens=tokens.total_tokens,
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
        if hold.wallet_id is not None:
            charged.append(
                wallets.settle(
                    conn,
                    hold.wallet_id,
                    hold_units=hold.credit_units if won else 0,
                    cost_units=cost_units,
                    usage_id=usage_id,
                    overdraft=rt.settings.credit_overdraft,
                    now=at,
                )
            )
        check, warned, charged_overages = counted(
            rt, conn, hold.policy, state, hold.counter_id, tokens.total_tokens, usage_id, at
        )
        approaching.extend(warned)
        overages.extend(charged_overages)
        return usage_id, check

    outcome = fast() if one_statement else None
    if outcome is not None:
        # Its own statement, after the commit: retrying it must not re-run the commit.
        usage_id, check = outcome
        if hold.policy.limited and check.approaching:
            if rt.store.run(functools.partial(quota.mark_approaching, counter_id=hold.counter_id), autocommit=True):
                approaching.append(check)
    else:
        usage_id, check = rt.store.run(work)
    if usage_id is None:  # queued: the row waits in the outbox for the publisher thread
        from .queueing import enqueue_usage

        enqueue_usage(rt, hold.reservation_id)
    usage = Usage.of(tokens, costs, provider=spec.provider, model=model, estimated=extracted.estimated)
    after_commit(rt, spec.billable, usage, usage_id, spec.feature, approaching, overages)
    for deducted, balance in charged:
        if deducted:
            signals.credits_deducted.send(
                rt.app,
                billable=spec.billable,
                amount=from_units(deducted),
                balance=from_units(balance),
                transaction_id=None,
                reason="usage",
            )
    return Recorded(usage, usage_id, check)


def counted(
    rt: Runtime,
    conn: sa.Connection,
    policy: Policy,
    state: quota.CounterState,
    counter_id: int,
    total_tokens: int,
    usage_id: int | None,
    at: dt.datetime,
) -> tuple[quota.LimitCheck, list[quota.LimitCheck], list[dict[str, t.Any]]]:
    """What usage just added to a counter sets off, in the same transaction.

    The limit check; the period's warning flag, set once (the check to announce,
    if this transaction set it); and, with ``charge``, the overage priced from
    the locked counter.
    """
    check = quota.limit_check(policy, state, warning_threshold=rt.settings.warning_threshold)
    warned = (
        [check] if policy.limited and check.approaching and quota.mark_approaching(conn, counter_id=counter_id) else []
    )
    overages: list[dict[str, t.Any]] = []
    if rt.settings.overage_behavior == "charge":
        from .billing.overages import record_overage

        overage = record_overage(conn, policy, state, total_tokens, usage_id, at, rt.settings.currency)
        if overage is not None:
            overages.append(overage)
    return check, warned, overages


def usage_values(
    spec: CallSpec,
    tokens: TokenCounts,
    costs: t.Any,
    model: str | None,
    at: dt.datetime,
    *,
    estimated: bool = False,
    hold: Hold | None = None,
    duration_ms: int | None = None,
    counter_id: int | None = None,
) -> dict[str, t.Any]:
    """The column values of one ledger row."""
    return {
        "billable_type": spec.billable[0],
        "billable_id": spec.billable[1],
        "user_id": spec.user_id,
        "tenant_id": spec.tenant_id,
        "provider": spec.provider,
        "model": model,
        "feature": spec.feature,
        "input_tokens": tokens.input_tokens,
        "output_tokens": tokens.output_tokens,
        "cached_input_tokens": tokens.cached_input_tokens,
        "cache_write_tokens": tokens.cache_write_tokens,
        "reasoning_tokens": tokens.reasoning_tokens,
        "total_tokens": tokens.total_tokens,
        "input_cost": costs.input_cost,
        "output_cost": costs.output_cost,
        "total_cost": costs.total_cost,
        "currency": costs.currency,
        "unpriced": costs.unpriced,
        "estimated": estimated,
        "billing_mode": hold.billing_mode if hold else (spec.billing_mode or "plan"),
        "idempotency_key": spec.idempotency_key,
        "idempotency_scope": spec.scope,
        "meta": spec.meta,
        "duration_ms": duration_ms,
        "counter_id": hold.counter_id if hold else counter_id,
        "reservation_id": hold.reservation_id if hold else None,
        "occurred_at": at,
    }


_MONEY_FIELDS = ("input_cost", "output_cost", "total_cost")


def to_payload(values: dict[str, t.Any]) -> dict[str, t.Any]:
    """A ledger row as JSON (money as decimal strings, times as ISO 8601), for the outbox."""
    payload = dict(values)
    for name in _MONEY_FIELDS:
        payload[name] = str(payload[name])
    payload["occurred_at"] = values["occurred_at"].isoformat()
    return payload


def from_payload(payload: dict[str, t.Any]) -> dict[str, t.Any]:
    from decimal import Decimal

    values = dict(payload)
    for name in _MONEY_FIELDS:
        values[name] = Decimal(values[name])
    values["occurred_at"] = dt.datetime.fromisoformat(values["occurred_at"])
    return values


_INSERT_USAGE = sa.insert(usage_table)


def insert_usage(conn: sa.Connection, values: dict[str, t.Any]) -> int:
    result = conn.execute(_INSERT_USAGE, {**values, "created_at": utcnow()})
    return int(result.inserted_primary_key[0])  # type: ignore[index]


def released_key(values: dict[str, t.Any]) -> dict[str, t.Any]:
    """Column values that record a row without its idempotency key, keeping the key in meta."""
    key = values.get("idempotency_key")
    if key is None:
        return {}
    return {"idempotency_key": None, "meta": {**(values.get("meta") or {}), "released_idempotency_key": key}}


def _written(conn: sa.Connection, reservation_id: int) -> bool:
    query = sa.select(usage_table.c.id).where(usage_table.c.reservation_id == reservation_id)
    return conn.execute(query).first() is not None


def write_outbox(store: Store, reservation_id: int) -> int | None:
    """Write a committed reservation's queued usage row; idempotent, safe to run twice.

    The Celery task and the ``flush`` fallback both call this. Returns the usage
    id, or None when there was nothing left to write.
    """

    def work(conn: sa.Connection) -> int | None:
        row = conn.execute(
            sa.select(reservations.c.payload).where(reservations.c.id == reservation_id).with_for_update()
        ).first()
        if row is None or row.payload is None:
            return None
        values = {**from_payload(row.payload), "created_at": utcnow()}
        if not store.insert_ignore(conn, usage_table, values) and not _written(conn, reservation_id):
            # Not a duplicate of this reservation's row: its key was taken meanwhile (the
            # sweeper freed it and a retry claimed it). Record the usage without the key.
            store.insert_ignore(conn, usage_table, {**values, **released_key(values)})
        conn.execute(sa.update(reservations).where(reservations.c.id == reservation_id).values(payload=None))
        return int(
            conn.execute(sa.select(usage_table.c.id).where(usage_table.c.reservation_id == reservation_id)).scalar_one()
        )

    return store.run(work)


def after_commit(
    rt: Runtime,
    billable: Billable,
    usage: Usage,
    usage_id: int | None,
    feature: str | None,
    approaching: list[quota.LimitCheck],
    overages: list[dict[str, t.Any]],
) -> None:
    """Signals and immediate billing, once the ledger is durable."""
    signals.usage_recorded.send(
        rt.app, billable=billable, usage=usage, usage_id=usage_id, feature=feature, replayed=False
    )
    for check in approaching:
        signals.limit_approaching.send(rt.app, billable=billable, check=check)
    for overage in overages:
        signals.overage_charged.send(rt.app, billable=billable, **overage)
    if overages and rt.settings.overage_sync_strategy == "immediate":
        rt.billing.sync_after_commit([o["overage_id"] for o in overages])


def standing(
    rt: Runtime, billable: Billable, tokens: int = 0, now: dt.datetime | None = None
) -> tuple[Policy, quota.LimitCheck]:
    """The billable's policy and :class:`~flask_ai_metering.quota.LimitCheck` now, in one read."""
    at = now or utcnow()
    with rt.store.engine.connect() as conn:
        policy = resolve_policy(conn, billable, at, rt.settings)
        _, state = quota.read_counter(conn, policy)
    check = quota.limit_check(policy, state, warning_threshold=rt.settings.warning_threshold, want_tokens=tokens)
    if rt.settings.overage_behavior != "block":
        check = dataclasses.replace(check, allowed=not policy.expired, hard_limit_reached=policy.expired)
    return policy, check


def current_check(rt: Runtime, billable: Billable, tokens: int = 0, now: dt.datetime | None = None) -> quota.LimitCheck:
    """The billable's :class:`~flask_ai_metering.quota.LimitCheck` now; reserves nothing."""
    return standing(rt, billable, tokens, now)[1]
