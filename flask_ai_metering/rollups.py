"""Daily rollups of the usage ledger, for dashboards and reports that stay fast at 10M rows.

``flask ai-metering aggregate`` fills ``ai_metering_usage_daily`` with one row per
local day × billable × tenant × provider × model × feature. Days are local to
``AI_METERING_TIMEZONE`` (the dashboard's date filters are too); the watermark is
kept per timezone, so changing the setting rebuilds everything on the next run.

Correct under concurrent writers: a usage row can commit after a run with an id
*lower* than that run's high-water mark (ids are handed out at INSERT, rows become
visible at COMMIT). So a run never trusts the previous mark alone: it steps back
to the newest row created at least :data:`SAFETY_WINDOW` before the previous run
and re-aggregates every day any later row falls on. Each day is rebuilt whole
(delete its rows, insert a fresh ``GROUP BY`` of the ledger) in one transaction,
so re-running is always safe and a reader never sees half a day.
"""

from __future__ import annotations

import datetime as dt
import typing as t
from zoneinfo import ZoneInfo

import sqlalchemy as sa

from .models import AggregationState
from .models import Usage
from .models import UsageRollup
from .models import utcnow

if t.TYPE_CHECKING:
    from .meter import Runtime

usage = t.cast(sa.Table, Usage.__table__)
rollup = t.cast(sa.Table, UsageRollup.__table__)
state = t.cast(sa.Table, AggregationState.__table__)

#: How long a metering transaction may stay open and still be rolled up on the next run.
SAFETY_WINDOW = dt.timedelta(hours=1)
#: Trailing days each ``--period`` always re-aggregates: a cheap sweep that also picks up
#: rows changed or deleted in place (``forget``, ``anonymize``), which no watermark sees.
TRAILING_DAYS = {"day": 1, "week": 7, "month": 31}

_UTC = dt.timezone.utc
#: ``updated_at`` of a watermark row that no run has completed yet.
_NEVER = dt.datetime(1970, 1, 1, tzinfo=_UTC)


class Progress(t.Protocol):
    def start(self, total: int) -> None: ...

    def update(self, n: int) -> None: ...


def state_name(timezone: str) -> str:
    """The watermark's key: one per timezone, because days are local."""
    return f"usage_daily:{timezone}"[:50]


def day_bounds(day: dt.date, zone: ZoneInfo) -> tuple[dt.datetime, dt.datetime]:
    """The UTC instants ``[start, end)`` of local ``day`` in ``zone`` (DST-safe)."""
    start = dt.datetime.combine(day, dt.time(), zone).astimezone(_UTC)
    end = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), zone).astimezone(_UTC)
    return start, end


def local_day(at: dt.datetime, zone: ZoneInfo) -> dt.date:
    return at.astimezone(zone).date()


def utc_date(column: t.Any, dialect: str) -> sa.ColumnElement[t.Any]:
    """The UTC calendar date of a naive-UTC datetime column, on every supported database."""
    if dialect == "sqlite":
        return sa.func.date(column)
    return sa.cast(column, sa.Date)


def _as_date(value: t.Any) -> dt.date:
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    return dt.date.fromisoformat(str(value)[:10])


def _local_days_of_utc_date(day: dt.date, zone: ZoneInfo) -> set[dt.date]:
    """Local days that overlap the UTC day ``day`` (one, or two off UTC)."""
    start = dt.datetime.combine(day, dt.time(), _UTC)
    return {local_day(start, zone), local_day(start + dt.timedelta(days=1, microseconds=-1), zone)}


def rollup_select(day: dt.date, start: dt.datetime, end: dt.datetime, now: dt.datetime) -> sa.Select[t.Any]:
    """One local day of the ledger, grouped by the rollup key ('' stands for none)."""
    keys = [
        sa.func.coalesce(usage.c.billable_type, ""),
        sa.func.coalesce(usage.c.billable_id, ""),
        sa.func.coalesce(usage.c.tenant_id, ""),
        usage.c.provider,
        sa.func.coalesce(usage.c.model, ""),
        sa.func.coalesce(usage.c.feature, ""),
    ]
    sums = [
        sa.func.sum(usage.c[name])
        for name in (
            "input_tokens",
            "output_tokens",
            "cached_input_tokens",
            "cache_write_tokens",
            "reasoning_tokens",
            "total_tokens",
        )
    ]
    return (
        sa.select(
            sa.literal(day, sa.Date),
            *keys,
            sa.func.count(),
            *sums,
            # Raw pico-units: a SUM through MoneyType would be read as currency units.
            sa.func.sum(sa.type_coerce(usage.c.total_cost, sa.BigInteger)),
            sa.func.sum(sa.case((usage.c.unpriced, 1), else_=0)),
            sa.literal(now.replace(tzinfo=None), sa.DateTime),
        )
        .where(usage.c.occurred_at >= start, usage.c.occurred_at < end)
        .group_by(*keys)
    )


_ROLLUP_COLUMNS = [
    "day",
    "billable_type",
    "billable_id",
    "tenant_id",
    "provider",
    "model",
    "feature",
    "calls",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "total_tokens",
    "total_cost",
    "unpriced_calls",
    "updated_at",
]


def rebuild_day(rt: Runtime, day: dt.date, zone: ZoneInfo, name: str) -> int:
    """Replace the rollup rows of local ``day`` in one transaction; return rows written."""
    start, end = day_bounds(day, zone)

    def work(conn: sa.Connection) -> int:
        # Lock the watermark row first: two concurrent runs then rebuild a day one after
        # the other instead of both inserting it (a unique-key violation).
        conn.execute(sa.update(state).where(state.c.name == name).values(last_usage_id=state.c.last_usage_id))
        conn.execute(sa.delete(rollup).where(rollup.c.day == day))
        conn.execute(sa.insert(rollup).from_select(_ROLLUP_COLUMNS, rollup_select(day, start, end, utcnow())))
        # Counted, not taken from rowcount: drivers disagree on it for INSERT … SELECT.
        return int(conn.execute(sa.select(sa.func.count()).select_from(rollup).where(rollup.c.day == day)).scalar_one())

    return rt.store.run(work)


def _days_to_rebuild(
    conn: sa.Connection, dialect: str, zone: ZoneInfo, previous: t.Any, now: dt.datetime, period: str
) -> set[dt.date]:
    if previous is None:
        low = 0
    else:
        # The newest row created well before the previous run: everything after it may
        # have committed since (including rows with ids below the previous mark).
        cutoff = previous.updated_at - SAFETY_WINDOW
        low = (
            conn.execute(
                sa.select(usage.c.id)
                .where(usage.c.id <= previous.last_usage_id, usage.c.created_at < cutoff)
                .order_by(usage.c.id.desc())
                .limit(1)
            ).scalar()
            or 0
        )
    day = utc_date(usage.c.occurred_at, dialect)
    dates = conn.execute(sa.select(day).where(usage.c.id > low).group_by(day)).scalars()
    days: set[dt.date] = set()
    for value in dates:
        if value is not None:
            days |= _local_days_of_utc_date(_as_date(value), zone)
    today = local_day(now, zone)
    days |= {today - dt.timedelta(days=n) for n in range(TRAILING_DAYS[period])}
    return days


def aggregate(
    rt: Runtime, *, period: str = "day", progress: Progress | None = None, now: dt.datetime | None = None
) -> int:
    """Bring the daily rollups up to date; return how many rollup rows were written.

    :param period: ``day``, ``week`` or ``month``: the trailing window rebuilt on every
        run in addition to the days new rows fell on (run ``month`` nightly to sweep up
        rows that ``forget``/``anonymize`` changed in place).
    """
    if period not in TRAILING_DAYS:
        raise ValueError(f"period must be one of {', '.join(TRAILING_DAYS)}, got {period!r}")
    now = now or utcnow()
    zone = ZoneInfo(rt.settings.timezone)
    name = state_name(rt.settings.timezone)
    store = rt.store

    def prepare(conn: sa.Connection) -> tuple[int, set[dt.date]]:
        store.insert_ignore(conn, state, {"name": name, "last_usage_id": 0, "updated_at": _NEVER})
        high = conn.execute(sa.select(sa.func.max(usage.c.id))).scalar() or 0
        previous = conn.execute(sa.select(state).where(state.c.name == name)).first()
        if previous is not None and previous.updated_at == _NEVER:
            previous = None
        return int(high), _days_to_rebuild(conn, store.dialect, zone, previous, now, period)

    high, days = store.run(prepare)
    if progress is not None:
        progress.start(len(days))
    written = 0
    for day in sorted(days):
        written += rebuild_day(rt, day, zone, name)
        if progress is not None:
            progress.update(1)
    store.run(
        lambda conn: conn.execute(
            sa.update(state).where(state.c.name == name).values(last_usage_id=high, updated_at=now)
        )
    )
    return written


def last_run(conn: sa.Connection, timezone: str) -> dt.datetime | None:
    """When the rollups were last brought up to date (None: never)."""
    row = conn.execute(
        sa.select(state.c.updated_at, state.c.last_usage_id).where(state.c.name == state_name(timezone))
    ).first()
    if row is None or row.updated_at == _NEVER:
        return None
    return t.cast(dt.datetime, row.updated_at)
