"""Where a billable stands now: its policy and limit check, read without reserving anything.

The guard decorator, ``meter.check``, replays and the dashboard read this; it
never writes, so the read-only dashboard reaches no part of the write path.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import typing as t

from ..models import utcnow
from . import engine
from .policy import resolve_policy

if t.TYPE_CHECKING:
    from ..runtime import Runtime
    from .policy import Billable
    from .policy import Policy


def standing(
    rt: Runtime, billable: Billable, tokens: int = 0, now: dt.datetime | None = None
) -> tuple[Policy, engine.LimitCheck]:
    """The billable's policy and :class:`~flask_ai_metering.quota.LimitCheck` now, in one read."""
    at = now or utcnow()
    with rt.store.engine.connect() as conn:
        policy = resolve_policy(conn, billable, at, rt.settings)
        _, state = engine.read_counter(conn, policy)
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
