"""The dashboard's forward look: period-end forecasts, failures and error rates, cache savings.

Forecasts are :func:`~flask_ai_metering.reporting.forecast.project` over the same
daily figures ``report --forecast`` reads (:func:`~flask_ai_metering.reporting.forecast.daily_by_billable`,
rollups first): a billable's over its current quota period, against its limits; the
overall one over the calendar month. Failures come from their own table
(``ai_metering_failures``), never from the ledger. Cache savings price the cached
input tokens with the app's price book (``rt.prices``), read-only.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import typing as t
from decimal import Decimal
from zoneinfo import ZoneInfo

import sqlalchemy as sa

from ..models import Failure
from ..models import table
from ..models import utcnow
from ..money import UNITS_PER_UNIT
from ..money import from_units
from ..reporting import queries
from ..reporting.filters import Filters
from ..reporting.forecast import Projection
from ..reporting.forecast import daily_by_billable
from ..reporting.forecast import project
from ..reporting.rollups import local_day

if t.TYPE_CHECKING:
    from ..quota.engine import LimitCheck
    from ..runtime import Runtime

failures = table(Failure)
#: (provider, model) pairs whose cached tokens are priced for the savings figure.
SAVINGS_MODELS = 50
#: Models the error-rate table lists.
HEALTH_MODELS = 8


@dataclasses.dataclass(frozen=True)
class Forecast:
    """Where a period ends up at the current weighted run rate (cost in pico-units)."""

    period_start: dt.datetime
    period_end: dt.datetime
    tokens: Projection
    cost: Projection

    @property
    def projected_cost(self) -> Decimal:
        return from_units(int(self.cost.projected.to_integral_value()))

    @property
    def reaches_limit_on(self) -> dt.date | None:
        """The first local day a limit (tokens or cost) is reached; None: not this period."""
        days = [d for d in (self.tokens.reaches_limit_on, self.cost.reaches_limit_on) if d is not None]
        return min(days) if days else None


def billable_forecast(
    conn: sa.Connection,
    billable: tuple[str, str],
    check: LimitCheck,
    *,
    zone: ZoneInfo,
    use_rollups: bool,
    now: dt.datetime | None = None,
) -> Forecast:
    """``billable``'s current quota period projected to its end, against its token and cost limits."""
    return billable_forecasts(conn, [(billable, check)], zone=zone, use_rollups=use_rollups, now=now)[billable]


def billable_forecasts(
    conn: sa.Connection,
    checks: t.Sequence[tuple[tuple[str, str], LimitCheck]],
    *,
    zone: ZoneInfo,
    use_rollups: bool,
    now: dt.datetime | None = None,
) -> dict[tuple[str, str], Forecast]:
    """Each billable's current quota period projected to its end: one read per distinct period."""
    now = now or utcnow()
    windows: dict[tuple[dt.datetime, dt.datetime], list[tuple[tuple[str, str], LimitCheck]]] = {}
    for billable, check in checks:
        windows.setdefault((check.period_start, check.period_end), []).append((billable, check))
    out: dict[tuple[str, str], Forecast] = {}
    for (start, end), group in windows.items():
        period = Filters(
            start=local_day(start, zone), end=local_day(end - dt.timedelta(microseconds=1), zone), zone=zone
        )
        daily = daily_by_billable(conn, period, use_rollups=use_rollups, only={b for b, _ in group})
        for billable, check in group:
            mine = daily.get(billable)
            cost_limit = None if check.cost_limit is None else check.cost_limit * UNITS_PER_UNIT
            out[billable] = Forecast(
                period_start=start,
                period_end=end,
                tokens=project(
                    mine.tokens if mine else {}, start=start, end=end, now=now, zone=zone, limit=check.token_limit
                ),
                cost=project(
                    mine.cost_units if mine else {}, start=start, end=end, now=now, zone=zone, limit=cost_limit
                ),
            )
    return out


def month_window(zone: ZoneInfo, now: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    """The UTC instants that open the current local calendar month and the next."""
    first = local_day(now, zone).replace(day=1)
    following = (first.replace(day=28) + dt.timedelta(days=4)).replace(day=1)
    return (
        dt.datetime.combine(first, dt.time(), zone).astimezone(dt.timezone.utc),
        dt.datetime.combine(following, dt.time(), zone).astimezone(dt.timezone.utc),
    )


def overall_forecast(conn: sa.Connection, f: Filters, *, use_rollups: bool, now: dt.datetime | None = None) -> Forecast:
    """The current calendar month of ``f``'s slice (its provider, model, … filters; not its dates)."""
    now = now or utcnow()
    start, end = month_window(f.zone, now)
    month = dataclasses.replace(
        f, start=local_day(start, f.zone), end=local_day(end - dt.timedelta(microseconds=1), f.zone), page=1
    )
    days = {day: totals for (day, _), totals in queries.daily(conn, month, use_rollups=use_rollups).items()}
    tokens = {day: totals.total_tokens for day, totals in days.items()}
    cost = {day: totals.cost_units for day, totals in days.items()}
    return Forecast(
        period_start=start,
        period_end=end,
        tokens=project(tokens, start=start, end=end, now=now, zone=f.zone),
        cost=project(cost, start=start, end=end, now=now, zone=f.zone),
    )


# -- failures ---------------------------------------------------------------------------------


def _failure_conditions(f: Filters) -> list[sa.ColumnElement[bool]]:
    return [
        failures.c.occurred_at >= f.since,
        failures.c.occurred_at < f.until,
        *queries.attribute_conditions(failures, f),
    ]


#: Days, at the end of the range, whose latency and daily error rate are read: the ledger has
#: no rollup of durations, so this bounds the scan (and the page time) however long the range.
LATENCY_DAYS = 7
#: Upper bounds (ms) of the latency histogram's buckets; the last is open-ended. Percentiles are
#: read off it, interpolated inside their bucket: exact to the bucket, bounded in memory.
LATENCY_BOUNDS_MS = (50, 100, 200, 300, 500, 750, 1000, 1500, 2000, 3000, 5000, 7500, 10000, 15000, 30000, 60000)


def percentile(histogram: t.Mapping[int, int], q: float) -> float | None:
    """The ``q`` quantile (0–1) of a latency histogram (bucket index → count), in ms; None if empty."""
    total = sum(histogram.values())
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for index in sorted(histogram):
        count = histogram[index]
        if seen + count >= rank and count:
            low = 0 if index == 0 else LATENCY_BOUNDS_MS[index - 1]
            high = LATENCY_BOUNDS_MS[index] if index < len(LATENCY_BOUNDS_MS) else low * 2
            return round(low + (high - low) * (rank - seen) / count, 1)
        seen += count
    return float(LATENCY_BOUNDS_MS[-1])


@dataclasses.dataclass
class ModelHealth:
    """Calls recorded and failed of one model in a range, and its latency histogram."""

    model: str
    calls: int = 0
    failed: int = 0
    #: Bucket index of :data:`LATENCY_BOUNDS_MS` → calls (of those metered with a duration).
    latency: dict[int, int] = dataclasses.field(default_factory=dict)

    @property
    def p50_ms(self) -> float | None:
        return percentile(self.latency, 0.5)

    @property
    def p95_ms(self) -> float | None:
        return percentile(self.latency, 0.95)

    @property
    def error_rate(self) -> float | None:
        """Failed ÷ (recorded + failed), in percent; None when nothing ran."""
        ran = self.calls + self.failed
        return None if ran == 0 else round(100 * self.failed / ran, 2)


@dataclasses.dataclass
class Health:
    """Failures of a range: overall, per model, and per day of the models listed."""

    failed: int = 0
    by_model: list[ModelHealth] = dataclasses.field(default_factory=list)
    #: (day, model) → failed calls, for the models in ``by_model``.
    failed_by_day: dict[tuple[dt.date, str], int] = dataclasses.field(default_factory=dict)
    #: (day, model) → latency histogram, for the models in ``by_model``.
    latency_by_day: dict[tuple[dt.date, str], dict[int, int]] = dataclasses.field(default_factory=dict)
    #: (day, model) → calls recorded in the ledger, for the models in ``by_model``.
    recorded_by_day: dict[tuple[dt.date, str], int] = dataclasses.field(default_factory=dict)

    def error_rate(self, day: dt.date, model: str) -> float | None:
        """Failed ÷ (recorded + failed) of ``model`` on ``day``, in percent; None when nothing ran."""
        failed = self.failed_by_day.get((day, model), 0)
        ran = failed + self.recorded_by_day.get((day, model), 0)
        return None if ran == 0 else round(100 * failed / ran, 2)


def health(conn: sa.Connection, f: Filters, ranking: list[tuple[str, t.Any]]) -> Health:
    """Failures in ``f``'s range: their count, and per model for the models that failed most
    and those ``ranking`` lists (recorded calls from it), with their failures per day.

    Reads the failures table only (its own index on ``occurred_at``); the recorded calls
    come from the ranking the page already has, so the ledger is not read again.
    """
    where = _failure_conditions(f)
    model = sa.func.coalesce(failures.c.model, sa.literal_column("''")).label("model")
    total = int(conn.execute(sa.select(sa.func.count()).where(*where)).scalar_one())
    out = Health(failed=total)
    if total == 0 and not ranking:
        return out
    worst = conn.execute(
        sa.select(model, sa.func.count().label("n"))
        .where(*where)
        .group_by(model)
        .order_by(sa.func.count().desc(), model)
        .limit(HEALTH_MODELS)
    ).all()
    recorded = {name: int(totals.calls) for name, totals in ranking}
    names = list(dict.fromkeys([*(row.model for row in worst), *recorded]))[:HEALTH_MODELS]
    failed = {row.model: int(row.n) for row in worst}
    missing = [n for n in names if n not in failed]
    if missing:
        query = sa.select(model, sa.func.count().label("n")).where(*where, model.in_(missing)).group_by(model)
        for row in conn.execute(query):
            failed[row.model] = int(row.n)
    out.by_model = [ModelHealth(n, recorded.get(n, 0), failed.get(n, 0)) for n in names]
    seconds = queries.bucket_seconds(f)
    slot = queries.epoch_bucket(failures.c.occurred_at, seconds, conn.dialect.name).label("slot")
    for row in conn.execute(
        sa.select(slot, model, sa.func.count().label("n")).where(*where, model.in_(names)).group_by(slot, model)
    ):
        day = local_day(dt.datetime.fromtimestamp(int(row.slot) * seconds, dt.timezone.utc), f.zone)
        key = (day, row.model)
        out.failed_by_day[key] = out.failed_by_day.get(key, 0) + int(row.n)
    _add_latency(conn, f, out, names, seconds)
    return out


def _add_latency(conn: sa.Connection, f: Filters, out: Health, names: list[str], seconds: int) -> None:
    """Calls and latency histograms per (day, model) of the listed models over the range's last
    :data:`LATENCY_DAYS` days, counted in SQL in one grouped scan (bucket -1: a row without a
    duration, e.g. one ``record`` wrote)."""
    usage = queries.usage
    duration = usage.c.duration_ms
    bucket = sa.case(
        (duration.is_(None), -1),
        *((duration < bound, index) for index, bound in enumerate(LATENCY_BOUNDS_MS)),
        else_=len(LATENCY_BOUNDS_MS),
    ).label("bucket")
    model = sa.func.coalesce(usage.c.model, sa.literal_column("''")).label("model")
    slot = queries.epoch_bucket(usage.c.occurred_at, seconds, conn.dialect.name).label("slot")
    recent = max(f.since, f.until - dt.timedelta(days=LATENCY_DAYS))
    where = [*queries.ledger_conditions(f), usage.c.occurred_at >= recent, model.in_(names)]
    by_model = {row.model: row for row in out.by_model}
    for row in conn.execute(
        sa.select(slot, model, bucket, sa.func.count().label("n")).where(*where).group_by(slot, model, bucket)
    ):
        day = local_day(dt.datetime.fromtimestamp(int(row.slot) * seconds, dt.timezone.utc), f.zone)
        out.recorded_by_day[(day, row.model)] = out.recorded_by_day.get((day, row.model), 0) + int(row.n)
        if int(row.bucket) < 0:
            continue
        daily = out.latency_by_day.setdefault((day, row.model), {})
        daily[int(row.bucket)] = daily.get(int(row.bucket), 0) + int(row.n)
        whole = by_model[row.model].latency
        whole[int(row.bucket)] = whole.get(int(row.bucket), 0) + int(row.n)


# -- cache savings ----------------------------------------------------------------------------


@dataclasses.dataclass
class Savings:
    """What cache reads saved: cached tokens × (input price − cached price), per priced model."""

    amount: Decimal = Decimal(0)
    cached_tokens: int = 0
    #: Cached tokens of the models priced here (the :data:`SAVINGS_MODELS` with the most).
    priced_tokens: int = 0


def cache_savings(rt: Runtime, conn: sa.Connection, f: Filters, *, use_rollups: bool) -> Savings:
    """Cache savings in ``f``'s range, from the :data:`SAVINGS_MODELS` models with the most cached tokens."""
    out = Savings()
    for source, where in queries.sources(conn, f, use_rollups=use_rollups):
        out.cached_tokens += int(
            conn.execute(sa.select(sa.func.sum(source.c.cached_input_tokens)).where(*where)).scalar() or 0
        )
    if out.cached_tokens == 0:
        return out
    parts = []
    for source, where in queries.sources(conn, f, use_rollups=use_rollups):
        provider, model = queries.name_of(source, "provider"), queries.name_of(source, "model")
        parts.append(
            sa.select(
                provider.label("provider"), model.label("model"), sa.func.sum(source.c.cached_input_tokens).label("c")
            )
            .where(*where, source.c.cached_input_tokens > 0)
            .group_by(provider, model)
        )
    both = (parts[0] if len(parts) == 1 else sa.union_all(*parts)).subquery()
    cached = sa.func.sum(both.c.c)
    rows = conn.execute(
        sa.select(both.c.provider, both.c.model, cached.label("cached"))
        .group_by(both.c.provider, both.c.model)
        .order_by(cached.desc(), both.c.provider, both.c.model)
        .limit(SAVINGS_MODELS)
    )
    for row in rows:
        tokens = int(row.cached or 0)
        saved = rt.prices.cache_savings(row.provider, row.model or None, tokens)
        out.priced_tokens += tokens
        if saved is not None:
            out.amount += saved
    return out
