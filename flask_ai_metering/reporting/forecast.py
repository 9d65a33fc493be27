"""Month-end (period-end) forecasts: a run rate weighted toward recent days, projected to the period's end.

The run rate is a weighted mean of the period's complete local days so far, each
day's weight halving every :data:`HALF_LIFE_DAYS` days of age, so a change in
usage shows within days while one quiet day does not swing the forecast. While no
day of the period is complete yet, today's usage over the part of today elapsed
is the rate. The projection is what was used so far plus the rate over the time
left (to the instant), and a limit is reached on the local day the projection
crosses it. A steady run rate projects exactly: the weights cancel out.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import typing as t
from decimal import Decimal
from zoneinfo import ZoneInfo

import sqlalchemy as sa

from ..models import Usage
from ..models import table
from .filters import Filters
from .queries import billables_in
from .queries import bucket_seconds
from .queries import epoch_bucket
from .queries import sources
from .rollups import as_date
from .rollups import day_bounds
from .rollups import local_day

usage = table(Usage)

_UTC = dt.timezone.utc
_DAY = Decimal(86400)
#: Days over which a day's weight in the run rate halves.
HALF_LIFE_DAYS = 7

Billable = tuple[str, str]


@dataclasses.dataclass(frozen=True)
class Projection:
    """A forecast of one amount (tokens, or pico-units of cost) for one period."""

    #: Used so far in the period.
    used: Decimal
    #: The weighted run rate, per day.
    rate_per_day: Decimal
    #: The period's projected total at that rate.
    projected: Decimal
    #: The local day the projection reaches the limit (today when already reached); None: not this period.
    reaches_limit_on: dt.date | None = None


@dataclasses.dataclass(frozen=True)
class Daily:
    """One billable's usage per local day: total tokens and cost (pico-units)."""

    tokens: dict[dt.date, int] = dataclasses.field(default_factory=dict)
    cost_units: dict[dt.date, int] = dataclasses.field(default_factory=dict)


def weighted_rate(daily: t.Mapping[dt.date, int | Decimal], days: t.Sequence[dt.date], today: dt.date) -> Decimal:
    """The mean per day of ``days`` (absent days count as 0), weighted toward the recent ones."""
    if not days:
        return Decimal(0)
    weighted = total = Decimal(0)
    for day in days:
        weight = Decimal(2) ** (Decimal(-(today - day).days) / HALF_LIFE_DAYS)
        weighted += weight * Decimal(daily.get(day, 0))
        total += weight
    return weighted / total


def project(
    daily: t.Mapping[dt.date, int | Decimal],
    *,
    start: dt.datetime,
    end: dt.datetime,
    now: dt.datetime,
    zone: ZoneInfo,
    limit: int | Decimal | None = None,
) -> Projection:
    """Project the period ``[start, end)`` from its usage per local day so far, as of ``now``."""
    used = Decimal(sum(daily.values(), Decimal(0)))
    if now <= start:
        return Projection(used, Decimal(0), used)
    today = local_day(min(now, end), zone)
    complete = []
    day = local_day(start, zone)
    while day < today:
        first, last = day_bounds(day, zone)
        if first >= start and last <= min(now, end):
            complete.append(day)
        day += dt.timedelta(days=1)
    if complete:
        rate = weighted_rate(daily, complete, today)
    else:  # the period's first day: what today used over the part of it that has passed
        since = max(start, day_bounds(today, zone)[0])
        elapsed = Decimal((min(now, end) - since).total_seconds()) / _DAY
        rate = Decimal(daily.get(today, 0)) / elapsed if elapsed > 0 else Decimal(0)
    left = max(Decimal(0), Decimal((end - now).total_seconds()) / _DAY)
    projected = used + rate * left
    reaches = None
    if limit is not None:
        if used >= limit:
            reaches = today
        elif rate > 0 and projected >= limit:
            at = now + dt.timedelta(days=float((Decimal(limit) - used) / rate))
            reaches = local_day(min(at, end - dt.timedelta(microseconds=1)), zone)
    return Projection(used, rate, projected, reaches)


def daily_by_billable(
    conn: sa.Connection, f: Filters, *, use_rollups: bool, only: t.Collection[Billable] | None = None
) -> dict[Billable, Daily]:
    """Each billable's total tokens and cost per local day of ``f``'s range (rollups, then the
    ledger's tail); ``only`` limits it to those billables, in the same queries."""
    out: dict[Billable, Daily] = {}
    for source, where in sources(conn, f, use_rollups=use_rollups, by_billable=True):
        kind, ident = source.c.billable_type, source.c.billable_id
        if only:
            where = [*where, billables_in(kind, ident, only)]
        sums = (
            sa.func.sum(source.c.total_tokens).label("tokens"),
            sa.func.sum(sa.type_coerce(source.c.total_cost, sa.BigInteger)).label("cost_units"),
        )
        if source is usage:
            seconds = bucket_seconds(f)
            slot = epoch_bucket(usage.c.occurred_at, seconds, conn.dialect.name).label("slot")
            query = sa.select(kind, ident, slot, *sums).where(*where, kind.is_not(None)).group_by(kind, ident, slot)
        else:
            query = (
                sa.select(kind, ident, source.c.day, *sums)
                .where(*where, kind != "")
                .group_by(kind, ident, source.c.day)
            )
        for row in conn.execute(query):
            if source is usage:
                day = local_day(dt.datetime.fromtimestamp(int(row.slot) * seconds, _UTC), f.zone)
            else:
                day = as_date(row.day)
            into = out.setdefault((row.billable_type, row.billable_id), Daily())
            into.tokens[day] = into.tokens.get(day, 0) + int(row.tokens or 0)
            into.cost_units[day] = into.cost_units.get(day, 0) + int(row.cost_units or 0)
    return out
