"""Daily rollups of the usage ledger, for dashboards and reports that stay fast at 10M rows.

``flask ai-metering aggregate`` fills four tables per local day (days are local to
``AI_METERING_TIMEZONE``, as the dashboard's date filters are; the watermark is kept
per timezone, so changing the setting rebuilds everything on the next run):

* ``ai_metering_usage_daily`` (:data:`DETAILED`): billable × tenant × provider ×
  model × feature, grouped from the ledger. Per-billable pages and reports read it.
* ``ai_metering_usage_daily_totals``: tenant × provider × model × feature. Overviews
  across all billables read it; it grows with models, not with customers.
* ``ai_metering_usage_daily_billables``: billable × tenant, for rankings of billables.
* ``ai_metering_usage_daily_latency`` (:data:`LATENCY`): ledger rows per provider × model ×
  feature × latency bucket, for the overview's latency percentiles and daily calls per model.

The two smaller tables are grouped from the day's detailed rows in the same
transaction, not from the ledger again: under READ COMMITTED each statement sees
its own snapshot, and a row committing between two ledger scans would make the
tables disagree. Derived from the detailed rows they always add up to it, and
``forget``/``anonymize`` can refresh them from it for days whose ledger rows
``cleanup`` has already pruned (the rollups are the long-term history).

Correct under concurrent writers: a usage row can commit after a run with an id
*lower* than that run's high-water mark (ids are handed out at INSERT, rows become
visible at COMMIT). So a run never trusts the previous mark alone: it steps back
to the newest row created at least :data:`SAFETY_WINDOW` before the previous run
and re-aggregates every day any later row falls on. Each day is rebuilt whole
(delete its rows, insert fresh ``GROUP BY`` s) in one transaction, so re-running is
always safe and a reader never sees half a day.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import typing as t
from zoneinfo import ZoneInfo

import sqlalchemy as sa

from ..models import TOKEN_COLUMNS
from ..models import AggregationState
from ..models import Usage
from ..models import UsageBillableRollup
from ..models import UsageLatencyRollup
from ..models import UsageRollup
from ..models import UsageTotalsRollup
from ..models import table
from ..models import utcnow

if t.TYPE_CHECKING:
    from ..runtime import Runtime

usage = table(Usage)
rollup = table(UsageRollup)
state = table(AggregationState)

#: How long a metering transaction may stay open and still be rolled up on the next run.
SAFETY_WINDOW = dt.timedelta(hours=1)
#: Trailing days each ``--period`` always re-aggregates: a cheap sweep that also picks up
#: rows changed or deleted in place, which no watermark sees.
TRAILING_DAYS = {"day": 1, "week": 7, "month": 31}

_UTC = dt.timezone.utc
#: ``updated_at`` of a watermark row that no run has completed yet.
_NEVER = dt.datetime(1970, 1, 1, tzinfo=_UTC)
#: Upper bounds (ms) of the latency histogram's buckets; the last is open-ended. Percentiles are
#: read off it, interpolated inside their bucket: exact to the bucket, bounded in memory. The
#: latency rollup stores bucket indexes: changing these needs a rebuild of its days.
LATENCY_BOUNDS_MS = (50, 100, 200, 300, 500, 750, 1000, 1500, 2000, 3000, 5000, 7500, 10000, 15000, 30000, 60000)
#: The latency rollup's table and the ledger columns it is keyed by besides ``day`` and ``bucket``.
LATENCY = table(UsageLatencyRollup)
LATENCY_KEYS = ("provider", "model", "feature")


@dataclasses.dataclass(frozen=True)
class RollupSpec:
    """A rollup table and the columns it is keyed by besides ``day``."""

    table: sa.Table
    keys: tuple[str, ...]

    @property
    def columns(self) -> list[str]:
        """The insert order, matching :func:`rollup_select`'s select list."""
        return [
            "day",
            *self.keys,
            "calls",
            *TOKEN_COLUMNS,
            "total_cost",
            "unpriced_calls",
            "refunds",
            "refunded_cost",
            "updated_at",
        ]


#: Grouped from the ledger; the source of the other two.
DETAILED = RollupSpec(rollup, ("billable_type", "billable_id", "tenant_id", "provider", "model", "feature"))
TOTALS = RollupSpec(table(UsageTotalsRollup), ("tenant_id", "provider", "model", "feature"))
BILLABLES = RollupSpec(table(UsageBillableRollup), ("billable_type", "billable_id", "tenant_id"))
#: Grouped from the day's :data:`DETAILED` rows.
DERIVED = (TOTALS, BILLABLES)


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


def as_date(value: t.Any) -> dt.date:
    """A ``DATE`` as the drivers return it (SQLite: text) as a ``date``."""
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    return dt.date.fromisoformat(str(value)[:10])


def _local_days_of_utc_date(day: dt.date, zone: ZoneInfo) -> set[dt.date]:
    """Local days that overlap the UTC day ``day`` (one, or two off UTC)."""
    start = dt.datetime.combine(day, dt.time(), _UTC)
    return {local_day(start, zone), local_day(start + dt.timedelta(days=1, microseconds=-1), zone)}


def measures(source: sa.Table | sa.Subquery) -> list[sa.Label[t.Any]]:
    """Calls, token sums, cost, unpriced calls and refunded cost of the ledger or of any rollup table.

    The cost is summed as raw pico-units (``cost_units``): a SUM through
    ``MoneyType`` would be read back as currency units. Refunds are ledger rows
    with negative amounts, so the sums are net of them; they are not calls, and
    the cost they gave back is summed apart (``refunded_units``, positive).
    """
    if source is usage:
        call = usage.c.kind == "usage"
        calls: sa.ColumnElement[t.Any] = sa.func.sum(sa.case((call, 1), else_=0))
        unpriced: sa.ColumnElement[t.Any] = sa.func.sum(sa.case((sa.and_(call, usage.c.unpriced), 1), else_=0))
        cost = sa.type_coerce(usage.c.total_cost, sa.BigInteger)
        refund = usage.c.kind == "refund"
        refunds: sa.ColumnElement[t.Any] = sa.func.sum(sa.case((refund, 1), else_=0))
        refunded: sa.ColumnElement[t.Any] = sa.func.sum(sa.case((refund, -cost), else_=0))
    else:
        calls, unpriced = sa.func.sum(source.c.calls), sa.func.sum(source.c.unpriced_calls)
        refunds = sa.func.sum(source.c.refunds)
        refunded = sa.func.sum(sa.type_coerce(source.c.refunded_cost, sa.BigInteger))
    return [
        calls.label("calls"),
        *(sa.func.sum(source.c[name]).label(name) for name in TOKEN_COLUMNS),
        sa.func.sum(sa.type_coerce(source.c.total_cost, sa.BigInteger)).label("cost_units"),
        unpriced.label("unpriced_calls"),
        refunds.label("refunds"),
        refunded.label("refunded_units"),
    ]


def ledger_key(name: str) -> sa.ColumnElement[t.Any]:
    """A ledger column as the rollups store it: '' stands for none (unique keys treat NULLs as distinct)."""
    column = usage.c[name]
    return sa.func.coalesce(column, "") if column.nullable else column


def latency_bucket(duration: sa.ColumnElement[t.Any]) -> sa.ColumnElement[int]:
    """The :data:`LATENCY_BOUNDS_MS` bucket of a ``duration_ms`` column; -1 for a row without one."""
    return sa.case(
        (duration.is_(None), -1),
        *((duration < bound, index) for index, bound in enumerate(LATENCY_BOUNDS_MS)),
        else_=len(LATENCY_BOUNDS_MS),
    )


def refill_latency(conn: sa.Connection, day: dt.date, zone: ZoneInfo) -> int:
    """Replace local ``day``'s rows of the latency rollup, grouped from the ledger; return their number.

    From the ledger, not from the detailed rollup (which has no durations), in the
    caller's transaction: a call committing between this and the detailed rollup's
    statement is picked up on the next run, as every late commit is.
    """
    start, end = day_bounds(day, zone)
    keys = [ledger_key(name) for name in LATENCY_KEYS]
    bucket = latency_bucket(usage.c.duration_ms)
    select = (
        sa.select(
            sa.literal(day, sa.Date),
            *keys,
            bucket,
            sa.func.count(),
            sa.literal(utcnow().replace(tzinfo=None), sa.DateTime),
        )
        .where(usage.c.occurred_at >= start, usage.c.occurred_at < end)
        .group_by(*keys, bucket)
    )
    conn.execute(sa.delete(LATENCY).where(LATENCY.c.day == day))
    conn.execute(sa.insert(LATENCY).from_select(["day", *LATENCY_KEYS, "bucket", "entries", "updated_at"], select))
    return int(conn.execute(sa.select(sa.func.count()).select_from(LATENCY).where(LATENCY.c.day == day)).scalar_one())


def rollup_select(spec: RollupSpec, day: dt.date, zone: ZoneInfo, now: dt.datetime) -> sa.Select[t.Any]:
    """Local ``day`` grouped by ``spec``'s key: from the ledger for :data:`DETAILED`, else from its rows."""
    if spec is DETAILED:
        start, end = day_bounds(day, zone)
        keys = [ledger_key(name) for name in spec.keys]
        source, where = usage, [usage.c.occurred_at >= start, usage.c.occurred_at < end]
    else:
        keys = [rollup.c[name] for name in spec.keys]
        source, where = rollup, [rollup.c.day == day]
    return (
        sa.select(sa.literal(day, sa.Date), *keys, *measures(source), sa.literal(now.replace(tzinfo=None), sa.DateTime))
        .where(*where)
        .group_by(*keys)
    )


def refill(conn: sa.Connection, day: dt.date, zone: ZoneInfo, specs: t.Sequence[RollupSpec]) -> int:
    """Replace ``day``'s rows of each table in ``specs`` (in order); return rows now held for the day.

    Runs in the caller's transaction, which should hold :func:`lock_watermark`.
    """
    now = utcnow()
    written = 0
    for spec in specs:
        rows = spec.table
        conn.execute(sa.delete(rows).where(rows.c.day == day))
        conn.execute(sa.insert(rows).from_select(spec.columns, rollup_select(spec, day, zone, now)))
        # Counted, not taken from rowcount: drivers disagree on it for INSERT … SELECT.
        written += int(conn.execute(sa.select(sa.func.count()).select_from(rows).where(rows.c.day == day)).scalar_one())
    return written


def lock_watermark(conn: sa.Connection, timezone: str) -> None:
    """Take the watermark row's lock, first thing in every transaction that rewrites rollups.

    Two concurrent rebuilds of a day then run one after the other instead of both
    inserting it (a unique-key violation), and one lock order rules out deadlocks.
    """
    name = state_name(timezone)
    conn.execute(sa.update(state).where(state.c.name == name).values(last_usage_id=state.c.last_usage_id))


def rebuild_day(rt: Runtime, day: dt.date, zone: ZoneInfo) -> int:
    """Rebuild the four tables' rows of local ``day`` in one transaction; return rows written."""

    def work(conn: sa.Connection) -> int:
        lock_watermark(conn, rt.settings.timezone)
        return refill(conn, day, zone, (DETAILED, *DERIVED)) + refill_latency(conn, day, zone)

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
    days = _local_days_above(conn, dialect, zone, low)
    today = local_day(now, zone)
    days |= {today - dt.timedelta(days=n) for n in range(TRAILING_DAYS[period])}
    return days


def _local_days_above(conn: sa.Connection, dialect: str, zone: ZoneInfo, low: int) -> set[dt.date]:
    """Local days holding a usage row whose id is above ``low``.

    Filtered on the id alone, so every database walks the primary key: cheap when
    few rows are new, which is the common case.
    """
    day = utc_date(usage.c.occurred_at, dialect)
    days: set[dt.date] = set()
    for value in conn.execute(sa.select(day).where(usage.c.id > low).group_by(day)).scalars():
        if value is not None:
            days |= _local_days_of_utc_date(as_date(value), zone)
    return days


def fresh_days(conn: sa.Connection, timezone: str) -> set[dt.date] | None:
    """Local days holding usage written since the last ``aggregate`` run; None if it never ran.

    Readers take these days from the ledger and every other day from the rollups,
    so their figures stay exact while ``aggregate`` lags behind. (A row that
    commits late with an id below the watermark is seen on the next run.)
    """
    row = conn.execute(
        sa.select(state.c.updated_at, state.c.last_usage_id).where(state.c.name == state_name(timezone))
    ).first()
    if row is None or row.updated_at == _NEVER:
        return None
    return _local_days_above(conn, conn.dialect.name, ZoneInfo(timezone), int(row.last_usage_id))


def aggregate(
    rt: Runtime, *, period: str = "day", progress: Progress | None = None, now: dt.datetime | None = None
) -> int:
    """Bring the daily rollups up to date; return how many rollup rows (all four tables) were written.

    :param period: ``day``, ``week`` or ``month``: the trailing window rebuilt on every
        run in addition to the days new rows fell on.
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
        written += rebuild_day(rt, day, zone)
        if progress is not None:
            progress.update(1)
    store.run(
        lambda conn: conn.execute(
            sa.update(state).where(state.c.name == name).values(last_usage_id=high, updated_at=now)
        )
    )
    if len(days) > TRAILING_DAYS[period]:
        store.run(_analyze)
    return written


def _analyze(conn: sa.Connection) -> None:
    """On PostgreSQL, refresh the planner's statistics of the rollup tables after a large rebuild.

    Until autovacuum gets to them (never, where it is off) the planner takes a
    freshly filled rollup for a few rows, and picked plans that read a month of the
    billables rollup to find ten billables (60 ms instead of 2 on the overview at 1M
    calls). A run that only re-did its trailing days changed too little to matter.
    """
    if conn.dialect.name == "postgresql":
        names = ", ".join(spec.table.name for spec in (DETAILED, *DERIVED))
        conn.exec_driver_sql(f"ANALYZE {names}, {LATENCY.name}")


def last_run(conn: sa.Connection, timezone: str) -> dt.datetime | None:
    """When the rollups were last brought up to date (None: never)."""
    row = conn.execute(sa.select(state.c.updated_at).where(state.c.name == state_name(timezone))).first()
    if row is None or row.updated_at == _NEVER:
        return None
    return t.cast(dt.datetime, row.updated_at)
