"""Period-end forecasts: a weighted run rate that projects a steady rate exactly, and ``report --forecast``."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest

from flask_ai_metering.ops.reports import build_report
from flask_ai_metering.reporting.forecast import project
from flask_ai_metering.reporting.forecast import weighted_rate
from flask_ai_metering.reporting.rollups import aggregate
from tests.conftest import AppFactory

UTC = dt.timezone.utc
ZONE = ZoneInfo("UTC")
MARCH = (dt.datetime(2025, 3, 1, tzinfo=UTC), dt.datetime(2025, 4, 1, tzinfo=UTC))


def days(first: dt.date, n: int) -> list[dt.date]:
    return [first + dt.timedelta(days=i) for i in range(n)]


def within_one_percent(actual: Decimal | int, expected: Decimal | int) -> bool:
    return abs(Decimal(actual) - Decimal(expected)) <= Decimal(expected) / 100


def test_a_steady_rate_projects_to_the_arithmetic_answer():
    start, end = MARCH
    daily = {day: 1000 for day in days(dt.date(2025, 3, 1), 10)}
    daily[dt.date(2025, 3, 11)] = 500  # half of today, at noon
    now = dt.datetime(2025, 3, 11, 12, tzinfo=UTC)

    p = project(daily, start=start, end=end, now=now, zone=ZONE)

    assert p.used == 10_500
    assert p.rate_per_day == pytest.approx(Decimal(1000))
    # arithmetic: 10,500 used + 1,000/day × 20.5 days left = 31,000
    assert within_one_percent(p.projected, 31_000)
    assert abs(p.projected - 31_000) < Decimal("0.001")


def test_the_rate_leans_toward_recent_days():
    today = dt.date(2025, 3, 11)
    daily = {day: 100 for day in days(dt.date(2025, 3, 1), 7)} | {day: 1000 for day in days(dt.date(2025, 3, 8), 3)}
    rate = weighted_rate(daily, days(dt.date(2025, 3, 1), 10), today)
    plain_mean = Decimal(sum(daily.values())) / 10
    assert plain_mean < rate < 1000


def test_the_first_day_uses_the_part_of_today_elapsed():
    start, end = MARCH
    p = project({dt.date(2025, 3, 1): 250}, start=start, end=end, now=start + dt.timedelta(hours=6), zone=ZONE)
    assert p.rate_per_day == 1000
    assert p.projected == 31_000


def test_the_day_a_limit_is_reached():
    start, end = MARCH
    daily = {day: 1000 for day in days(dt.date(2025, 3, 1), 10)}
    now = dt.datetime(2025, 3, 11, tzinfo=UTC)

    assert project(daily, start=start, end=end, now=now, zone=ZONE, limit=20_000).reaches_limit_on == dt.date(
        2025, 3, 21
    )
    assert project(daily, start=start, end=end, now=now, zone=ZONE, limit=50_000).reaches_limit_on is None
    assert project(daily, start=start, end=end, now=now, zone=ZONE, limit=9_000).reaches_limit_on == dt.date(
        2025, 3, 11
    )
    # A closed period projects what it used.
    closed = project(daily, start=start, end=end, now=end + dt.timedelta(days=3), zone=ZONE)
    assert closed.projected == closed.used == 10_000


def record_steady(meter, billable: tuple[str, str], per_day: int) -> None:
    rows = [
        {
            "billable": billable,
            "provider": "openai",
            "model": "gpt-4o-mini",
            "usage": {"input_tokens": per_day // 2, "output_tokens": per_day // 2},
            "occurred_at": dt.datetime.combine(day, dt.time(9), UTC),
        }
        for day in days(dt.date(2025, 3, 1), 10)
    ]
    meter.record_batch(rows)


@pytest.mark.parametrize("rollups", [False, True])
def test_report_forecast_of_a_steady_billable(backend: str, make_app: AppFactory, rollups: bool):
    app, _, meter = make_app(AI_METERING_AGGREGATION_TABLES=rollups)
    with app.app_context():
        record_steady(meter, ("Team", "steady"), 1000)
        record_steady(meter, ("Team", "small"), 10)
        rt = meter.runtime()
        if rollups:
            aggregate(rt)
        now = dt.datetime(2025, 3, 11, tzinfo=UTC)
        report = build_report(rt, dt.date(2025, 3, 1), forecast=True, now=now)

    forecast = report["forecast"]
    assert forecast["as_of"] == now.isoformat()
    [steady, small] = forecast["by_billable"]
    assert steady["billable"] == "Team:steady" and small["billable"] == "Team:small"
    assert steady["total_tokens"] == 10_000
    # 10 days at 1,000 a day, 21 days left: 31,000 tokens, and the cost in proportion.
    assert within_one_percent(steady["projected_total_tokens"], 31_000)
    cost_so_far = Decimal(steady["total_cost"])
    assert cost_so_far > 0
    assert within_one_percent(Decimal(steady["projected_total_cost"]), cost_so_far * Decimal("3.1"))
    assert (
        forecast["totals"]["projected_total_tokens"]
        == steady["projected_total_tokens"] + small["projected_total_tokens"]
    )


def test_cli_report_forecast(make_app: AppFactory):
    app, _, meter = make_app()
    with app.app_context():
        record_steady(meter, ("Team", "steady"), 1000)
    runner = app.test_cli_runner()
    result = runner.invoke(args=["ai-metering", "report", "--month", "2025-03", "--forecast", "--format", "json"])
    assert result.exit_code == 0, result.output
    forecast = json.loads(result.stdout)["forecast"]
    [row] = forecast["by_billable"]
    # The month is over: the projection is what it used.
    assert row["projected_total_tokens"] == row["total_tokens"] == 10_000

    table = runner.invoke(args=["ai-metering", "report", "--month", "2025-03", "--forecast"])
    assert table.exit_code == 0 and "Forecast: projected month total" in table.stdout and "Team:steady" in table.stdout
    csv = runner.invoke(args=["ai-metering", "report", "--month", "2025-03", "--forecast", "--format", "csv"])
    assert csv.exit_code == 0 and "\nforecast,Team,steady," in csv.stdout
    plain = runner.invoke(args=["ai-metering", "report", "--month", "2025-03", "--format", "json"])
    assert "forecast" not in json.loads(plain.stdout)
