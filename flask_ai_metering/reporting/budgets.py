"""Where budgets stand, read for people: the dashboard, ``flask ai-metering budgets`` and ``report``.

The quota engine (:mod:`flask_ai_metering.quota.budgets`) holds and settles budget
counters; this module only reads them. Every reader here costs one query however
many budgets there are: a page or a command that lists a team with a budget per
member must not run a query per member. Figures come from the engine's own
:class:`~flask_ai_metering.quota.budgets.Standing` and its :meth:`check`, so what is
shown is exactly what the next call is judged against.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import typing as t
from decimal import Decimal

import sqlalchemy as sa

from ..models import utcnow
from ..money import from_units
from ..quota.budgets import COUNTER_COLUMNS
from ..quota.budgets import PERIODS
from ..quota.budgets import Standing
from ..quota.budgets import Terms
from ..quota.budgets import budget_counters
from ..quota.budgets import budgets
from ..quota.budgets import period_of
from ..quota.budgets import standing_of
from ..quota.engine import percent

if t.TYPE_CHECKING:
    from ..quota.engine import LimitCheck
    from ..runtime import Runtime

Billable = tuple[str, str]

#: Budgets the overview's near-limit list reads at most (it shows the fullest of them).
MAX_NEAR_LIMIT = 200
#: The dimensions a budget can limit, in the order they are shown.
DIMENSIONS = ("tokens", "cost", "requests")


@dataclasses.dataclass(frozen=True)
class Dimension:
    """One limited dimension of a budget this period: used, held by calls in flight, and the limit.

    Cost is in pico-units, like the counters; :attr:`is_money` tells a renderer to show it as money.
    """

    name: str
    used: int
    reserved: int
    limit: int

    @property
    def is_money(self) -> bool:
        return self.name == "cost"

    @property
    def used_percentage(self) -> float:
        """The committed share of the limit (capped at 100): the solid part of a burn-down bar."""
        return percent(self.used, self.limit)

    @property
    def reserved_percentage(self) -> float:
        """The share held by calls in flight, on top of :attr:`used_percentage` (the two stay within 100)."""
        return round(min(100.0, percent(self.used + self.reserved, self.limit)) - self.used_percentage, 2)

    @property
    def percentage(self) -> float:
        """Used plus reserved, as a share of the limit (what a limit check counts as spent)."""
        return percent(self.used + self.reserved, self.limit)

    def amount(self, units: int) -> int | Decimal:
        """``units`` as shown: pico-units as a ``Decimal`` amount for cost, the count otherwise."""
        return from_units(units) if self.is_money else units


@dataclasses.dataclass(frozen=True)
class BudgetUsage:
    """A live budget in its current period: its terms, counter and the engine's check of it."""

    standing: Standing
    check: LimitCheck
    mode: str
    created_at: dt.datetime

    @property
    def budget(self) -> Terms:
        return self.standing.budget

    @property
    def id(self) -> int:
        return self.budget.id

    @property
    def billable(self) -> Billable:
        return self.budget.billable

    @property
    def scope(self) -> str:
        return self.budget.scope

    @property
    def period(self) -> str:
        return self.budget.period

    @property
    def resets_at(self) -> dt.datetime:
        return self.standing.period_end

    @property
    def usage_percentage(self) -> float:
        return self.check.usage_percentage

    def dimensions(self) -> list[Dimension]:
        """The dimensions this budget limits (a budget needs at least one), tokens first."""
        s, b = self.standing, self.budget
        candidates = (
            ("tokens", s.used_tokens, s.reserved_tokens, b.token_limit),
            ("cost", s.used_cost_units, s.reserved_cost_units, b.cost_limit_units),
            ("requests", s.used_requests, s.reserved_requests, b.request_limit),
        )
        return [Dimension(name, used, held, limit) for name, used, held, limit in candidates if limit is not None]

    def as_dict(self) -> dict[str, t.Any]:
        """The JSON shape of ``flask ai-metering budgets --format json`` (money as decimal strings)."""
        s, b = self.standing, self.budget
        return {
            "id": b.id,
            "billable": f"{b.billable[0]}:{b.billable[1]}",
            "user_id": b.user_id,
            "feature": b.feature,
            "model": b.model,
            "scope": b.scope,
            "period": b.period,
            "mode": self.mode,
            "period_start": s.period_start.isoformat(),
            "resets_at": s.period_end.isoformat(),
            "limits": {
                "tokens": b.token_limit,
                "cost": None if b.cost_limit_units is None else _money(b.cost_limit_units),
                "requests": b.request_limit,
            },
            "used": {"tokens": s.used_tokens, "cost": _money(s.used_cost_units), "requests": s.used_requests},
            "reserved": {
                "tokens": s.reserved_tokens,
                "cost": _money(s.reserved_cost_units),
                "requests": s.reserved_requests,
            },
            "usage_percentage": self.check.usage_percentage,
            "allowed": self.check.allowed,
            "created_at": self.created_at.isoformat(),
        }


def _money(units: int) -> str:
    return format(from_units(units), "f")


def _counter_column(name: str) -> sa.ColumnElement[t.Any]:
    return budget_counters.c[name].label(f"counter_{name}")


def _current_join(at: dt.datetime) -> sa.ColumnElement[bool]:
    """The counter of each budget's period that contains ``at`` (periods never overlap: one at most)."""
    when = sa.literal(at, budget_counters.c.period_start.type)
    return sa.and_(
        budget_counters.c.budget_id == budgets.c.id,
        budget_counters.c.period_start <= when,
        budget_counters.c.period_end > when,
    )


def _select_current(at: dt.datetime) -> sa.Select[t.Any]:
    return sa.select(budgets, *(_counter_column(name) for name in COUNTER_COLUMNS)).select_from(
        budgets.outerjoin(budget_counters, _current_join(at))
    )


def _usage(row: t.Any, at: dt.datetime, timezone: str, warning_threshold: int) -> BudgetUsage:
    terms = Terms.of(row)
    if row.counter_id is None:  # no call in this period yet: the period's zeros
        period = period_of(terms.period, at, timezone)
        standing = Standing(0, terms, period.start, period.end, 0, 0, 0, 0, 0, 0, 0)
    else:
        standing = standing_of([getattr(row, f"counter_{name}") for name in COUNTER_COLUMNS], terms)
    created = row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=dt.timezone.utc)
    return BudgetUsage(
        standing=standing,
        check=standing.check(warning_threshold=warning_threshold),
        mode=row.mode,
        created_at=created,
    )


def current_usage(
    conn: sa.Connection,
    billable: Billable | None = None,
    *,
    timezone: str,
    warning_threshold: int,
    at: dt.datetime | None = None,
) -> list[BudgetUsage]:
    """The live budgets of ``billable`` (of all billables with None) in their current periods.

    One query: each budget with the counter of its period containing ``at``; a
    budget no call has touched this period reads as zeros. Ordered by billable, then
    by how many of user, feature and model the budget sets (the team's own budgets
    above its members'), then oldest first.
    """
    when = at or utcnow()
    query = _select_current(when).where(budgets.c.removed_at.is_(None))
    if billable is not None:
        query = query.where(budgets.c.billable_type == billable[0], budgets.c.billable_id == billable[1])
    rows = [_usage(row, when, timezone, warning_threshold) for row in conn.execute(query.order_by(budgets.c.id))]
    rows.sort(key=lambda u: (u.billable, len(u.budget.scope_items()), u.id))
    return rows


def near_limit(
    conn: sa.Connection, *, timezone: str, warning_threshold: int, at: dt.datetime | None = None
) -> list[BudgetUsage]:
    """Live budgets at or above ``warning_threshold`` percent in their current period, fullest first.

    The database picks them (a counter whose used + reserved reaches the threshold in
    any limited dimension), so a deployment with a budget per member reads only the
    few that are full, at most :data:`MAX_NEAR_LIMIT`.
    """
    when = at or utcnow()
    c = budget_counters.c

    def reached(used: str, reserved: str, limit: str) -> sa.ColumnElement[bool]:
        # Numeric: a cost limit in pico-units times 100 would overflow a BIGINT.
        held = sa.cast(c[used] + c[reserved], sa.Numeric(38, 0)) * 100
        return sa.and_(c[limit].is_not(None), held >= sa.cast(c[limit], sa.Numeric(38, 0)) * warning_threshold)

    query = (
        sa.select(budgets, *(_counter_column(name) for name in COUNTER_COLUMNS))
        .select_from(budgets.join(budget_counters, _current_join(when)))
        .where(
            budgets.c.removed_at.is_(None),
            sa.or_(
                reached("used_tokens", "reserved_tokens", "token_limit"),
                reached("used_cost_units", "reserved_cost_units", "cost_limit_units"),
                reached("used_requests", "reserved_requests", "request_limit"),
            ),
        )
        .order_by(budgets.c.id)
        .limit(MAX_NEAR_LIMIT)
    )
    rows = [_usage(row, when, timezone, warning_threshold) for row in conn.execute(query)]
    rows.sort(key=lambda u: (-u.usage_percentage, u.resets_at, u.id))
    return rows


def budget_usage(rt: Runtime, billable: Billable | None = None, *, at: dt.datetime | None = None) -> list[BudgetUsage]:
    """:func:`current_usage` on a connection of the runtime's engine, with its settings."""
    with rt.store.reading() as conn:
        return current_usage(
            conn,
            billable,
            timezone=rt.settings.timezone,
            warning_threshold=rt.settings.warning_threshold,
            at=at,
        )


# -- ``flask ai-metering budgets`` -------------------------------------------------------------


def _limit_cell(usage: BudgetUsage, name: str) -> str:
    for dim in usage.dimensions():
        if dim.name == name:
            used = _amount(dim.amount(dim.used))
            limit = _amount(dim.amount(dim.limit))
            held = f" (+{_amount(dim.amount(dim.reserved))} held)" if dim.reserved else ""
            return f"{used}{held} / {limit} ({dim.percentage:.0f}%)"
    return "-"


def _amount(value: int | Decimal) -> str:
    if isinstance(value, Decimal):
        text = format(value.normalize(), "f")
        whole, _, fraction = text.partition(".")
        return f"{whole}.{fraction.ljust(2, '0')}"
    return f"{value:,}"


def budgets_table(rows: t.Sequence[BudgetUsage], local_time: t.Callable[[dt.datetime], str]) -> str:
    """The budgets as an aligned text table: one line each, usage as ``used / limit (percent)``."""
    if not rows:
        return "No budgets."
    header = ["id", "scope", "period", "mode", "tokens", "cost", "requests", "resets at"]
    body = [
        [
            str(u.id),
            u.scope,
            u.period,
            u.mode,
            *(_limit_cell(u, name) for name in DIMENSIONS),
            local_time(u.resets_at),
        ]
        for u in rows
    ]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *body])


# -- ``report --budgets`` ----------------------------------------------------------------------


def report_section(
    conn: sa.Connection, begin: dt.datetime, end: dt.datetime, billable: Billable | None = None
) -> list[dict[str, t.Any]]:
    """Each budget's usage over its periods that overlap ``[begin, end)``, from its counters.

    One row per budget (removed ones too: their counters are the record), summing
    the counters of the periods overlapping the window; a week or year period that
    straddles it counts whole. ``peak_percentage`` is the fullest single period
    (used, against that period's limits), and ``periods_at_limit`` how many reached
    100% in some dimension: limits are per period, so the sums are not judged
    against them.
    """
    c = budget_counters.c
    query = (
        sa.select(
            budgets,
            c.period_start.label("counter_start"),
            c.used_tokens.label("counter_tokens"),
            c.used_cost_units.label("counter_cost"),
            c.used_requests.label("counter_requests"),
            c.token_limit.label("counter_token_limit"),
            c.cost_limit_units.label("counter_cost_limit"),
            c.request_limit.label("counter_request_limit"),
        )
        .select_from(budgets.join(budget_counters, c.budget_id == budgets.c.id))
        .where(
            c.period_start < sa.literal(end, c.period_start.type), c.period_end > sa.literal(begin, c.period_end.type)
        )
        .order_by(budgets.c.id, c.period_start)
    )
    if billable is not None:
        query = query.where(budgets.c.billable_type == billable[0], budgets.c.billable_id == billable[1])
    out: dict[int, dict[str, t.Any]] = {}
    for row in conn.execute(query):
        entry = out.get(row.id)
        if entry is None:
            terms = Terms.of(row)
            entry = out[row.id] = {
                "budget_id": terms.id,
                "billable": f"{terms.billable[0]}:{terms.billable[1]}",
                "billable_type": terms.billable[0],
                "billable_id": terms.billable[1],
                "user_id": terms.user_id,
                "feature": terms.feature,
                "model": terms.model,
                "scope": terms.scope,
                "period": terms.period,
                "mode": row.mode,
                "removed": row.removed_at is not None,
                "token_limit": terms.token_limit,
                "cost_limit": None if terms.cost_limit_units is None else _money(terms.cost_limit_units),
                "request_limit": terms.request_limit,
                "periods": 0,
                "periods_at_limit": 0,
                "total_tokens": 0,
                "total_cost": 0,
                "requests": 0,
                "peak_percentage": 0.0,
            }
        used = (
            (int(row.counter_tokens), row.counter_token_limit),
            (int(row.counter_cost), row.counter_cost_limit),
            (int(row.counter_requests), row.counter_request_limit),
        )
        shares = [percent(part, int(whole)) for part, whole in used if whole is not None]
        entry["periods"] += 1
        entry["periods_at_limit"] += any(share >= 100 for share in shares)
        entry["total_tokens"] += used[0][0]
        entry["total_cost"] += used[1][0]
        entry["requests"] += used[2][0]
        entry["peak_percentage"] = max(entry["peak_percentage"], *shares, 0.0)
    rows = list(out.values())
    for entry in rows:
        entry["total_cost"] = _money(entry["total_cost"])
    rows.sort(key=lambda e: (e["billable"], PERIODS.index(e["period"]), e["scope"], e["budget_id"]))
    return rows


#: ``report --budgets --format csv``: the columns appended after the report's own.
CSV_COLUMNS = (
    "budget_id",
    "scope",
    "period",
    "mode",
    "user_id",
    "periods",
    "periods_at_limit",
    "requests",
    "token_limit",
    "cost_limit",
    "request_limit",
    "peak_percentage",
)


def table_lines(rows: t.Sequence[dict[str, t.Any]]) -> list[str]:
    """The report's "By budget" section as text lines (usage summed over the month's periods)."""
    lines = ["", "By budget (summed over each budget's periods in the month; limits are per period)"]
    if not rows:
        return [*lines, "  (no budget counted anything)"]
    header = ["budget", "scope", "period", "periods", "tokens", "cost", "requests", "limits", "peak", "at limit"]
    body = []
    for e in rows:
        limits = []
        if e["token_limit"] is not None:
            limits.append(f"{e['token_limit']:,} tokens")
        if e["cost_limit"] is not None:
            limits.append(_amount(Decimal(e["cost_limit"])))
        if e["request_limit"] is not None:
            limits.append(f"{e['request_limit']:,} requests")
        body.append(
            [
                f"{e['budget_id']}{' (removed)' if e['removed'] else ''}",
                e["scope"],
                e["period"],
                str(e["periods"]),
                f"{e['total_tokens']:,}",
                _amount(Decimal(e["total_cost"])),
                f"{e['requests']:,}",
                ", ".join(limits),
                f"{e['peak_percentage']:.0f}%",
                str(e["periods_at_limit"]),
            ]
        )
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    return lines + [
        "  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *body]
    ]
