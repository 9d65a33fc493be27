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
import math
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
    #: Refund adjustments (ledger rows that are not calls).
    refunds: int = 0
    #: Cost given back by refunds (pico-units, positive); ``cost_units`` is already net of it.
    refunded_units: int = 0

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
        self.refunds += other.refunds
        self.refunded_units += other.refunded_units

    @classmethod
    def sum(cls, parts: t.Iterable[Totals]) -> Totals:
        """A new ``Totals``: ``parts`` added up."""
        out = cls()
        for part in parts:
            out.add(part)
        return out

    def minus(self, other: Totals) -> Totals:
        """A new ``Totals``: these less ``other`` (what a ranking's tail adds up to)."""
        return Totals(**{f.name: getattr(self, f.name) - getattr(other, f.name) for f in dataclasses.fields(self)})


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


def attribute_conditions(source: sa.Table, f: Filters) -> list[sa.ColumnElement[bool]]:
    """``f``'s provider, model, feature, tenant and billable filters on any table with those columns."""
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
    return out


def _conditions(source: sa.Table, f: Filters) -> list[sa.ColumnElement[bool]]:
    out = attribute_conditions(source, f)
    if source is usage:
        out.append(usage.c.occurred_at >= f.since)
        out.append(usage.c.occurred_at < f.until)
    else:
        out.append(source.c.day.between(f.start, f.end))
    return out


def ledger_conditions(f: Filters) -> list[sa.ColumnElement[bool]]:
    """``f``'s filters on the ledger itself (range included), for reads no rollup answers."""
    return _conditions(usage, f)


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


def sources(
    conn: sa.Connection, f: Filters, *, use_rollups: bool, by_billable: bool = False, rollup: sa.Table | None = None
) -> list[Source]:
    """Where ``f``'s aggregates come from, as sources that never cover the same day twice.

    :param rollup: the rollup table to read instead of :func:`rollup_for`'s choice (the
        caller checks that its key covers ``f``'s filters).
    """
    ledger: Source = (usage, _conditions(usage, f))
    fresh = fresh_days(conn, str(f.zone.key)) if use_rollups else None
    if fresh is None:
        return [ledger]
    rollup = rollup if rollup is not None else rollup_for(f, by_billable=by_billable)
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
        refunds=int(row.refunds or 0),
        refunded_units=int(row.refunded_units or 0),
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
        # ``//``: SQLAlchemy renders ``/`` as a float division, one group per distinct second.
        return sa.cast(sa.func.strftime("%s", column), sa.Integer) // seconds
    if dialect == "postgresql":
        # ``date_part`` is a double (``extract`` a numeric, several times slower over a
        # million rows); whole seconds are exact in it, and ``//`` divides the integers.
        return sa.cast(sa.func.floor(sa.func.date_part("epoch", column)), sa.BigInteger) // seconds
    diff = sa.func.timestampdiff(sa.literal_column("SECOND"), sa.literal_column("'1970-01-01 00:00:00'"), column)
    return sa.func.floor(diff / seconds)


def totals(conn: sa.Connection, f: Filters, *, use_rollups: bool) -> Totals:
    """The sums of ``f``'s range without a breakdown: all a "change vs previous" figure needs."""
    out = Totals()
    for source, where in sources(conn, f, use_rollups=use_rollups):
        out.add(_totals(conn.execute(sa.select(*measures(source)).where(*where)).one()))
    return out


def name_of(source: sa.Table, name: str) -> sa.ColumnElement[t.Any]:
    """A provider, model or feature column, '' standing for none (as the rollups store it).

    The '' is inlined, not bound: a grouped expression must read the same in the
    select list and in ``GROUP BY``.
    """
    column = source.c[name]
    if source is usage and column.nullable:
        return sa.func.coalesce(column, sa.literal_column("''"))
    return column


def name_in(source: sa.Table, name: str, values: t.Sequence[str]) -> sa.ColumnElement[bool]:
    """``coalesce(name, '') IN values``, written so an index on ``(name, occurred_at)`` applies.

    ``coalesce(model, '') IN (…)`` hides the column from every index, so a few names
    read the whole range; the plain column (plus ``IS NULL`` when '' is asked for)
    matches the same rows. Works on the ledger, the failures and the rollups.
    """
    column = source.c[name]
    if not column.nullable:
        return column.in_(list(values))
    if "" in values:
        return sa.or_(column.in_(list(values)), column.is_(None))
    return column.in_(list(values))


def _slots(f: Filters, seconds: int) -> sa.TableValuedAlias:
    """The SQL buckets of ``f``'s range, as a ``generate_series`` to join the ledger's rows to.

    PostgreSQL estimates an expression over ``occurred_at`` to have as many values as
    the column, so it sorted every row to group them by day; grouped by a column of this
    series (a few dozen values), the rows are hashed, in parallel.
    """
    first = math.floor(f.since.timestamp()) // seconds
    last = (math.ceil(f.until.timestamp()) - 1) // seconds
    series = sa.func.generate_series(sa.literal(first, sa.BigInteger), sa.literal(last, sa.BigInteger))
    return series.table_valued(sa.column("n", sa.BigInteger), name="slots").render_derived()


def daily(
    conn: sa.Connection,
    f: Filters,
    *,
    use_rollups: bool,
    key: str | None = None,
    names: t.Sequence[str] = (),
) -> dict[tuple[dt.date, str], Totals]:
    """Usage per local day in ``f``'s range, or per day × ``key`` for the given ``names`` only.

    Without ``key`` the name is ''. Rows read: days (or SQL buckets) × ``len(names)``,
    whatever the ledger holds.
    """
    out: dict[tuple[dt.date, str], Totals] = {}
    seconds = bucket_seconds(f)
    for source, where in sources(conn, f, use_rollups=use_rollups):
        found: sa.FromClause = source
        if source is not usage:
            when: sa.ColumnElement[t.Any] = source.c.day
        elif conn.dialect.name == "postgresql":
            slots = _slots(f, seconds)
            when = slots.c.n
            found = usage.join(slots, when == epoch_bucket(usage.c.occurred_at, seconds, conn.dialect.name))
        else:
            when = epoch_bucket(usage.c.occurred_at, seconds, conn.dialect.name)
        keys: list[sa.ColumnElement[t.Any]] = [when.label("slot")]
        if key is not None:
            name = name_of(source, key)
            keys.append(name.label("name"))
            where = [*where, name_in(source, key, names)]
        query = sa.select(*keys, *measures(source)).select_from(found).where(*where).group_by(*keys)
        for row in conn.execute(query):
            if source is usage:
                day = local_day(dt.datetime.fromtimestamp(int(row.slot) * seconds, _UTC), f.zone)
            else:
                day = as_date(row.slot)
            out.setdefault((day, row.name if key is not None else ""), Totals()).add(_totals(row))
    return out


def _union(parts: list[sa.Select[t.Any]]) -> sa.Subquery:
    return (parts[0] if len(parts) == 1 else sa.union_all(*parts)).subquery()


_SUMMED = ("calls", *TOKEN_COLUMNS, "cost_units", "unpriced_calls", "refunds", "refunded_units")
#: Where the cost sits in :func:`_sums`'s list (rankings order by it).
_COST = _SUMMED.index("cost_units")


def _sums(both: sa.Subquery) -> list[sa.Label[t.Any]]:
    return [sa.func.sum(both.c[name]).label(name) for name in _SUMMED]


def ranking(conn: sa.Connection, f: Filters, key: str, *, use_rollups: bool, limit: int) -> list[tuple[str, Totals]]:
    """The ``limit`` costliest providers, models or features in ``f``'s range (then by calls, name).

    Grouped and ranked in SQL over every source; the rest stays in the database (its
    sum is the range's totals minus these).
    """
    parts = []
    for source, where in sources(conn, f, use_rollups=use_rollups):
        name = name_of(source, key).label("name")
        parts.append(sa.select(name, *measures(source)).where(*where).group_by(name))
    both = _union(parts)
    sums = _sums(both)
    rows = conn.execute(
        sa.select(both.c.name, *sums)
        .group_by(both.c.name)
        .order_by(sums[_COST].desc(), sums[0].desc(), both.c.name)
        .limit(limit)
    )
    return [(row.name, _totals(row)) for row in rows]


def unpriced(
    conn: sa.Connection, f: Filters, *, use_rollups: bool, limit: int
) -> tuple[list[tuple[tuple[str, str], int]], int]:
    """The ``limit`` most-called unpriced (provider, model) pairs, and how many pairs there are."""
    parts = []
    for source, where in sources(conn, f, use_rollups=use_rollups):
        provider, model = name_of(source, "provider").label("provider"), name_of(source, "model").label("model")
        if source is usage:
            calls: sa.ColumnElement[t.Any] = sa.func.count()
            where = [*where, usage.c.unpriced.is_(True)]
        else:
            calls = sa.func.sum(source.c.unpriced_calls)
            where = [*where, source.c.unpriced_calls > 0]
        parts.append(sa.select(provider, model, calls.label("calls")).where(*where).group_by(provider, model))
    both = _union(parts)
    calls = sa.func.sum(both.c.calls)
    rows = conn.execute(
        sa.select(both.c.provider, both.c.model, calls.label("calls"), sa.func.count().over().label("pairs"))
        .group_by(both.c.provider, both.c.model)
        .order_by(calls.desc(), both.c.provider, both.c.model)
        .limit(limit)
    ).all()
    return [((row.provider, row.model), int(row.calls)) for row in rows], int(rows[0].pairs) if rows else 0


def cached_pairs(
    conn: sa.Connection, f: Filters, *, use_rollups: bool, limit: int
) -> list[tuple[tuple[str, str], int]]:
    """The ``limit`` (provider, model) pairs with the most cached input tokens (then by name).

    Summed over the rows (or rollup days) that have some: a refund's cached tokens are
    negative and do not lower its pair's figure.
    """
    parts = []
    for source, where in sources(conn, f, use_rollups=use_rollups):
        provider, model = name_of(source, "provider"), name_of(source, "model")
        parts.append(
            sa.select(
                provider.label("provider"), model.label("model"), sa.func.sum(source.c.cached_input_tokens).label("c")
            )
            .where(*where, source.c.cached_input_tokens > 0)
            .group_by(provider, model)
        )
    both = _union(parts)
    cached = sa.func.sum(both.c.c)
    rows = conn.execute(
        sa.select(both.c.provider, both.c.model, cached.label("cached"))
        .group_by(both.c.provider, both.c.model)
        .order_by(cached.desc(), both.c.provider, both.c.model)
        .limit(limit)
    )
    return [((row.provider, row.model), int(row.cached or 0)) for row in rows]


def billables_in(kind: t.Any, ident: t.Any, only: t.Collection[tuple[str, str]]) -> sa.ColumnElement[bool]:
    """``(kind, ident) IN only`` as ``kind = … AND ident IN (…)`` per type.

    A row-value ``IN`` is no index condition, so it read every row of the range; this
    walks the ``(billable_type, billable_id, …)`` indexes of the ledger and the rollups.
    """
    ids: dict[str, list[str]] = {}
    for billable_type, billable_id in only:
        ids.setdefault(billable_type, []).append(billable_id)
    return sa.or_(*(sa.and_(kind == name, ident.in_(sorted(values))) for name, values in sorted(ids.items())))


def top_billables(conn: sa.Connection, f: Filters, *, use_rollups: bool, limit: int = 10) -> list[dict[str, t.Any]]:
    """The billables that cost the most in ``f``'s range, ranked in SQL over every source.

    Ranked on their cost alone (:func:`billable_ranking`), then summed in full for the
    ``limit`` found: every billable's eleven sums were most of the time of this query
    (60 ms over a month of the billables rollup at 1M calls).
    """
    top = billable_ranking(conn, f, use_rollups=use_rollups, limit=limit)
    if not top:
        return []
    totals = {billable: Totals() for billable in top}
    for source, where in sources(conn, f, use_rollups=use_rollups, by_billable=True):
        kind, ident = source.c.billable_type, source.c.billable_id
        present = kind.is_not(None) if source is usage else kind != ""
        query = sa.select(kind, ident, *measures(source)).where(*where, present, billables_in(kind, ident, top))
        for row in conn.execute(query.group_by(kind, ident)):
            totals[(row.billable_type, row.billable_id)].add(_totals(row))
    return [{"billable": billable, "totals": totals[billable]} for billable in top]


def billable_ranking(conn: sa.Connection, f: Filters, *, use_rollups: bool, limit: int) -> list[tuple[str, str]]:
    """The ``limit`` billables that cost the most in ``f``'s range (then by type, id)."""
    parts = []
    for source, where in sources(conn, f, use_rollups=use_rollups, by_billable=True):
        kind, ident = source.c.billable_type, source.c.billable_id
        present = kind.is_not(None) if source is usage else kind != ""
        units = sa.func.sum(sa.type_coerce(source.c.total_cost, sa.BigInteger)).label("cost_units")
        parts.append(sa.select(kind, ident, units).where(*where, present).group_by(kind, ident))
    both = _union(t.cast(list[sa.Select[t.Any]], parts))
    cost = sa.func.sum(both.c.cost_units)
    return [
        (row.billable_type, row.billable_id)
        for row in conn.execute(
            sa.select(both.c.billable_type, both.c.billable_id)
            .group_by(both.c.billable_type, both.c.billable_id)
            .order_by(cost.desc(), both.c.billable_type, both.c.billable_id)
            .limit(limit)
        )
    ]


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
    "kind",
    "adjusts_id",
    "price_source",
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


# -- the overview in a few passes (PostgreSQL) -------------------------------------------------


@dataclasses.dataclass
class Grouped:
    """What :func:`grouped` reads: days, rankings, top billables, unpriced and cached pairs."""

    by_day: dict[dt.date, Totals] = dataclasses.field(default_factory=dict)
    rankings: dict[str, list[tuple[str, Totals]]] = dataclasses.field(default_factory=dict)
    billables: list[dict[str, t.Any]] = dataclasses.field(default_factory=list)
    unpriced: list[tuple[tuple[str, str], int]] = dataclasses.field(default_factory=list)
    unpriced_pairs: int = 0
    #: The (provider, model) pairs with the most cached input tokens, as :func:`cached_pairs` lists them.
    cached: list[tuple[tuple[str, str], int]] = dataclasses.field(default_factory=list)
    #: Cost units per local day of the ``group`` names ranked (the caller keeps those it charts).
    by_day_group: dict[tuple[dt.date, str], int] = dataclasses.field(default_factory=dict)
    #: The top billables' sums per local day (their quota forecasts reuse them).
    billable_days: dict[tuple[str, str], dict[dt.date, Totals]] = dataclasses.field(default_factory=dict)


#: The names :func:`_read_cells` groups by: few distinct values each, so their combinations per
#: day stay few. Models (and billables) can number in the tens of thousands: ranked apart.
#: Thousands of tenants would make the cells many (still exact; nearer a row each).
_CELL_NAMES = ("provider", "feature", "tenant_id")


#: ``work_mem`` for the dashboard's aggregates on PostgreSQL (:func:`tune_for_aggregates`).
AGGREGATE_WORK_MEM = "64MB"


def tune_for_aggregates(conn: sa.Connection) -> None:
    """On PostgreSQL, settings for the dashboard's aggregates, for the rest of ``conn``'s transaction.

    * ``jit = off``: over a large ledger the aggregates cost enough for PostgreSQL to
      JIT-compile them, and compiling took longer than running them (1.7 s of 3.3 s
      for the overview over 600,000 rows).
    * ``work_mem`` :data:`AGGREGATE_WORK_MEM`: with the default 4MB the aggregates'
      hash tables (20,000 models: about 25MB) spill to disk, or PostgreSQL sorts the
      rows instead (4.4 s → 1.9 s for the same overview, when it was one grouped pass).
      It is the server's memory, per query and worker.

    ``SET LOCAL`` ends with the transaction, so a pooled connection keeps its settings.
    """
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("SET LOCAL jit = off")
        conn.exec_driver_sql(f"SET LOCAL work_mem = '{AGGREGATE_WORK_MEM}'")


def one_pass(conn: sa.Connection, f: Filters, *, use_rollups: bool) -> bool:
    """True when :func:`grouped` can answer ``f``: PostgreSQL, and every figure from the ledger.

    The rollups are small already; elsewhere (SQLite, MariaDB: no ``generate_series``, nor
    ``GROUPING SETS`` with ``GROUPING()`` on every version we support) each figure keeps
    its own query.
    """
    if conn.dialect.name != "postgresql":
        return False
    found = sources(conn, f, use_rollups=use_rollups)
    return len(found) == 1 and found[0][0] is usage


def _int_sum(column: t.Any) -> sa.ColumnElement[t.Any]:
    """``SUM`` of a token column as a ``BIGINT``: PostgreSQL sums a ``BIGINT`` into a ``NUMERIC``,
    and summing, ranking and sorting those again at the second level took most of its time.
    Tokens cannot reach 2^63; money is left a ``NUMERIC`` (pico-units could)."""
    return sa.cast(sa.func.sum(column), sa.BigInteger)


def grouped(
    conn: sa.Connection,
    f: Filters,
    *,
    keys: t.Sequence[str],
    limit: int,
    group: str | None = None,
    billables: int = 0,
    unpriced_limit: int = 0,
    cached_limit: int = 0,
) -> Grouped:
    """``f``'s days, the ``limit`` costliest of each of ``keys`` (and ``group``'s cost per day),
    the ``billables`` costliest billables, the ``unpriced_limit`` most-called unpriced pairs and
    the ``cached_limit`` pairs with the most cached tokens, from the ledger (PostgreSQL only,
    :func:`one_pass`).

    The figures and their order are exactly those of :func:`daily`, :func:`ranking`,
    :func:`top_billables`, :func:`unpriced` and :func:`cached_pairs`, in fewer scans, each
    one a plain ``GROUP BY`` PostgreSQL hashes in parallel (``GROUPING SETS`` run in one
    process, and sorted every row by day):

    * the days and the few-valued names (:data:`_CELL_NAMES`) from one aggregate per day ×
      provider × feature × tenant (:func:`_read_cells`), ranked in SQL from those cells;
    * the models, unpriced and cached pairs from one aggregate per (provider, model) of
      the few sums they rank on (:func:`_read_pairs`), then the ranked models' full sums
      per day through the model index (:func:`daily`);
    * the billables ranked on their cost (:func:`billable_ranking`), then summed per day
      through their index (:func:`_billable_days`).
    """
    keys = list(dict.fromkeys(keys))
    out = Grouped(rankings={k: [] for k in keys})
    _read_cells(conn, f, out, keys=[k for k in keys if k != "model"], limit=limit, group=group)
    if "model" in keys or unpriced_limit or cached_limit:
        models = _read_pairs(
            conn,
            f,
            out,
            limit=limit if "model" in keys else 0,
            unpriced_limit=unpriced_limit,
            cached_limit=cached_limit,
        )
        if models:
            sums = {name: Totals() for name in models}
            for (day, name), totals in daily(conn, f, use_rollups=False, key="model", names=models).items():
                sums[name].add(totals)
                if group == "model":
                    out.by_day_group[(day, name)] = totals.cost_units
            out.rankings["model"] = [(name, sums[name]) for name in models]
    if billables:
        top = billable_ranking(conn, f, use_rollups=False, limit=billables)
        out.billable_days = _billable_days(conn, f, top)
        out.billables = [{"billable": b, "totals": Totals.sum(out.billable_days[b].values())} for b in top]
    return out


def _billable_days(
    conn: sa.Connection, f: Filters, billables: list[tuple[str, str]]
) -> dict[tuple[str, str], dict[dt.date, Totals]]:
    """Each of ``billables``' sums per local day of ``f``'s range, through the billable index.

    Their totals are the days' sum, and their quota forecasts reuse the days (they read
    the billables' rows of the current period, most of them these).
    """
    out: dict[tuple[str, str], dict[dt.date, Totals]] = {billable: {} for billable in billables}
    if not billables:
        return out
    seconds = bucket_seconds(f)
    slots = _slots(f, seconds)
    kind, ident = usage.c.billable_type, usage.c.billable_id
    query = (
        sa.select(kind, ident, slots.c.n.label("slot"), *measures(usage))
        .select_from(usage.join(slots, slots.c.n == epoch_bucket(usage.c.occurred_at, seconds, conn.dialect.name)))
        .where(*_conditions(usage, f), billables_in(kind, ident, billables))
        .group_by(kind, ident, slots.c.n)
    )
    for row in conn.execute(query):
        day = local_day(dt.datetime.fromtimestamp(int(row.slot) * seconds, _UTC), f.zone)
        out[(row.billable_type, row.billable_id)].setdefault(day, Totals()).add(_totals(row))
    return out


def _read_cells(
    conn: sa.Connection, f: Filters, out: Grouped, *, keys: list[str], limit: int, group: str | None
) -> None:
    """``out.by_day`` and the rankings of ``keys`` (some of :data:`_CELL_NAMES`), and ``group``'s
    cost per day when it is one of them: one aggregate of the ledger per day × name, then
    grouped again and ranked in SQL (the names sort in the database's collation)."""
    seconds = bucket_seconds(f)
    slots = _slots(f, seconds)
    names = [name for name in _CELL_NAMES if name in keys or name == group]
    columns = [slots.c.n.label("slot"), *(name_of(usage, name).label(name) for name in names)]
    measured = [
        sa.func.count().filter(usage.c.kind == "usage").label("calls"),
        *(_int_sum(usage.c[name]).label(name) for name in TOKEN_COLUMNS),
        sa.func.sum(sa.type_coerce(usage.c.total_cost, sa.BigInteger)).label("cost_units"),
        sa.func.count().filter(sa.and_(usage.c.kind == "usage", usage.c.unpriced)).label("unpriced_calls"),
        # Refunds are ledger rows too: summed into the tokens and cost, never counted as calls.
        sa.func.count().filter(usage.c.kind == "refund").label("refunds"),
        sa.func.sum(-sa.type_coerce(usage.c.total_cost, sa.BigInteger))
        .filter(usage.c.kind == "refund")
        .label("refunded_units"),
    ]
    cells = (
        sa.select(*columns, *measured)
        .select_from(usage.join(slots, slots.c.n == epoch_bucket(usage.c.occurred_at, seconds, conn.dialect.name)))
        .where(*_conditions(usage, f))
        .group_by(*columns)
        .cte("cells")
    )
    sets: list[tuple[str, ...]] = [("slot",), *((k,) for k in keys)]
    if group is not None and group in names:
        sets.append(("slot", group))
    col = {name: cells.c[name] for name in ("slot", *names)}
    used = list(col)
    ids = {names_: sum(1 << (len(used) - 1 - i) for i, n in enumerate(used) if n not in names_) for names_ in sets}
    gid = sa.func.grouping(*col.values()).label("gid")
    sums = [sa.func.sum(cells.c[name]).label(name) for name in _SUMMED]
    level = (
        sa.select(*col.values(), gid, *sums)
        .group_by(sa.func.grouping_sets(*(sa.tuple_(*(col[n] for n in names_)) for names_ in sets)))
        .subquery("level")
    )
    rn = (
        sa.func.row_number()
        .over(
            partition_by=level.c.gid,
            order_by=[level.c.cost_units.desc(), level.c.calls.desc(), *(level.c[n].asc() for n in names)],
        )
        .label("rn")
    )
    ranked = sa.select(level, rn).subquery("ranked")
    by_id = {ids[(k,)]: k for k in keys}
    keep = [ranked.c.gid == ids[("slot",)], *(sa.and_(ranked.c.gid == g, ranked.c.rn <= limit) for g in by_id)]
    day_group = ids.get(("slot", group)) if group in names else None
    if day_group is not None:
        keep.append(ranked.c.gid == day_group)
    query = sa.select(ranked).where(sa.or_(*keep)).order_by(ranked.c.gid, ranked.c.rn)
    for row in conn.execute(query):
        g = int(row.gid)
        if g in by_id:
            key = by_id[g]
            out.rankings[key].append((getattr(row, key), _totals(row)))
            continue
        day = local_day(dt.datetime.fromtimestamp(int(row.slot) * seconds, _UTC), f.zone)
        if g == day_group:
            cell = (day, getattr(row, t.cast(str, group)))
            out.by_day_group[cell] = out.by_day_group.get(cell, 0) + int(row.cost_units or 0)
        else:
            out.by_day.setdefault(day, Totals()).add(_totals(row))


def _read_pairs(
    conn: sa.Connection, f: Filters, out: Grouped, *, limit: int, unpriced_limit: int, cached_limit: int
) -> list[str]:
    """The ``limit`` costliest models (then by calls, name), in order, and ``out``'s unpriced and
    cached pairs: one aggregate of the ledger per (provider, model) of the sums they rank on."""
    provider, model = name_of(usage, "provider").label("provider"), name_of(usage, "model").label("model")
    pairs = (
        sa.select(
            provider,
            model,
            sa.func.count().filter(usage.c.kind == "usage").label("calls"),
            sa.func.sum(sa.type_coerce(usage.c.total_cost, sa.BigInteger)).label("cost_units"),
            sa.func.count().filter(sa.and_(usage.c.kind == "usage", usage.c.unpriced)).label("unpriced_calls"),
            # Cached tokens of the rows that have some: a refund's are negative.
            sa.func.sum(usage.c.cached_input_tokens).filter(usage.c.cached_input_tokens > 0).label("cached_read"),
        )
        .where(*_conditions(usage, f))
        .group_by(provider, model)
        .cte("pairs")
    )
    parts: list[sa.Select[t.Any]] = []

    def part(name: str, query: sa.Select[t.Any], value: t.Any, peers: t.Any, order: list[t.Any], n: int) -> None:
        rn = sa.func.row_number().over(order_by=order)
        inner = query.add_columns(
            sa.literal(name).label("part"),
            sa.cast(value, sa.Numeric).label("value"),
            sa.cast(peers, sa.BigInteger).label("peers"),
            rn.label("rn"),
        )
        parts.append(sa.select(inner.order_by(*order).limit(n).subquery()))

    if limit:
        cost, calls = sa.func.sum(pairs.c.cost_units), sa.func.sum(pairs.c.calls)
        query = sa.select(sa.literal("").label("provider"), pairs.c.model).group_by(pairs.c.model)
        part("model", query, 0, 0, [cost.desc(), calls.desc(), pairs.c.model], limit)
    if unpriced_limit:
        query = sa.select(pairs.c.provider, pairs.c.model).where(pairs.c.unpriced_calls > 0)
        order = [pairs.c.unpriced_calls.desc(), pairs.c.provider, pairs.c.model]
        part("unpriced", query, pairs.c.unpriced_calls, sa.func.count().over(), order, unpriced_limit)
    if cached_limit:
        query = sa.select(pairs.c.provider, pairs.c.model).where(pairs.c.cached_read > 0)
        order = [pairs.c.cached_read.desc(), pairs.c.provider, pairs.c.model]
        part("cached", query, pairs.c.cached_read, 0, order, cached_limit)
    both = _union(parts)
    models: list[str] = []
    for row in conn.execute(sa.select(both).order_by(both.c.part, both.c.rn)):
        if row.part == "model":
            models.append(row.model)
        elif row.part == "unpriced":
            out.unpriced.append(((row.provider, row.model), int(row.value)))
            out.unpriced_pairs = int(row.peers)
        else:
            out.cached.append(((row.provider, row.model), int(row.value)))
    return models
