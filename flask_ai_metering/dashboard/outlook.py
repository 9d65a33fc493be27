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
from ..reporting.forecast import Daily
from ..reporting.forecast import Projection
from ..reporting.forecast import daily_by_billable
from ..reporting.forecast import project
from ..reporting.rollups import LATENCY
from ..reporting.rollups import LATENCY_BOUNDS_MS
from ..reporting.rollups import as_date
from ..reporting.rollups import latency_bucket
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
    known: t.Mapping[tuple[str, str], t.Mapping[dt.date, queries.Totals]] | None = None,
    known_days: tuple[dt.date, dt.date] | None = None,
) -> dict[tuple[str, str], Forecast]:
    """Each billable's current quota period projected to its end: one read per distinct period.

    :param known: some billables' whole usage per local day of ``known_days`` (first, last),
        when the caller has it (the overview does for its top billables): their period's
        days inside it are taken from it, and only the others are read.
    """
    now = now or utcnow()
    windows: dict[tuple[dt.datetime, dt.datetime], list[tuple[tuple[str, str], LimitCheck]]] = {}
    for billable, check in checks:
        windows.setdefault((check.period_start, check.period_end), []).append((billable, check))
    out: dict[tuple[str, str], Forecast] = {}
    for (start, end), group in windows.items():
        period = Filters(
            start=local_day(start, zone), end=local_day(end - dt.timedelta(microseconds=1), zone), zone=zone
        )
        daily = _period_days(conn, period, {b for b, _ in group}, use_rollups, known or {}, known_days)
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


def _period_days(
    conn: sa.Connection,
    period: Filters,
    billables: set[tuple[str, str]],
    use_rollups: bool,
    known: t.Mapping[tuple[str, str], t.Mapping[dt.date, queries.Totals]],
    known_days: tuple[dt.date, dt.date] | None,
) -> dict[tuple[str, str], Daily]:
    """``billables``' usage per day of ``period``: from ``known`` where it covers it, else read."""
    reused = {b for b in billables if b in known}
    if known_days is None or not reused:
        return daily_by_billable(conn, period, use_rollups=use_rollups, only=billables)
    first, last = max(period.start, known_days[0]), min(period.end, known_days[1])
    if first > last:
        return daily_by_billable(conn, period, use_rollups=use_rollups, only=billables)
    out: dict[tuple[str, str], Daily] = {}
    for billable in reused:
        days = {day: totals for day, totals in known[billable].items() if first <= day <= last}
        out[billable] = Daily(
            tokens={day: totals.total_tokens for day, totals in days.items()},
            cost_units={day: totals.cost_units for day, totals in days.items()},
        )
    outside = [
        dataclasses.replace(period, start=a, end=b)
        for a, b in ((period.start, first - dt.timedelta(days=1)), (last + dt.timedelta(days=1), period.end))
        if a <= b
    ]
    for part in outside:
        for billable, read in daily_by_billable(conn, part, use_rollups=use_rollups, only=reused).items():
            out[billable].tokens.update(read.tokens)
            out[billable].cost_units.update(read.cost_units)
    if billables - reused:
        out.update(daily_by_billable(conn, period, use_rollups=use_rollups, only=billables - reused))
    return out


def month_window(zone: ZoneInfo, now: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    """The UTC instants that open the current local calendar month and the next."""
    first = local_day(now, zone).replace(day=1)
    following = (first.replace(day=28) + dt.timedelta(days=4)).replace(day=1)
    return (
        dt.datetime.combine(first, dt.time(), zone).astimezone(dt.timezone.utc),
        dt.datetime.combine(following, dt.time(), zone).astimezone(dt.timezone.utc),
    )


def overall_forecast(
    conn: sa.Connection,
    f: Filters,
    *,
    use_rollups: bool,
    now: dt.datetime | None = None,
    known: t.Mapping[dt.date, queries.Totals] | None = None,
) -> Forecast:
    """The current calendar month of ``f``'s slice (its provider, model, … filters; not its dates).

    :param known: ``f``'s own usage per day, when the caller has it (the overview does):
        the month's days inside ``f``'s range are taken from it and only the others are
        read, so the default range (the last 30 days) reads nothing again.
    """
    now = now or utcnow()
    start, end = month_window(f.zone, now)
    month = dataclasses.replace(
        f, start=local_day(start, f.zone), end=local_day(end - dt.timedelta(microseconds=1), f.zone), page=1
    )
    days: dict[dt.date, queries.Totals] = {}
    first, last = max(month.start, f.start), min(month.end, f.end)
    if known is None or first > last:
        parts = [month]
    else:
        days = {day: totals for day, totals in known.items() if first <= day <= last}
        parts = [
            dataclasses.replace(month, start=a, end=b)
            for a, b in ((month.start, first - dt.timedelta(days=1)), (last + dt.timedelta(days=1), month.end))
            if a <= b
        ]
    for part in parts:
        days.update({day: totals for (day, _), totals in queries.daily(conn, part, use_rollups=use_rollups).items()})
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


#: Days, at the end of the range, whose latency and daily error rate are read: this bounds the
#: histograms kept per (day, model), however long the range.
LATENCY_DAYS = 7


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


def health(conn: sa.Connection, f: Filters, ranking: list[tuple[str, t.Any]], *, use_rollups: bool = False) -> Health:
    """Failures in ``f``'s range: their count, and per model for the models that failed most
    and those ``ranking`` lists (recorded calls from it), with their failures per day.

    Failures come from the failures table only (its own index on ``occurred_at``); the
    recorded calls per model from the ranking the page already has, and those per day, with
    the latency, from the latency rollup when ``use_rollups`` (:func:`_add_latency`).
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
        query = (
            sa.select(model, sa.func.count().label("n"))
            .where(*where, queries.name_in(failures, "model", missing))
            .group_by(model)
        )
        for row in conn.execute(query):
            failed[row.model] = int(row.n)
    out.by_model = [ModelHealth(n, recorded.get(n, 0), failed.get(n, 0)) for n in names]
    seconds = queries.bucket_seconds(f)
    slot = queries.epoch_bucket(failures.c.occurred_at, seconds, conn.dialect.name).label("slot")
    for row in conn.execute(
        sa.select(slot, model, sa.func.count().label("n"))
        .where(*where, queries.name_in(failures, "model", names))
        .group_by(slot, model)
    ):
        day = local_day(dt.datetime.fromtimestamp(int(row.slot) * seconds, dt.timezone.utc), f.zone)
        key = (day, row.model)
        out.failed_by_day[key] = out.failed_by_day.get(key, 0) + int(row.n)
    _add_latency(conn, f, out, names, seconds, use_rollups=use_rollups)
    return out


def _add_latency(
    conn: sa.Connection, f: Filters, out: Health, names: list[str], seconds: int, *, use_rollups: bool
) -> None:
    """Calls and latency histograms per (day, model) of the listed models over the range's last
    :data:`LATENCY_DAYS` local days (bucket -1: a row without a duration, e.g. one ``record`` wrote).

    From the latency rollup and the ledger's days since the last ``aggregate`` (as every
    other figure), or from the ledger alone when a tenant or billable filter narrows it:
    the rollup has neither.
    """
    usage = queries.usage
    first_day = max(f.start, f.end - dt.timedelta(days=LATENCY_DAYS - 1))
    recent = dataclasses.replace(f, start=first_day)
    rolled = use_rollups and f.tenant is None and f.billable is None
    by_model = {row.model: row for row in out.by_model}
    for source, where in queries.sources(conn, recent, use_rollups=rolled, rollup=LATENCY):
        model = queries.name_of(source, "model").label("model")
        where = [*where, queries.name_in(source, "model", names)]
        if source is usage:
            slot = queries.epoch_bucket(usage.c.occurred_at, seconds, conn.dialect.name).label("slot")
            bucket = latency_bucket(usage.c.duration_ms).label("bucket")
            query = (
                sa.select(slot, model, bucket, sa.func.count().label("n")).where(*where).group_by(slot, model, bucket)
            )
        else:
            query = (
                sa.select(source.c.day.label("slot"), model, source.c.bucket, sa.func.sum(source.c.entries).label("n"))
                .where(*where)
                .group_by(source.c.day, model, source.c.bucket)
            )
        for row in conn.execute(query):
            if source is usage:
                day = local_day(dt.datetime.fromtimestamp(int(row.slot) * seconds, dt.timezone.utc), f.zone)
            else:
                day = as_date(row.slot)
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


def cache_savings(
    rt: Runtime,
    conn: sa.Connection,
    f: Filters,
    *,
    use_rollups: bool,
    cached_tokens: int | None = None,
    pairs: t.Sequence[tuple[tuple[str, str], int]] | None = None,
) -> Savings:
    """Cache savings in ``f``'s range, from the :data:`SAVINGS_MODELS` models with the most cached tokens.

    :param cached_tokens: the range's cached input tokens, when the caller has its totals.
    :param pairs: :func:`~flask_ai_metering.reporting.queries.cached_pairs` of the range, when
        the caller read them already (the overview's PostgreSQL pass does); else they are read here.
    """
    out = Savings()
    if cached_tokens is None:
        cached_tokens = queries.totals(conn, f, use_rollups=use_rollups).cached_input_tokens
    out.cached_tokens = cached_tokens
    if out.cached_tokens == 0:
        return out
    if pairs is None:
        pairs = queries.cached_pairs(conn, f, use_rollups=use_rollups, limit=SAVINGS_MODELS)
    for (provider, model), tokens in pairs:
        saved = rt.prices.cache_savings(provider, model or None, tokens)
        out.priced_tokens += tokens
        if saved is not None:
            out.amount += saved
    return out
