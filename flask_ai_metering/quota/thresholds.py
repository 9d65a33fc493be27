"""Alert thresholds: each fires once per period per counter, however many calls cross it.

Usage committed to a plan's or a budget's counter is judged against its alert
percentages (``AI_METERING_ALERT_THRESHOLDS``, or the budget's own). A counter
remembers the highest one it announced (``alert_level``); raising it is a guarded
write under the counter's row lock, so of many calls crossing 80% at once exactly
one announces it. The same transaction writes the alert to the webhook outbox, so
an alert exists exactly when its crossing does.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import typing as t

import sqlalchemy as sa

from ..alerts.outbox import write_alert
from ..models import BudgetCounter
from ..models import Counter
from ..models import table
from .engine import LimitCheck
from .engine import percent

if t.TYPE_CHECKING:
    from ..config import Settings
    from .budgets import Standing
    from .engine import CounterState
    from .policy import Billable
    from .policy import Policy

KIND = "threshold_crossed"


@dataclasses.dataclass(frozen=True)
class Crossing:
    """One threshold crossed, as ``threshold_crossed`` announces it."""

    billable: Billable
    #: The budget's id, or None for the plan's counter.
    budget: int | None
    #: The plan's slug (None for a budget, or a billable without a plan).
    plan: str | None
    threshold: int
    #: The counter's committed usage, in percent of its fullest limit.
    usage: float
    event_id: str
    check: LimitCheck
    #: The alert went to the webhook outbox (a deliverer should be woken).
    queued: bool = False

    def send_kwargs(self) -> dict[str, t.Any]:
        return {
            "billable": self.billable,
            "budget": self.budget,
            "plan": self.plan,
            "threshold": self.threshold,
            "usage": self.usage,
            "event_id": self.event_id,
            "check": self.check,
        }


def due(thresholds: t.Sequence[int], usage: float, level: int) -> list[int]:
    """The thresholds ``usage`` reached that the counter has not announced (above ``level``)."""
    return [threshold for threshold in thresholds if level < threshold <= usage]


def plan_usage(policy: Policy, state: CounterState) -> float:
    """The plan counter's committed usage in percent of its fuller limit (0 when unlimited)."""
    percentages = [0.0]
    if policy.token_limit is not None:
        percentages.append(percent(state.used_tokens, policy.token_limit))
    if policy.cost_limit_units is not None:
        percentages.append(percent(state.used_cost_units, policy.cost_limit_units))
    return max(percentages)


_TABLES = {"plan": table(Counter), "budget": table(BudgetCounter)}


def raise_level(conn: sa.Connection, kind: str, counter_id: int, level: int) -> int | None:
    """Raise the counter's ``alert_level`` to ``level``; its level before, or None if it was already there.

    The row is locked first (``FOR UPDATE``; SQLite's writer lock serialises the rest), so of
    racing transactions one raises it and the others see it raised.
    """
    c = _TABLES[kind]
    old = conn.execute(sa.select(c.c.alert_level).where(c.c.id == counter_id).with_for_update()).scalar()
    if old is None or old >= level:
        return None
    conn.execute(sa.update(c).where(c.c.id == counter_id).values(alert_level=level))
    return int(old)


@dataclasses.dataclass(frozen=True)
class _Due:
    """A counter whose committed usage reached thresholds above the level it announced."""

    kind: str
    counter_id: int
    levels: tuple[int, ...]
    usage: float
    billable: Billable
    budget: int | None
    plan: str | None
    check: LimitCheck


def pending(
    settings: Settings,
    *,
    plan: tuple[Policy, int, CounterState, LimitCheck] | None = None,
    budgets: t.Sequence[tuple[Standing, LimitCheck]] = (),
) -> list[_Due]:
    """The counters with thresholds to announce, judged on the amounts a commit returned (no I/O).

    ``plan`` is the policy, counter id, new state and check of the plan's counter; ``budgets``
    the budget counters' standings and checks.
    """
    found = []
    if plan is not None:
        policy, counter_id, state, check = plan
        usage = plan_usage(policy, state)
        if policy.limited and due(settings.alert_thresholds, usage, state.alert_level):
            found.append(
                _Due(
                    "plan", counter_id, settings.alert_thresholds, usage, policy.billable, None, policy.plan_slug, check
                )
            )
    for standing, check in budgets:
        levels = standing.budget.thresholds or settings.alert_thresholds
        usage = standing.used_percentage()
        if due(levels, usage, standing.alert_level):
            budget = standing.budget
            found.append(_Due("budget", standing.counter_id, levels, usage, budget.billable, budget.id, None, check))
    return found


def cross(conn: sa.Connection, settings: Settings, at: dt.datetime, counters: t.Sequence[_Due]) -> list[Crossing]:
    """Announce, in this transaction, the thresholds of :func:`pending` counters not announced yet.

    Each counter's level is raised under its row lock, so only the thresholds above the level
    it had then are announced (another commit may have announced some meanwhile). Writes the
    alerts to the outbox.
    """
    crossings = []
    for counter in counters:
        highest = due(counter.levels, counter.usage, 0)[-1]  # what the usage reached, not every level
        old = raise_level(conn, counter.kind, counter.counter_id, highest)
        for threshold in [] if old is None else due(counter.levels, counter.usage, old):
            event_id = f"{counter.kind}-{counter.counter_id}-{threshold}"
            crossings.append(
                Crossing(
                    counter.billable, counter.budget, counter.plan, threshold, counter.usage, event_id, counter.check
                )
            )
    return [_queued(conn, settings, crossing, at) for crossing in crossings]


def _queued(conn: sa.Connection, settings: Settings, crossing: Crossing, at: dt.datetime) -> Crossing:
    """Put the crossing in the webhook outbox (when a webhook is configured)."""
    check = crossing.check
    data = {
        "billable": {"type": crossing.billable[0], "id": crossing.billable[1]},
        "budget": None
        if crossing.budget is None
        else {"id": crossing.budget, "scope": check.budget_scope, "period": check.budget_period},
        "plan": crossing.plan,
        "threshold": crossing.threshold,
        "usage_percentage": crossing.usage,
        "period_start": check.period_start.isoformat(),
        "resets_at": check.period_end.isoformat(),
        "token_limit": check.token_limit,
        "cost_limit": None if check.cost_limit is None else str(check.cost_limit),
        "request_limit": check.request_limit,
        "used_tokens": check.used_tokens,
        "used_cost": str(check.used_cost),
        "used_requests": check.used_requests if check.request_limit is not None else None,
    }
    queued = write_alert(
        conn, settings, event_id=crossing.event_id, kind=KIND, billable=crossing.billable, data=data, now=at
    )
    return dataclasses.replace(crossing, queued=queued)
