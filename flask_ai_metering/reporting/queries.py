"""The dashboard's reads: the same numbers from the ledger or from the daily rollups.

With ``AI_METERING_AGGREGATION_TABLES`` on, each aggregate reads the smallest rollup
that can answer it (:func:`rollup_for`): the totals across billables for overviews,
the per-billable totals for rankings, the detailed rollup once a billable (or, for a
ranking, a provider, model or feature) is chosen. Days written since the last
``aggregate`` run come from the ledger instead (:func:`sources`), so the figures stay
exact while ``aggregate`` lags behind. Rollup days are local to
``AI_METERING_TIMEZONE``; the ledger is bucketed in SQL by UTC hour (or day, or
quarter hour, whatever the zone needs) and folded into local days here, so both
sources agree exactly. The row list (explorer, CSV) always reads the ledger. Money
is summed as raw pico-units and converted once with
:func:`~flask_ai_metering.money.from_units`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import typing as t

import sqlalchemy as sa

from ..models import TOKEN_COLUMNS
from ..models import Usage
from ..models import table
from .filters import Filters
from .rollups import BILLABLES
from .rollups import DETAILED
from .rollups import TOTALS
from .rollups import as_date
from .rollups import day_bounds
from .rollups import fresh_days
from .rollups import local_day
from .rollups import measures

usage = table(Usage)

_UTC = dt.timezone.utc
#: Where some of a page's figures come from: a table and the conditions that select them.
Source = tuple[sa.Table, list[sa.ColumnElement[bool]]]


@dataclasses.dataclass
class Totals:
    """Summed usage of some slice; ``cost_units`` are pico-units."""

    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    total_tokens: int = 0
    cost_units: int = 0
    unpriced_calls: int = 0

    def add(self, other: Totals) -> None:
        # Spelled out: this runs once per bucket per grouping, thousands of times a page.
        self.calls += other.calls
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cached_input_tokens += other.cached_input_tokens
        self.cache_write_tokens += other.cache_write_tokens
        self.reasoning_tokens += other.reasoning_tokens
        self.total_tokens += other.total_tokens
        self.cost_units += other.cost_units
        self.unpriced_calls += other.unpriced_calls


@dataclasses.dataclass(frozen=True)
class Bucket:
    """One local day × provider × model × feature of usage."""

    day: dt.date
    provider: str
    model: str
    feature: str
    totals: Totals


def rollup_for(f: Filters, *, by_billable: bool) -> sa.Table:
    """The smallest rollup table whose key covers ``f``'s filters and the grouping asked for.

    The detailed rollup holds nearly a row per call at scale; the other two grow
    with days × models and days × billables, which is what keeps an overview of
    10M calls under a second.
    """
    if f.billable is not None:
        return DETAILED.table
    if by_billable:
        narrowed = f.provider is not None or f.model is not None or f.feature is not None
        return DETAILED.table if narrowed else BILLABLES.table
    return TOTALS.table


def _conditions(source: sa.Table, f: Filters) -> list[sa.ColumnElement[bool]]:
    out: list[sa.ColumnElement[bool]] = []
    for name in ("provider", "model", "feature"):
        value = getattr(f, name)
        if value is not None:
            out.append(source.c[name] == value)
    if f.tenant is not None:
        out.append(source.c.tenant_id == f.tenant)
    if f.billable is not None:
        out.append(source.c.billable_type == f.billable[0])
        out.append(source.c.billable_id == f.billable[1])
    if source is usage:
        out.append(usage.c.occurred_at >= f.since)
        out.append(usage.c.occurred_at < f.until)
    else:
        out.append(source.c.day.between(f.start, f.end))
    return out


def _on_days(days: list[dt.date], f: Filters) -> sa.ColumnElement[bool]:
    """``occurred_at`` within one of the local ``days`` (sorted), consecutive days as one range."""
    ranges: list[list[dt.datetime]] = []
    for day in days:
        start, end = day_bounds(day, f.zone)
        if ranges and ranges[-1][1] == start:
            ranges[-1][1] = end
        else:
            ranges.append([start, end])
    return sa.or_(*(sa.and_(usage.c.occurred_at >= s, usage.c.occurred_at < e) for s, e in ranges))


def sources(conn: sa.Connection, f: Filters, *, use_rollups: bool, by_billable: bool = False) -> list[Source]:
    """Where ``f``'s aggregates come from, as sources that never cover the same day twice."""
    ledger: Source = (usage, _conditions(usage, f))
    fresh = fresh_days(conn, str(f.zone.key)) if use_rollups else None
    if fresh is None:
        return [ledger]
    rollup = rollup_for(f, by_billable=by_billable)
    tail = sorted(day for day in fresh if f.start <= day <= f.end)
    if not tail:
        return [(rollup, _conditions(rollup, f))]
    return [
        (rollup, [*_conditions(rollup, f), rollup.c.day.not_in(tail)]),
        (usage, [*ledger[1], _on_days(tail, f)]),
    ]


def _totals(row: t.Any) -> Totals:
    return Totals(
        calls=int(row.calls or 0),
        **{c: int(getattr(row, c) or 0) for c in TOKEN_COLUMNS},
        cost_units=int(row.cost_units or 0),
        unpriced_calls=int(row.unpriced_calls or 0),
    )


def bucket_seconds(f: Filters) -> int:
    """The SQL bucket that folds exactly into local days: a day in UTC, else an hour or 15 min."""
    offsets = {f.zone.utcoffset(f.since.replace(tzinfo=None)), f.zone.utcoffset(f.until.replace(tzinfo=None))}
    seconds = {int(o.total_seconds()) if o is not None else 0 for o in offsets}
    if seconds == {0} and f.zone.key in ("UTC", "Etc/UTC", "GMT", "Etc/GMT", "Zulu"):
        return 86400
    return 3600 if all(s % 3600 == 0 for s in seconds) else 900


def epoch_bucket(column: t.Any, seconds: int, dialect: str) -> sa.ColumnElement[t.Any]:
    """``floor(unix_time(column) / seconds)`` for a naive-UTC column, per database."""
    if dialect == "sqlite":
        return sa.cast(sa.func.strftime("%s", column), sa.Integer) / seconds
    if dialect == "postgresql":
        return sa.cast(sa.func.floor(sa.extract("epoch", column) / seconds), sa.BigInteger)
    diff = sa.func.timestampdiff(sa.literal_column("SECOND"), sa.literal_column("'1970-01-01 00:00:00'"), column)
    return sa.func.floor(diff / seconds)


def buckets(conn: sa.Connection, f: Filters, *, use_rollups: bool) -> list[Bucket]:
    """Usage in ``f``'s range per local day × provider × model × feature."""
    out: list[Bucket] = []
    for source, where in sources(conn, f, use_rollups=use_rollups):
        if source is usage:
            out += _ledger_buckets(conn, f, where)
            continue
        keys = [source.c.day, source.c.provider, source.c.model, source.c.feature]
        rows = conn.execute(sa.select(*keys, *measures(source)).where(*where).group_by(*keys))
        out += [Bucket(as_date(r.day), r.provider, r.model or "", r.feature or "", _totals(r)) for r in rows]
    return out


def totals(conn: sa.Connection, f: Filters, *, use_rollups: bool) -> Totals:
    """The sums of ``f``'s range without a breakdown: all a "change vs previous" figure needs."""
    out = Totals()
    for source, where in sources(conn, f, use_rollups=use_rollups):
        out.add(_totals(conn.execute(sa.select(*measures(source)).where(*where)).one()))
    return out


def _ledger_buckets(conn: sa.Connection, f: Filters, where: list[sa.ColumnElement[bool]]) -> list[Bucket]:
    seconds = bucket_seconds(f)
    slot = epoch_bucket(usage.c.occurred_at, seconds, conn.dialect.name).label("slot")
    keys: list[sa.ColumnElement[t.Any]] = [slot, usage.c.provider, usage.c.model, usage.c.feature]
    rows = conn.execute(sa.select(*keys, *measures(usage)).where(*where).group_by(*keys))
    merged: dict[tuple[dt.date, str, str, str], Totals] = {}
    for row in rows:
        at = dt.datetime.fromtimestamp(int(row.slot) * seconds, _UTC)
        key = (local_day(at, f.zone), row.provider, row.model or "", row.feature or "")
        merged.setdefault(key, Totals()).add(_totals(row))
    return [Bucket(*key, totals) for key, totals in merged.items()]


def top_billables(conn: sa.Connection, f: Filters, *, use_rollups: bool, limit: int = 10) -> list[dict[str, t.Any]]:
    """The billables that cost the most in ``f``'s range, ranked in SQL over every source."""
    parts = []
    for source, where in sources(conn, f, use_rollups=use_rollups, by_billable=True):
        kind, ident = source.c.billable_type, source.c.billable_id
        present = kind.is_not(None) if source is usage else kind != ""
        parts.append(sa.select(kind, ident, *measures(source)).where(*where, present).group_by(kind, ident))
    both = sa.union_all(*parts).subquery()
    names = ("calls", *TOKEN_COLUMNS, "cost_units", "unpriced_calls")
    sums = [sa.func.sum(both.c[name]).label(name) for name in names]
    rows = conn.execute(
        sa.select(both.c.billable_type, both.c.billable_id, *sums)
        .group_by(both.c.billable_type, both.c.billable_id)
        .order_by(sums[-2].desc(), both.c.billable_type, both.c.billable_id)
        .limit(limit)
    )
    return [{"billable": (row.billable_type, row.billable_id), "totals": _totals(row)} for row in rows]


LEDGER_COLUMNS = (
    "id",
    "occurred_at",
    "billable_type",
    "billable_id",
    "user_id",
    "tenant_id",
    "provider",
    "model",
    "feature",
    "input_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
    "total_tokens",
    "total_cost",
    "currency",
    "unpriced",
    "estimated",
    "billing_mode",
    "duration_ms",
)


def ledger_select(f: Filters) -> sa.Select[t.Any]:
    """The filtered ledger rows, newest first (what the explorer pages and the CSV streams)."""
    return (
        sa.select(*(usage.c[c] for c in LEDGER_COLUMNS))
        .where(*_conditions(usage, f))
        .order_by(usage.c.occurred_at.desc(), usage.c.id.desc())
    )


def ledger_page(conn: sa.Connection, f: Filters, per_page: int) -> tuple[list[t.Any], bool]:
    """One page of rows and whether another follows (one extra row read, no COUNT needed)."""
    rows = list(conn.execute(ledger_select(f).limit(per_page + 1).offset((f.page - 1) * per_page)))
    return rows[:per_page], len(rows) > per_page
