"""The dashboard's reads: the same numbers from the ledger or from the daily rollups.

With ``AI_METERING_AGGREGATION_TABLES`` on, aggregates come from
``ai_metering_usage_daily`` (days local to ``AI_METERING_TIMEZONE``); otherwise
from the ledger, bucketed in SQL by UTC hour (or day, or quarter hour, whatever the
zone needs) and folded into local days here, so both sources agree exactly. The
row list (explorer, CSV) always reads the ledger. Money is summed as raw
pico-units and converted once with :func:`~flask_ai_metering.money.from_units`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import typing as t

import sqlalchemy as sa

from ..models import Usage
from ..models import UsageRollup
from ..rollups import local_day
from .filters import Filters

usage = t.cast(sa.Table, Usage.__table__)
rollup = t.cast(sa.Table, UsageRollup.__table__)

TOKEN_COLUMNS = (
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "total_tokens",
)
_UTC = dt.timezone.utc


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


def _conditions(table: sa.Table, f: Filters, *, is_rollup: bool) -> list[sa.ColumnElement[bool]]:
    out: list[sa.ColumnElement[bool]] = []
    for name in ("provider", "model", "feature"):
        value = getattr(f, name)
        if value is not None:
            out.append(table.c[name] == value)
    if f.tenant is not None:
        out.append(table.c.tenant_id == f.tenant)
    if f.billable is not None:
        out.append(table.c.billable_type == f.billable[0])
        out.append(table.c.billable_id == f.billable[1])
    if is_rollup:
        out.append(rollup.c.day.between(f.start, f.end))
    else:
        out.append(usage.c.occurred_at >= f.since)
        out.append(usage.c.occurred_at < f.until)
    return out


def _sums(table: sa.Table, *, is_rollup: bool) -> list[sa.ColumnElement[t.Any]]:
    calls = sa.func.sum(rollup.c.calls) if is_rollup else sa.func.count()
    unpriced = (
        sa.func.sum(rollup.c.unpriced_calls) if is_rollup else sa.func.sum(sa.case((usage.c.unpriced, 1), else_=0))
    )
    return [
        calls.label("calls"),
        *(sa.func.sum(table.c[c]).label(c) for c in TOKEN_COLUMNS),
        # Raw pico-units: arithmetic through MoneyType would treat them as currency units.
        sa.func.sum(sa.type_coerce(table.c.total_cost, sa.BigInteger)).label("cost_units"),
        unpriced.label("unpriced_calls"),
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
    if use_rollups:
        keys = [rollup.c.day, rollup.c.provider, rollup.c.model, rollup.c.feature]
        rows = conn.execute(
            sa.select(*keys, *_sums(rollup, is_rollup=True))
            .where(*_conditions(rollup, f, is_rollup=True))
            .group_by(*keys)
        )
        return [
            Bucket(
                row.day if isinstance(row.day, dt.date) else dt.date.fromisoformat(str(row.day)),
                row.provider,
                row.model or "",
                row.feature or "",
                _totals(row),
            )
            for row in rows
        ]
    seconds = bucket_seconds(f)
    slot = epoch_bucket(usage.c.occurred_at, seconds, conn.dialect.name).label("slot")
    ledger_keys: list[sa.ColumnElement[t.Any]] = [slot, usage.c.provider, usage.c.model, usage.c.feature]
    rows = conn.execute(
        sa.select(*ledger_keys, *_sums(usage, is_rollup=False))
        .where(*_conditions(usage, f, is_rollup=False))
        .group_by(*ledger_keys)
    )
    merged: dict[tuple[dt.date, str, str, str], Totals] = {}
    for row in rows:
        at = dt.datetime.fromtimestamp(int(row.slot) * seconds, _UTC)
        key = (local_day(at, f.zone), row.provider, row.model or "", row.feature or "")
        merged.setdefault(key, Totals()).add(_totals(row))
    return [Bucket(*key, totals) for key, totals in merged.items()]


def top_billables(conn: sa.Connection, f: Filters, *, use_rollups: bool, limit: int = 10) -> list[dict[str, t.Any]]:
    """The billables that cost the most in ``f``'s range."""
    table = rollup if use_rollups else usage
    cost = sa.func.sum(sa.type_coerce(table.c.total_cost, sa.BigInteger))
    present = table.c.billable_type != "" if use_rollups else table.c.billable_type.is_not(None)
    rows = conn.execute(
        sa.select(table.c.billable_type, table.c.billable_id, *_sums(table, is_rollup=use_rollups))
        .where(*_conditions(table, f, is_rollup=use_rollups), present)
        .group_by(table.c.billable_type, table.c.billable_id)
        .order_by(cost.desc(), table.c.billable_type, table.c.billable_id)
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
        .where(*_conditions(usage, f, is_rollup=False))
        .order_by(usage.c.occurred_at.desc(), usage.c.id.desc())
    )


def ledger_page(conn: sa.Connection, f: Filters, per_page: int) -> tuple[list[t.Any], bool]:
    """One page of rows and whether another follows (one extra row read, no COUNT needed)."""
    rows = list(conn.execute(ledger_select(f).limit(per_page + 1).offset((f.page - 1) * per_page)))
    return rows[:per_page], len(rows) > per_page
