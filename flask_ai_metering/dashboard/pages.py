"""What each dashboard page shows, gathered from the queries into plain objects.

Views call one function here and render; nothing in a template adds money up.
Limit figures come from the quota engine itself (``current_check``), so the
dashboard shows exactly what the next ``@quota_required`` check would see.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import typing as t
from decimal import Decimal

import sqlalchemy as sa

from ..models import Counter
from ..models import CreditTransaction
from ..models import CreditWallet
from ..models import Overage
from ..models import Plan
from ..models import Reservation
from ..models import Subscription
from ..models import UsageLimitOverride
from ..models import utcnow
from ..money import from_units
from ..quota.standing import current_check
from ..reporting import budgets as budget_usage
from ..reporting import queries
from ..reporting.filters import Filters
from ..reporting.queries import Totals
from ..reporting.rollups import last_run
from . import outlook

if t.TYPE_CHECKING:
    from ..quota.engine import LimitCheck
    from ..runtime import Runtime

#: Rows a breakdown table lists before folding the rest into "Other".
TOP_N = 10
#: Series the cost-over-time chart stacks before folding the rest into "Other".
CHART_SERIES = 8
#: Unpriced (provider, model) pairs the overview's banner names; it counts the rest.
UNPRICED_SHOWN = 20
#: Billables whose limits are checked for the "near or over their limits" panel.
MAX_LIMIT_CANDIDATES = 50
#: Billables the overview ranks.
TOP_BILLABLES = 10
#: The groupings a summary can rank.
GROUPS = ("provider", "model", "feature")
#: What the overview ranks: the groupings and the tenants.
OVERVIEW_BREAKDOWNS = (*GROUPS, "tenant_id")


@dataclasses.dataclass
class Ranking:
    """The costliest groups of a range (then by calls, name), as SQL ranked them, and the range's totals.

    ``top`` holds at most ``TOP_N + 1`` groups: enough to tell whether a table of
    ``limit <= TOP_N`` rows needs an "Other" row, whose sum is ``total`` less the rows shown.
    """

    top: list[tuple[str, Totals]] = dataclasses.field(default_factory=list)
    total: Totals = dataclasses.field(default_factory=Totals)

    def shown(self, limit: int = TOP_N) -> list[tuple[str, Totals]]:
        """The groups listed by name: all of them when they fit in ``limit`` rows, else ``limit - 1``."""
        return self.top if len(self.top) <= limit else self.top[: limit - 1]

    def rest(self, limit: int = TOP_N) -> Totals | None:
        """The "Other" row under :meth:`shown`, or None when every group is shown."""
        if len(self.top) <= limit:
            return None
        out = self.total
        for _, totals in self.shown(limit):
            out = out.minus(totals)
        return out


@dataclasses.dataclass
class Summary:
    """Aggregates of one range, each bounded by what a page shows (never one row per model)."""

    totals: Totals = dataclasses.field(default_factory=Totals)
    by_day: dict[dt.date, Totals] = dataclasses.field(default_factory=dict)
    by_provider: Ranking = dataclasses.field(default_factory=Ranking)
    by_model: Ranking = dataclasses.field(default_factory=Ranking)
    by_feature: Ranking = dataclasses.field(default_factory=Ranking)
    #: Filled when ``breakdowns`` lists ``tenant_id`` (the overview's "By tenant").
    by_tenant_id: Ranking = dataclasses.field(default_factory=Ranking)
    #: Cost units per day of each group the cost chart names (``Ranking.shown(CHART_SERIES)``).
    by_day_group: dict[tuple[dt.date, str], int] = dataclasses.field(default_factory=dict)
    #: The most-called unpriced (provider, model) pairs, and how many pairs there are in all.
    unpriced: list[tuple[tuple[str, str], int]] = dataclasses.field(default_factory=list)
    unpriced_pairs: int = 0
    #: The costliest billables (``summarize(billables=N)``): ``{"billable": (type, id), "totals": Totals}``.
    top_billables: list[dict[str, t.Any]] = dataclasses.field(default_factory=list)
    #: The pairs with the most cached tokens (``summarize(cached=N)``), when the PostgreSQL pass read
    #: them; None: not read (:func:`~flask_ai_metering.dashboard.outlook.cache_savings` reads them).
    cached_pairs: list[tuple[tuple[str, str], int]] | None = None
    #: The top billables' sums per local day, when the PostgreSQL pass read them (their
    #: forecasts reuse them); empty otherwise.
    billable_days: dict[tuple[str, str], dict[dt.date, Totals]] = dataclasses.field(default_factory=dict)

    @property
    def cost(self) -> Decimal:
        return from_units(self.totals.cost_units)

    @property
    def unpriced_more(self) -> int:
        """Unpriced pairs the banner does not name."""
        return max(self.unpriced_pairs - len(self.unpriced), 0)

    def ranking(self, group: str) -> Ranking:
        return t.cast(Ranking, getattr(self, f"by_{group}"))


def summarize(
    conn: sa.Connection,
    f: Filters,
    *,
    use_rollups: bool,
    group: str = "model",
    breakdowns: t.Sequence[str] = GROUPS,
    with_unpriced: bool = True,
    billables: int = 0,
    cached: int = 0,
) -> Summary:
    """``f``'s range aggregated in SQL: totals, days, the top groups of each breakdown,
    the daily cost of the top ``group`` series, the unpriced models, and (``billables``)
    the costliest billables.

    Every query is grouped and limited in the database; the rows read grow with the
    days in range and ``TOP_N``, not with the number of models, features or billables.
    The totals are the days' sum (every row falls on exactly one day). On PostgreSQL,
    when the ledger answers, days, rankings, ``group``'s daily cost, billables and unpriced
    pairs come from a few parallel scans (:func:`~flask_ai_metering.reporting.queries.grouped`),
    and so do the ``cached`` pairs with the most cached tokens; elsewhere each has its own
    query (the pairs are left to :func:`~flask_ai_metering.dashboard.outlook.cache_savings`).
    """
    queries.tune_for_aggregates(conn)
    out = Summary()
    keys = list(dict.fromkeys((*breakdowns, group)))
    by_day_group: dict[tuple[dt.date, str], int] | None = None
    if queries.one_pass(conn, f, use_rollups=use_rollups):
        one = queries.grouped(
            conn,
            f,
            keys=keys,
            limit=TOP_N + 1,
            group=group,
            billables=billables,
            unpriced_limit=UNPRICED_SHOWN if with_unpriced else 0,
            cached_limit=cached,
        )
        out.by_day = one.by_day
        out.totals = Totals.sum(out.by_day.values())
        for name in keys:
            setattr(out, f"by_{name}", Ranking(one.rankings[name], out.totals))
        out.top_billables = one.billables
        if with_unpriced:
            out.unpriced, out.unpriced_pairs = one.unpriced, one.unpriced_pairs
        if cached:
            out.cached_pairs = one.cached
        by_day_group = one.by_day_group
        out.billable_days = one.billable_days
    else:
        out.by_day = {day: totals for (day, _), totals in queries.daily(conn, f, use_rollups=use_rollups).items()}
        out.totals = Totals.sum(out.by_day.values())
        for name in keys:
            top = queries.ranking(conn, f, name, use_rollups=use_rollups, limit=TOP_N + 1)
            setattr(out, f"by_{name}", Ranking(top, out.totals))
        if billables:
            out.top_billables = queries.top_billables(conn, f, use_rollups=use_rollups, limit=billables)
        if with_unpriced:
            out.unpriced, out.unpriced_pairs = queries.unpriced(conn, f, use_rollups=use_rollups, limit=UNPRICED_SHOWN)
    names = [name for name, _ in out.ranking(group).shown(CHART_SERIES)]
    if by_day_group is not None:
        charted = set(names)
        out.by_day_group = {key: units for key, units in by_day_group.items() if key[1] in charted}
    elif names:
        cells = queries.daily(conn, f, use_rollups=use_rollups, key=group, names=names)
        out.by_day_group = {key: totals.cost_units for key, totals in cells.items()}
    return out


def ranked(groups: Ranking | dict[str, Totals], limit: int = TOP_N) -> list[tuple[str, Totals]]:
    """Groups by cost (then calls, name), the tail folded into one "Other" row."""
    if isinstance(groups, dict):
        groups = Ranking(sorted(groups.items(), key=lambda kv: (-kv[1].cost_units, -kv[1].calls, kv[0])))
        for _, totals in groups.top:
            groups.total.add(totals)
    rest = groups.rest(limit)
    return [*groups.shown(limit), *([("Other", rest)] if rest is not None else [])]


def change(current: int, previous: int) -> float | None:
    """Percent change against the previous window (None when there was nothing before)."""
    if previous == 0:
        return None
    return round((current - previous) * 100 / previous, 1)


@dataclasses.dataclass
class Overview:
    filters: Filters
    current: Summary
    #: Only its ``totals`` are filled: the page shows the change against them.
    previous: Summary
    top: list[dict[str, t.Any]]
    near_limits: list[tuple[tuple[str, str], LimitCheck]]
    rollups_as_of: dt.datetime | None
    use_rollups: bool
    #: The calendar month of the filtered slice, projected to its end.
    forecast: outlook.Forecast | None = None
    #: Each listed billable's current period projected to its end (top and near-limit ones).
    forecasts: dict[tuple[str, str], outlook.Forecast] = dataclasses.field(default_factory=dict)
    health: outlook.Health = dataclasses.field(default_factory=outlook.Health)
    savings: outlook.Savings = dataclasses.field(default_factory=outlook.Savings)
    by_tenant: Ranking = dataclasses.field(default_factory=Ranking)
    #: Only with a billable or tenant filter (the ledger's own indexes narrow it; no rollup has users).
    by_user: Ranking | None = None
    #: Budgets at or past the warning threshold this period, fullest first (one query for all).
    near_budgets: list[budget_usage.BudgetUsage] = dataclasses.field(default_factory=list)


def overview(rt: Runtime, f: Filters, group: str = "model") -> Overview:
    """Everything the overview shows, in a few grouped, limited queries plus a few limit checks."""
    use_rollups = rt.settings.aggregation_tables
    with rt.store.engine.connect() as conn:
        current = summarize(
            conn,
            f,
            use_rollups=use_rollups,
            group=group,
            breakdowns=OVERVIEW_BREAKDOWNS,
            billables=TOP_BILLABLES,
            cached=outlook.SAVINGS_MODELS,
        )
        # The previous window shows only its totals: one row per source, not a breakdown.
        previous = Summary(totals=queries.totals(conn, f.previous(), use_rollups=use_rollups))
        top = current.top_billables
        as_of = last_run(conn, rt.settings.timezone) if use_rollups else None
        candidates = _limit_candidates(conn)
        by_user = by_user_ranking(conn, f, current.totals)
        health = outlook.health(conn, f, current.by_model.shown(outlook.HEALTH_MODELS), use_rollups=use_rollups)
        savings = outlook.cache_savings(
            rt,
            conn,
            f,
            use_rollups=use_rollups,
            cached_tokens=current.totals.cached_input_tokens,
            pairs=current.cached_pairs,
        )
        forecast = outlook.overall_forecast(conn, f, use_rollups=use_rollups, known=current.by_day)
        for entry in top:
            entry["check"] = current_check(rt, entry["billable"])
        near = near_limits(rt, candidates)
        near_budgets = budget_usage.near_limit(
            conn, timezone=rt.settings.timezone, warning_threshold=rt.settings.warning_threshold
        )
        # The top billables' days are their whole usage unless a filter narrows the range's rows.
        whole = not any((f.provider, f.model, f.feature, f.tenant, f.billable))
        forecasts = outlook.billable_forecasts(
            conn,
            [*((e["billable"], e["check"]) for e in top), *near],
            zone=f.zone,
            use_rollups=use_rollups,
            known=current.billable_days if whole else None,
            known_days=(f.start, f.end),
        )
    return Overview(
        filters=f,
        current=current,
        previous=previous,
        top=top,
        near_limits=near,
        rollups_as_of=as_of,
        use_rollups=use_rollups,
        forecast=forecast,
        forecasts=forecasts,
        health=health,
        savings=savings,
        by_tenant=current.by_tenant_id,
        by_user=by_user,
        near_budgets=near_budgets,
    )


def by_user_ranking(conn: sa.Connection, f: Filters, total: Totals) -> Ranking | None:
    """Spend by user, when a billable or tenant narrows the range (else None: users are not rolled up)."""
    if f.billable is None and f.tenant is None:
        return None
    return Ranking(queries.ranking(conn, f, "user_id", use_rollups=False, limit=TOP_N + 1), total)


def _limit_candidates(conn: sa.Connection) -> list[tuple[str, str]]:
    """Billables with a running period and a limit (a plan's or an override's), fullest first."""
    counters, subs, plans = Counter.__table__, Subscription.__table__, Plan.__table__
    overrides = UsageLimitOverride.__table__
    now = utcnow()
    limited = sa.or_(
        plans.c.token_limit.is_not(None),
        plans.c.cost_limit.is_not(None),
        sa.exists().where(
            overrides.c.billable_type == counters.c.billable_type,
            overrides.c.billable_id == counters.c.billable_id,
            overrides.c.period_end > now,
        ),
    )
    rows = conn.execute(
        sa.select(counters.c.billable_type, counters.c.billable_id)
        .select_from(
            counters.outerjoin(
                subs,
                sa.and_(subs.c.billable_type == counters.c.billable_type, subs.c.billable_id == counters.c.billable_id),
            ).outerjoin(plans, plans.c.id == subs.c.plan_id)
        )
        .where(counters.c.period_start <= now, counters.c.period_end > now, limited)
        .order_by((counters.c.used_tokens + counters.c.reserved_tokens).desc())
        .limit(MAX_LIMIT_CANDIDATES)
    )
    seen: dict[tuple[str, str], None] = {}
    for row in rows:
        seen[(row.billable_type, row.billable_id)] = None
    return list(seen)


def near_limits(rt: Runtime, billables: list[tuple[str, str]]) -> list[tuple[tuple[str, str], LimitCheck]]:
    """The billables at or past the warning threshold, fullest first, as the quota engine sees them."""
    out = []
    for billable in billables:
        check = current_check(rt, billable)
        if check.approaching or check.hard_limit_reached:
            out.append((billable, check))
    out.sort(key=lambda item: -item[1].usage_percentage)
    return out


def plans(rt: Runtime, now: dt.datetime | None = None) -> list[dict[str, t.Any]]:
    """Every plan with its number of subscribers, and how many of them are in a trial."""
    p, s = Plan.__table__, Subscription.__table__
    count = sa.func.count(s.c.id)
    at = sa.literal(now or utcnow(), s.c.trial_ends_at.type)
    in_trial = sa.func.coalesce(sa.func.sum(sa.case((s.c.trial_ends_at > at, 1), else_=0)), 0)
    with rt.store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(p, count.label("subscribers"), in_trial.label("in_trial"))
            .select_from(p.outerjoin(s, s.c.plan_id == p.c.id))
            .group_by(*p.c)
            .order_by(p.c.is_active.desc(), p.c.name)
        )
        return [dict(row._mapping) for row in rows]


@dataclasses.dataclass
class BillablePage:
    billable: tuple[str, str]
    subscription: dict[str, t.Any] | None
    check: LimitCheck
    wallet: dict[str, t.Any] | None
    transactions: list[dict[str, t.Any]]
    overages: list[dict[str, t.Any]]
    reservations: list[dict[str, t.Any]]
    summary: Summary
    recent: list[t.Any]
    forecast: outlook.Forecast | None = None
    by_user: Ranking | None = None
    #: The live budgets in their current periods, the billable's own first (one query for all).
    budgets: list[budget_usage.BudgetUsage] = dataclasses.field(default_factory=list)


def billable_page(rt: Runtime, billable: tuple[str, str], f: Filters) -> BillablePage:
    """One billable: plan, limits, budgets, wallet, overages, calls in flight, and its usage in ``f``."""
    subs, plans_t = Subscription.__table__, Plan.__table__
    wallets, txns = CreditWallet.__table__, CreditTransaction.__table__
    overages, res = Overage.__table__, Reservation.__table__
    mine = dataclasses.replace(f, billable=billable)
    now = utcnow()
    with rt.store.engine.connect() as conn:
        sub = conn.execute(
            sa.select(subs, plans_t.c.name.label("plan_name"), plans_t.c.slug.label("plan_slug"))
            .join(plans_t, plans_t.c.id == subs.c.plan_id)
            .where(subs.c.billable_type == billable[0], subs.c.billable_id == billable[1])
        ).first()
        wallet = conn.execute(
            sa.select(wallets).where(wallets.c.billable_type == billable[0], wallets.c.billable_id == billable[1])
        ).first()
        history = []
        if wallet is not None:
            history = [
                dict(r._mapping)
                for r in conn.execute(
                    sa.select(txns).where(txns.c.wallet_id == wallet.id).order_by(txns.c.id.desc()).limit(20)
                )
            ]
        over = [
            dict(r._mapping)
            for r in conn.execute(
                sa.select(overages)
                .where(overages.c.billable_type == billable[0], overages.c.billable_id == billable[1])
                .order_by(overages.c.id.desc())
                .limit(20)
            )
        ]
        live = [
            dict(r._mapping)
            for r in conn.execute(
                sa.select(res)
                .where(
                    res.c.billable_type == billable[0],
                    res.c.billable_id == billable[1],
                    res.c.status == "pending",
                    res.c.expires_at > now,
                )
                .order_by(res.c.id.desc())
                .limit(50)
            )
        ]
        summary = summarize(conn, mine, use_rollups=rt.settings.aggregation_tables, breakdowns=(), with_unpriced=False)
        recent, _ = queries.ledger_page(conn, dataclasses.replace(mine, page=1), 20)
        check = current_check(rt, billable)
        forecast = outlook.billable_forecast(
            conn, billable, check, zone=f.zone, use_rollups=rt.settings.aggregation_tables
        )
        by_user = by_user_ranking(conn, mine, summary.totals)
        live_budgets = budget_usage.current_usage(
            conn, billable, timezone=rt.settings.timezone, warning_threshold=rt.settings.warning_threshold, at=now
        )
    return BillablePage(
        billable=billable,
        subscription=None if sub is None else dict(sub._mapping),
        check=check,
        wallet=None if wallet is None else dict(wallet._mapping),
        transactions=history,
        overages=over,
        reservations=live,
        summary=summary,
        recent=recent,
        forecast=forecast,
        by_user=by_user,
        budgets=live_budgets,
    )
