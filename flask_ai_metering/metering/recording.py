"""Recording usage that already happened: ``meter.record`` and ``meter.record_batch``.

Such usage is never refused (the tokens are spent): it is priced, added to the
counter of the period it happened in, and written to the ledger. Idempotency keys
are enforced by the ledger's unique key, so a replay records nothing.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import typing as t

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from ..billing import wallets
from ..errors import InvalidUsage
from ..models import utcnow
from ..money import to_units
from ..quota import budgets
from ..quota import engine as quota
from ..quota.policy import resolve_policy
from ..quota.standing import current_check
from ..transactions import is_duplicate
from .calls import MeterResult
from .commits import Effects
from .commits import announce
from .commits import apply_usage_effects
from .commits import low_after_charge
from .ledger import find_replay
from .ledger import insert_usage
from .ledger import replay_claim
from .ledger import usage_from_row
from .ledger import usage_table
from .ledger import usage_values
from .spec import CallSpec
from .spec import Recorded
from .usage import PricedUsage

if t.TYPE_CHECKING:
    from ..runtime import Runtime


#: How far ahead of this server's clock ``occurred_at`` may be (another server's clock skew).
_SKEW = dt.timedelta(hours=1)


def _when(occurred_at: t.Any, field: str) -> dt.datetime:
    """A validated ``occurred_at``: aware, and not in the future (recorded usage already happened)."""
    if occurred_at is None:
        return utcnow()
    if not isinstance(occurred_at, dt.datetime) or occurred_at.tzinfo is None:
        raise InvalidUsage(f"{field} must be a timezone-aware datetime, got {type(occurred_at).__name__}")
    at = occurred_at.astimezone(dt.timezone.utc)
    if at > utcnow() + _SKEW:
        raise InvalidUsage(f"{field} is in the future ({at.isoformat()}): record usage that already happened")
    return at


@dataclasses.dataclass
class _Written:
    """One row written, with what must be announced once its transaction commits."""

    spec: CallSpec
    recorded: Recorded
    effects: Effects

    def announce(self, rt: Runtime) -> MeterResult:
        item = self.recorded
        announce(rt, self.spec.billable, item.usage, item.usage_id, self.spec.feature, self.effects)
        return MeterResult(None, item.usage, item.check, usage_id=item.usage_id)


def _write(rt: Runtime, conn: sa.Connection, spec: CallSpec, at: dt.datetime) -> _Written | MeterResult:
    tokens = spec.usage
    assert tokens is not None
    if spec.idempotency_key is not None:
        # A call in flight holding the key raises IdempotencyConflict; a queued one is a replay.
        queued = replay_claim(conn, spec.billable, spec.idempotency_key, spec.scope)
        if queued is not None:
            return MeterResult(None, queued.usage, None, replayed=True, usage_id=queued.usage_id)
    costs = rt.prices.cost(spec.provider, spec.model, tokens, at)
    policy = resolve_policy(conn, spec.billable, at, rt.settings)
    spec = dataclasses.replace(spec, billing_mode=spec.billing_mode or policy.billing_mode)
    quota.ensure_counter(rt.store, conn, policy, at)
    counter_id, _ = quota.read_counter(conn, policy)
    assert counter_id is not None
    state = quota.apply_to_counter(
        rt.store, conn, counter_id, used_tokens=tokens.total_tokens, used_cost_units=to_units(costs.total_cost), calls=1
    )
    usage_id = insert_usage(conn, usage_values(spec, tokens, costs, spec.model, at, counter_id=counter_id))
    budget_ids: list[int] = []
    if policy.has_budgets:
        matched = budgets.matching(conn, spec.billable, spec.user_id, spec.feature, spec.model)
        cost_units = to_units(costs.total_cost)
        budget_ids = budgets.record(rt.store, conn, matched, tokens.total_tokens, cost_units, at, rt.settings.timezone)
    credits = spec.billing_mode == "credits"
    effects = apply_usage_effects(
        rt,
        conn,
        policy,
        state,
        counter_id,
        tokens.total_tokens,
        usage_id,
        at,
        overage=not credits,
        budget_standings=budgets.standings(conn, budget_ids),
    )
    usage = PricedUsage.of(tokens, costs, provider=spec.provider, model=spec.model)
    written = _Written(spec, Recorded(usage, usage_id, effects.check), effects)
    if credits:
        # Usage that already happened is paid from the wallet too, past the plan's allowance
        # (capped at what the wallet holds without overdraft: it cannot be refused, it has been spent).
        wallet_id = wallets.ensure_wallet(rt.store, conn, spec.billable, rt.settings.currency)
        cost_units = to_units(costs.total_cost)
        effects.charged = wallets.settle(
            conn,
            wallet_id,
            hold_units=0,
            cost_units=wallets.beyond_allowance(
                policy.token_limit,
                policy.cost_limit_units,
                state.used_tokens,
                state.used_cost_units,
                tokens.total_tokens,
                cost_units,
            ),
            usage_id=usage_id,
            overdraft=rt.settings.credit_overdraft,
            now=at,
        )
        effects.low = low_after_charge(rt, conn, wallet_id)
    return written


def record_one(rt: Runtime, spec: CallSpec, occurred_at: t.Any) -> MeterResult:
    at = _when(occurred_at, "occurred_at")
    try:
        written = rt.store.run(lambda conn: _write(rt, conn, spec, at))
    except sa_exc.IntegrityError as error:
        if spec.idempotency_key is None or not is_duplicate(error):
            raise
        with rt.store.engine.connect() as conn:
            replay = find_replay(conn, spec.billable, spec.idempotency_key, spec.scope)
        assert replay is not None, "a duplicate key that cannot be found again"
        return MeterResult(
            None, replay.usage, current_check(rt, spec.billable), replayed=True, usage_id=replay.usage_id
        )
    if isinstance(written, MeterResult):
        written.limit = current_check(rt, spec.billable)
        return written
    return written.announce(rt)


def record_many(rt: Runtime, items: list[tuple[CallSpec, t.Any]]) -> list[MeterResult]:
    """Record every row in one transaction: all of them or none.

    Every row is validated before anything is written; an error while writing
    names its row and rolls the whole batch back. Keys already in the ledger are
    replayed, not written; a key given twice in the batch is refused.
    """
    prepared = [(spec, _when(when, f"rows[{i}].occurred_at")) for i, (spec, when) in enumerate(items)]
    seen: set[tuple[str, str, str, str]] = set()
    for index, (spec, _) in enumerate(prepared):
        if spec.idempotency_key is not None:
            key = (*spec.billable, spec.scope, spec.idempotency_key)
            if key in seen:
                raise InvalidUsage(f"rows[{index}].idempotency_key {spec.idempotency_key!r} appears twice")
            seen.add(key)
    outcome = rt.store.run(functools.partial(_write_chunk, rt, prepared))
    return [item if isinstance(item, MeterResult) else item.announce(rt) for item in outcome]


def _write_chunk(
    rt: Runtime, chunk: list[tuple[CallSpec, dt.datetime]], conn: sa.Connection
) -> list[MeterResult | _Written]:
    """The batch's transaction: replay keys already recorded, write the rest."""
    existing = _existing_keys(conn, [spec for spec, _ in chunk])
    out: list[MeterResult | _Written] = []
    for index, (spec, at) in enumerate(chunk):
        key = None if spec.idempotency_key is None else (*spec.billable, spec.scope, spec.idempotency_key)
        if key in existing:
            usage, usage_id = existing[key]
            out.append(MeterResult(None, usage, None, replayed=True, usage_id=usage_id))
            continue
        try:
            out.append(_write(rt, conn, spec, at))
        except InvalidUsage as error:
            raise InvalidUsage(f"rows[{index}]: {error}") from None
        except Exception as error:
            if hasattr(error, "add_note"):  # Python 3.11+
                error.add_note(f"while recording rows[{index}]; no row of the batch was recorded")
            raise
    return out


def _existing_keys(conn: sa.Connection, specs: list[CallSpec]) -> dict[t.Any, tuple[PricedUsage, int]]:
    """Ledger rows already holding the chunk's keys, by ``(type, id, key)``."""
    keyed = [s for s in specs if s.idempotency_key is not None]
    if not keyed:
        return {}
    rows = conn.execute(
        sa.select(usage_table).where(usage_table.c.idempotency_key.in_({s.idempotency_key for s in keyed}))
    )
    wanted = {(*s.billable, s.scope, s.idempotency_key) for s in keyed}
    found = {}
    for row in rows:
        key = (row.billable_type, row.billable_id, row.idempotency_scope, row.idempotency_key)
        if key in wanted:
            found[key] = (usage_from_row(row), int(row.id))
    return found
