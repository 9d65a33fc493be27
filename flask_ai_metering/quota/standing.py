"""Where a billable stands now: its policy and limit check, read without reserving anything.

The guard decorator, ``meter.check``, replays and the dashboard read this; it
never writes, so the read-only dashboard reaches no part of the write path.

One statement in the common case: the policy query with the counter row joined
on the key the billable's last check computed. The policy (and so the limits)
is always this statement's own reading; the remembered key only says which
counter row to bring along. When the fresh policy names another counter (a new
period, a plan change), the right row is read by its key in a second statement.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import typing as t
import weakref

import sqlalchemy as sa

from ..models import utcnow
from ..prepared import Prepared
from . import engine
from .policy import POLICY_QUERY
from .policy import RecentPolicies
from .policy import policy_from_row
from .policy import policy_params

if t.TYPE_CHECKING:
    from ..runtime import Runtime
    from .policy import Billable
    from .policy import Policy

_COUNTER = sa.alias(engine.counters, "sc")
_POLICY = POLICY_QUERY.subquery("sp")

#: The policy row and, beside it, the counter the remembered key selects (NULLs when none).
_STANDING = Prepared(
    sa.select(
        _POLICY,
        _COUNTER.c.id.label("counter_id"),
        *(c.label("counter_" + c.name) for c in (_COUNTER.c[col.name] for col in engine.USED_COLUMNS)),
    ).select_from(_POLICY.outerjoin(_COUNTER, engine.key_clause(_COUNTER)))
)

#: Per engine, each billable's last policy read here: the counter key the next check joins.
_recent: weakref.WeakKeyDictionary[sa.Engine, RecentPolicies] = weakref.WeakKeyDictionary()


def standing(
    rt: Runtime, billable: Billable, tokens: int = 0, now: dt.datetime | None = None
) -> tuple[Policy, engine.LimitCheck]:
    """The billable's policy and :class:`~flask_ai_metering.quota.LimitCheck` now, in one read."""
    at = now or utcnow()
    recent = _recent.get(rt.store.engine)
    if recent is None:
        recent = _recent.setdefault(rt.store.engine, RecentPolicies())
    hint = recent.get(billable, at)
    with rt.store.reading() as conn:
        if hint is None:
            row = conn.execute(POLICY_QUERY, policy_params(billable, at, rt.settings.default_plan)).one()
            policy = policy_from_row(row, billable, at, rt.settings)
            _, state = engine.read_counter(conn, policy)
        else:
            key = engine.key_params(hint)
            (row,) = _STANDING.execute(conn, {**policy_params(billable, at, rt.settings.default_plan), **key})
            policy = policy_from_row(row, billable, at, rt.settings)
            if engine.key_params(policy) == key:
                state = (
                    engine.CounterState.of(row[-len(engine.USED_COLUMNS) :])
                    if row.counter_id is not None
                    else engine.CounterState()
                )
            else:
                _, state = engine.read_counter(conn, policy)
    recent.remember(policy)
    # The hold that may follow in the same request aims at this counter (a hint only:
    # PostgreSQL's one-statement hold re-reads the policy and re-checks every limit).
    rt.fast.remember(policy)
    check = engine.limit_check(policy, state, warning_threshold=rt.settings.warning_threshold, want_tokens=tokens)
    # Past the limits usage is recorded (``allow``/``charge``) or, in credits mode, paid from the
    # wallet (the limits are an allowance): only an expired subscription refuses here.
    if rt.settings.overage_behavior != "block" or policy.billing_mode == "credits":
        check = dataclasses.replace(check, allowed=not policy.expired, hard_limit_reached=policy.expired)
    return policy, check


def current_check(
    rt: Runtime, billable: Billable, tokens: int = 0, now: dt.datetime | None = None
) -> engine.LimitCheck:
    """The billable's :class:`~flask_ai_metering.quota.LimitCheck` now; reserves nothing."""
    return standing(rt, billable, tokens, now)[1]
