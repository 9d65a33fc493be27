"""Monthly usage reports and the plans table, for ``flask ai-metering report`` and ``plans``.

Totals are sums of raw pico-unit integers, converted to ``Decimal`` once, so a
report equals the ledger to the last digit. With ``AI_METERING_AGGREGATION_TABLES``
the report reads the daily rollups, except for the days on which usage was
written since the last ``aggregate`` run, which it reads from the ledger: it
stays exact while ``aggregate`` lags behind. Months are calendar months in
``AI_METERING_TIMEZONE``, the zone calendar quota periods and rollup days use.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import typing as t
from decimal import ROUND_HALF_EVEN
from decimal import Decimal
from zoneinfo import ZoneInfo

import sqlalchemy as sa

from ..models import Plan
from ..models import Subscription
from ..models import utcnow
from ..money import from_units
from ..reporting import budgets as budget_report
from ..reporting.filters import Filters
from ..reporting.forecast import daily_by_billable
from ..reporting.forecast import project
from ..reporting.queries import Source
from ..reporting.queries import sources
from ..reporting.rollups import measures

if t.TYPE_CHECKING:
    from ..runtime import Runtime

plans = Plan.__table__
subs = Subscription.__table__

#: The sections of a report, and the columns each one groups by.
GROUPS: dict[str, tuple[str, ...]] = {
    "by_billable": ("billable_type", "billable_id"),
    "by_provider": ("provider",),
    "by_model": ("provider", "model"),
    "by_feature": ("feature",),
}
#: ``total_cost`` is net of refunds; ``refunded_cost`` is what refunds gave back (positive).
MEASURES = ("calls", "input_tokens", "output_tokens", "total_tokens", "total_cost", "refunded_cost")
_MONEY = ("total_cost", "refunded_cost")
#: Each measure's label in :func:`~flask_ai_metering.reporting.rollups.measures`.
_SUMMED = {name: {"total_cost": "cost_units", "refunded_cost": "refunded_units"}.get(name, name) for name in MEASURES}
_EMPTY = ""


def parse_month(month: str | None) -> dt.date:
    """The first day of ``month`` (``YYYY-MM``), or of the current UTC month when None.

    :raises ValueError: with a message fit for the command line.
    """
    if month is None:
        today = utcnow().date()
        return today.replace(day=1)
    try:
        parsed = dt.datetime.strptime(month, "%Y-%m")
    except ValueError:
        raise ValueError(f"expected YYYY-MM (e.g. 2026-01), got {month!r}") from None
    if len(month) != 7:
        raise ValueError(f"expected YYYY-MM (e.g. 2026-01), got {month!r}")
    return parsed.date()


def month_window(start: dt.date, timezone: str) -> tuple[dt.datetime, dt.datetime]:
    """UTC instants of the local midnights that open ``start``'s month and the next."""
    zone = ZoneInfo(timezone)
    following = (start.replace(day=28) + dt.timedelta(days=4)).replace(day=1)
    return (
        dt.datetime.combine(start, dt.time(), zone).astimezone(dt.timezone.utc),
        dt.datetime.combine(following, dt.time(), zone).astimezone(dt.timezone.utc),
    )


def build_report(
    rt: Runtime,
    start: dt.date,
    billable: tuple[str, str] | None = None,
    tenant: str | None = None,
    *,
    forecast: bool = False,
    budgets: bool = False,
    now: dt.datetime | None = None,
) -> dict[str, t.Any]:
    """Tokens, cost and calls of the month opening at ``start``, by billable, provider, model and feature.

    Money is a decimal string with 12 places; ``billable`` and ``tenant`` narrow
    every section and the totals alike. With ``forecast`` a ``forecast`` section
    projects the month's total per billable and overall, as of ``now``
    (:mod:`~flask_ai_metering.reporting.forecast`). With ``budgets`` a ``by_budget``
    section gives each budget's usage over its periods in the month, from its counters
    (:func:`~flask_ai_metering.reporting.budgets.report_section`).
    """
    begin, end = month_window(start, rt.settings.timezone)
    following = (start.replace(day=28) + dt.timedelta(days=4)).replace(day=1)
    month = Filters(
        start=start,
        end=following - dt.timedelta(days=1),
        zone=ZoneInfo(rt.settings.timezone),
        billable=billable,
        tenant=tenant,
    )

    def work(conn: sa.Connection) -> dict[str, t.Any]:
        # The dashboard's sources: the smallest rollup that has the keys, and the ledger
        # for the days written since the last ``aggregate`` run.
        use = rt.settings.aggregation_tables
        overall = sources(conn, month, use_rollups=use)
        by_billable = sources(conn, month, use_rollups=use, by_billable=True)
        report: dict[str, t.Any] = {"period": {"start": begin.isoformat(), "end": end.isoformat()}}
        totals = _grouped(conn, overall, ())
        report["totals"] = totals[0] if totals else _row({}, ())
        for section, keys in GROUPS.items():
            report[section] = _grouped(conn, by_billable if "billable_id" in keys else overall, keys)
        if forecast:
            report["forecast"] = _forecast(conn, month, begin, end, now or utcnow(), use)
        if budgets:
            report["by_budget"] = budget_report.report_section(conn, begin, end, billable)
        return report

    return rt.store.run(work, write=False)


def _grouped(conn: sa.Connection, parts: list[Source], keys: tuple[str, ...]) -> list[dict[str, t.Any]]:
    """Sum every source by ``keys`` (the rollups' empty strings read as None), biggest cost first."""
    merged: dict[tuple[t.Any, ...], dict[str, int]] = {}
    for source, where in parts:
        columns = [source.c[k] for k in keys]
        for row in conn.execute(sa.select(*columns, *measures(source)).where(*where).group_by(*columns)):
            if not row.calls and not row.refunded_units:
                continue
            key = tuple(None if v == _EMPTY else v for v in row[: len(keys)])
            into = merged.setdefault(key, dict.fromkeys(MEASURES, 0))
            for name, summed in _SUMMED.items():
                into[name] += int(getattr(row, summed) or 0)
    ordered = sorted(
        merged.items(), key=lambda item: (-item[1]["total_cost"], -item[1]["total_tokens"], _sort(item[0]))
    )
    return [_row(dict(zip(keys, key, strict=True)), keys, sums) for key, sums in ordered]


def _forecast(
    conn: sa.Connection, month: Filters, begin: dt.datetime, end: dt.datetime, now: dt.datetime, use: bool
) -> dict[str, t.Any]:
    """Each billable's projected month total, and their sum, biggest projected cost first."""
    rows: list[dict[str, t.Any]] = []
    total_tokens = total_units = Decimal(0)
    for key, daily in daily_by_billable(conn, month, use_rollups=use).items():
        tokens = project(daily.tokens, start=begin, end=end, now=now, zone=month.zone)
        cost = project(daily.cost_units, start=begin, end=end, now=now, zone=month.zone)
        total_tokens += tokens.projected
        total_units += cost.projected
        rows.append(
            {
                "billable": f"{key[0]}:{key[1]}",
                "billable_type": key[0],
                "billable_id": key[1],
                "total_tokens": int(tokens.used),
                "total_cost": money(int(cost.used)),
                "projected_total_tokens": _whole(tokens.projected),
                "projected_total_cost": money(_whole(cost.projected)),
            }
        )
    rows.sort(key=lambda r: (-Decimal(r["projected_total_cost"]), -r["projected_total_tokens"], r["billable"]))
    return {
        "as_of": now.isoformat(),
        "totals": {"projected_total_tokens": _whole(total_tokens), "projected_total_cost": money(_whole(total_units))},
        "by_billable": rows,
    }


def _whole(value: Decimal) -> int:
    return int(value.to_integral_value(rounding=ROUND_HALF_EVEN))


def _sort(key: tuple[t.Any, ...]) -> tuple[str, ...]:
    return tuple("" if v is None else str(v) for v in key)


def _row(labels: dict[str, t.Any], keys: tuple[str, ...], sums: dict[str, int] | None = None) -> dict[str, t.Any]:
    sums = sums or dict.fromkeys(MEASURES, 0)
    row = dict(labels)
    if "billable_type" in keys:
        row = {"billable": f"{labels['billable_type']}:{labels['billable_id']}", **row}
    row.update({n: money(sums[n]) if n in _MONEY else sums[n] for n in MEASURES})
    return row


def money(units: int) -> str:
    """Pico-units as a plain decimal string with all 12 places (never an exponent)."""
    return format(from_units(units), "f")


# -- rendering --------------------------------------------------------------------------------

_SECTION_TITLES = {
    "by_billable": "By billable",
    "by_provider": "By provider",
    "by_model": "By model",
    "by_feature": "By feature",
}
_CSV_KEYS = ("billable_type", "billable_id", "provider", "model", "feature")


def render(report: dict[str, t.Any], fmt: str) -> str:
    """The report as ``json`` (the machine contract), ``csv`` (one row per group) or a ``table``."""
    if fmt == "json":
        return json.dumps(report, indent=2)
    if fmt == "csv":
        return _csv(report)
    if fmt == "table":
        return _table(report)
    raise ValueError(f"unknown report format {fmt!r}: use table, csv or json")


def _csv(report: dict[str, t.Any]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    extra = budget_report.CSV_COLUMNS if "by_budget" in report else ()
    writer.writerow(["section", *_CSV_KEYS, *MEASURES, *extra])
    sections = [("totals", [report["totals"]])] + [(s, report[s]) for s in GROUPS]
    for section, rows in sections:
        for row in rows:
            keys = [_defuse(row.get(k)) for k in _CSV_KEYS]
            writer.writerow([section, *keys, *(row[m] for m in MEASURES), *("" for _ in extra)])
    if "forecast" in report:  # projected month totals: only the total columns are filled
        forecast = report["forecast"]
        for row in [forecast["totals"], *forecast["by_billable"]]:
            keys = [_defuse(row.get(k)) for k in _CSV_KEYS]
            projected = [row["projected_total_tokens"], row["projected_total_cost"]]
            writer.writerow(["forecast", *keys, "", "", "", *projected, *("" for _ in extra)])
    for row in report.get("by_budget", ()):  # requests fill ``calls``; the budget's own columns follow
        keys = [_defuse(row.get(k)) for k in _CSV_KEYS]
        sums = [row["requests"], "", "", row["total_tokens"], row["total_cost"], ""]
        writer.writerow(["by_budget", *keys, *sums, *(_defuse(row[k]) for k in extra)])
    return out.getvalue().rstrip("\n")


def _defuse(value: t.Any) -> str:
    """Neutralise spreadsheet formulas in free-text cells (CSV injection)."""
    text = "" if value is None else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def _table(report: dict[str, t.Any]) -> str:
    period = report["period"]
    lines = [f"Usage from {period['start']} to {period['end']}", ""]
    lines += _aligned(["", *_HEADERS], [["Total", *_cells(report["totals"])]])
    for section, keys in GROUPS.items():
        lines += ["", _SECTION_TITLES[section]]
        label = " / ".join(k for k in keys if k != "billable_type").replace("billable_id", "billable")
        body = [[_label(row, keys), *_cells(row)] for row in report[section]]
        lines += _aligned([label, *_HEADERS], body) if body else ["  (no usage)"]
    if "forecast" in report:
        lines += _forecast_table(report["forecast"])
    if "by_budget" in report:
        lines += budget_report.table_lines(report["by_budget"])
    return "\n".join(lines)


def _forecast_table(forecast: dict[str, t.Any]) -> list[str]:
    lines = ["", f"Forecast: projected month total (as of {forecast['as_of']})"]
    totals = forecast["totals"]
    body = [
        [
            row["billable"],
            f"{row['total_tokens']:,}",
            f"{row['projected_total_tokens']:,}",
            _amount(row["total_cost"]),
            _amount(row["projected_total_cost"]),
        ]
        for row in forecast["by_billable"]
    ]
    body.append(["Total", "", f"{totals['projected_total_tokens']:,}", "", _amount(totals["projected_total_cost"])])
    return lines + _aligned(["billable", "tokens so far", "projected tokens", "cost so far", "projected cost"], body)


_HEADERS = ["calls", "input", "output", "total tokens", "cost", "refunds"]


def _label(row: dict[str, t.Any], keys: tuple[str, ...]) -> str:
    if "billable" in row:
        return str(row["billable"])
    return "/".join("(none)" if row[k] is None else str(row[k]) for k in keys)


def _cells(row: dict[str, t.Any]) -> list[str]:
    return [_amount(row[m]) if m in _MONEY else f"{row[m]:,}" for m in MEASURES]


def _amount(text: str) -> str:
    """A 12-place decimal string trimmed to its significant places (at least 2)."""
    whole, _, fraction = text.rstrip("0").partition(".")
    return f"{whole}.{fraction.ljust(2, '0')}"


def _aligned(header: list[str], body: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        return "  " + "  ".join([first, *(c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))]).rstrip()

    return [line(header), *(line(r) for r in body)]


def plans_table(rt: Runtime, now: dt.datetime | None = None) -> str:
    """Every plan with its limits, its trial, and how many billables are on it (ended subscriptions not counted)."""
    at = now or utcnow()
    active = sa.and_(
        subs.c.plan_id == plans.c.id,
        sa.or_(subs.c.ends_at.is_(None), subs.c.ends_at > at, subs.c.grace_period_ends_at > at),
    )
    count = sa.select(sa.func.count()).select_from(subs).where(active).scalar_subquery()
    trialling = (
        sa.select(sa.func.count())
        .select_from(subs)
        .where(active, subs.c.trial_ends_at > sa.literal(at, subs.c.trial_ends_at.type))
        .scalar_subquery()
    )
    with rt.store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(
                plans.c.slug,
                plans.c.name,
                plans.c.token_limit,
                sa.type_coerce(plans.c.cost_limit, sa.BigInteger).label("cost_units"),
                plans.c.period,
                plans.c.overage_price_per_1k_tokens,
                plans.c.features,
                plans.c.is_active,
                plans.c.trial_days,
                plans.c.trial_token_limit,
                sa.type_coerce(plans.c.trial_cost_limit, sa.BigInteger).label("trial_cost_units"),
                count.label("subscribers"),
                trialling.label("in_trial"),
            ).order_by(plans.c.slug)
        ).all()
    if not rows:
        return "No plans yet."
    body = [
        [
            row.slug,
            row.name,
            "unlimited" if row.token_limit is None else f"{row.token_limit:,}",
            "unlimited" if row.cost_units is None else _plain(from_units(row.cost_units)),
            row.period or rt.settings.period_type,
            "-" if row.overage_price_per_1k_tokens is None else _plain(row.overage_price_per_1k_tokens),
            ", ".join(row.features) if row.features else "all",
            "yes" if row.is_active else "no",
            _trial(row),
            str(row.subscribers),
            str(row.in_trial),
        ]
        for row in rows
    ]
    header = ["slug", "name", "tokens", "cost", "period", "overage/1k", "features", "active", "trial"]
    header += ["subscribers", "trialling"]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *body])


def _trial(row: t.Any) -> str:
    """``14d``, with the trial's own limits when it has any (``14d: 10,000 tokens, 1.00``)."""
    if not row.trial_days:
        return "-"
    limits = []
    if row.trial_token_limit is not None:
        limits.append(f"{row.trial_token_limit:,} tokens")
    if row.trial_cost_units is not None:
        limits.append(_plain(from_units(row.trial_cost_units)))
    return f"{row.trial_days}d" + (": " + ", ".join(limits) if limits else "")


def _plain(amount: t.Any) -> str:
    text = format(amount.normalize(), "f")
    return text if "." in text else text + ".00"
