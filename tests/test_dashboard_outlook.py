"""Issue 16's dashboard additions: error rate, cache savings, user and tenant tables, forecasts, auto-refresh."""

from __future__ import annotations

import datetime as dt
import typing as t
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa

from flask_ai_metering.dashboard import outlook
from flask_ai_metering.dashboard import pages
from flask_ai_metering.models import Failure
from flask_ai_metering.models import Usage
from flask_ai_metering.reporting.filters import Filters
from flask_ai_metering.reporting.filters import parse_filters
from flask_ai_metering.reporting.forecast import daily_by_billable
from flask_ai_metering.reporting.forecast import project
from flask_ai_metering.reporting.rollups import local_day
from tests.conftest import AppFactory
from tests.conftest import add_plan

UTC = dt.timezone.utc
PRICES = {
    "openai": {
        "models": {
            "gpt-4o-mini": {
                "input_price_per_1k": "0.00015",
                "output_price_per_1k": "0.0006",
                "cached_input_price_per_1k": "0.000075",
            }
        }
    }
}


class Boom(Exception):
    status_code = 503


def fail(meter: t.Any, billable: tuple[str, str], model: str) -> None:
    def call() -> t.Any:
        raise Boom("upstream down")

    with pytest.raises(Boom):
        meter.call(call, billable=billable, provider="openai", model=model, feature="chat", max_tokens=10)


def ledger(db: t.Any) -> list[t.Any]:
    with db.engine.connect() as conn:
        return list(conn.execute(sa.select(Usage.__table__)))


def test_a_failed_call_is_in_the_error_rate_and_never_in_the_ledger(backend: str, make_app: AppFactory) -> None:
    app, db, meter = make_app(AI_METERING_PROVIDERS=PRICES)
    meter.dashboard_authorizer(lambda user: True)
    with app.app_context():
        for _ in range(3):
            meter.record(billable=("Team", "1"), provider="openai", model="gpt-4o-mini", usage={"input_tokens": 10})
        before = ledger(db)
        fail(meter, ("Team", "1"), "gpt-4o-mini")
        assert ledger(db) == before  # nothing reached the ledger
        with db.engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(Failure.__table__)).scalar_one() == 1
        data = pages.overview(meter.runtime(), parse_filters({}, "UTC"))
        assert data.health.failed == 1
        [row] = data.health.by_model
        assert (row.model, row.calls, row.failed, row.error_rate) == ("gpt-4o-mini", 3, 1, 25.0)
        assert sum(data.health.failed_by_day.values()) == 1
        today = local_day(dt.datetime.now(dt.timezone.utc), ZoneInfo("UTC"))
        assert data.health.recorded_by_day[(today, "gpt-4o-mini")] == 3
        assert data.health.error_rate(today, "gpt-4o-mini") == 25.0  # the day's rate, for the chart
        assert data.current.totals.calls == 3  # money totals never mix with failures
        page = app.test_client().get("/ai-metering/").get_data(as_text=True)
        rate = page[page.index('data-test="error-rate"') :]
        assert "25.00%" in rate[: rate.index("</div></div>")]
        health = page[page.index('data-test="health"') :]
        assert "gpt-4o-mini" in health[: health.index("</table>")]


def test_cache_savings_use_the_price_book(make_app: AppFactory) -> None:
    app, _, meter = make_app(AI_METERING_PROVIDERS=PRICES)
    meter.dashboard_authorizer(lambda user: True)
    with app.app_context():
        meter.record(
            billable=("Team", "1"),
            provider="openai",
            model="gpt-4o-mini",
            usage={"input_tokens": 5000, "cached_input_tokens": 4000, "output_tokens": 10},
        )
        data = pages.overview(meter.runtime(), parse_filters({}, "UTC"))
        # 4,000 cached tokens × (0.00015 − 0.000075) per 1K
        assert data.savings.amount == Decimal("0.0003")
        assert data.savings.cached_tokens == data.savings.priced_tokens == 4000


def test_user_and_tenant_tables_match_the_ledger(backend: str, make_app: AppFactory) -> None:
    app, db, meter = make_app(AI_METERING_PROVIDERS=PRICES)
    meter.dashboard_authorizer(lambda user: True)
    with app.app_context():
        meter.record_batch(
            [
                {
                    "billable": ("Team", str(i % 2)),
                    "user": ("User", str(i % 5)),
                    "tenant": ("Org", f"t{i % 3}") if i % 4 else None,
                    "provider": "openai",
                    "model": "gpt-4o-mini",
                    "usage": {"input_tokens": 100 * i + 1, "output_tokens": i},
                }
                for i in range(40)
            ]
        )
        rows = ledger(db)

        def expected(key: str, keep: t.Callable[[t.Any], bool]) -> dict[str, tuple[int, int, int]]:
            out: dict[str, list[int]] = {}
            for row in rows:
                if keep(row):
                    cell = out.setdefault(getattr(row, key) or "", [0, 0, 0])
                    cell[0] += 1
                    cell[1] += row.total_tokens
                    cell[2] += int(row.total_cost * 10**12)
            return {k: (v[0], v[1], v[2]) for k, v in out.items()}

        def shown(ranking: pages.Ranking) -> dict[str, tuple[int, int, int]]:
            return {n: (tot.calls, tot.total_tokens, tot.cost_units) for n, tot in pages.ranked(ranking)}

        rt = meter.runtime()
        data = pages.overview(rt, parse_filters({}, "UTC"))
        assert shown(data.by_tenant) == expected("tenant_id", lambda r: True)
        assert data.by_user is None  # users need a billable or tenant filter (no rollup holds them)
        narrowed = pages.overview(rt, parse_filters({"tenant": "t1"}, "UTC"))
        assert narrowed.by_user is not None
        assert shown(narrowed.by_user) == expected("user_id", lambda r: r.tenant_id == "t1")
        mine = pages.billable_page(rt, ("Team", "1"), parse_filters({}, "UTC"))
        assert mine.by_user is not None
        assert shown(mine.by_user) == expected("user_id", lambda r: r.billable_id == "1")
        page = app.test_client().get("/ai-metering/billables/Team/1").get_data(as_text=True)
        assert 'data-test="by-user"' in page


def test_the_billable_page_forecast_is_reporting_forecast(
    make_app: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, db, meter = make_app(AI_METERING_PROVIDERS=PRICES)
    meter.dashboard_authorizer(lambda user: True)
    now = dt.datetime.now(UTC).replace(microsecond=0)
    monkeypatch.setattr(outlook, "utcnow", lambda: now)
    with app.app_context():
        add_plan(db, slug="small", token_limit=10**9, cost_limit=None)
        db.session.remove()
        meter.subscribe(("Team", "1"), "small")
        check = meter.check(("Team", "1"))
        start = check.period_start
        days = max(1, (now - start).days)
        # A steady run rate over the period so far: a limit a few days past today's usage.
        meter.record_batch(
            [
                {
                    "billable": ("Team", "1"),
                    "provider": "openai",
                    "model": "gpt-4o-mini",
                    "usage": {"input_tokens": 100_000},
                    "occurred_at": max(start, now - dt.timedelta(days=n, hours=1)),
                }
                for n in range(days)
            ]
        )
        zone = ZoneInfo("UTC")
        check = meter.check(("Team", "1"))
        rt = meter.runtime()
        data = pages.billable_page(rt, ("Team", "1"), parse_filters({}, "UTC"))
        period = Filters(
            start=local_day(check.period_start, zone),
            end=local_day(check.period_end - dt.timedelta(microseconds=1), zone),
            zone=zone,
            billable=("Team", "1"),
        )
        with db.engine.connect() as conn:
            daily = daily_by_billable(conn, period, use_rollups=False)[("Team", "1")]
        expected = project(
            daily.tokens, start=check.period_start, end=check.period_end, now=now, zone=zone, limit=check.token_limit
        )
        assert data.forecast is not None
        assert data.forecast.tokens == expected
        assert data.forecast.tokens.used == check.used_tokens


def test_near_limit_list_says_when_the_limit_is_reached(make_app: AppFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    app, db, meter = make_app(AI_METERING_PROVIDERS=PRICES)
    meter.dashboard_authorizer(lambda user: True)
    with app.app_context():
        add_plan(db, slug="tiny", token_limit=1000, cost_limit=None)
        db.session.remove()
        meter.subscribe(("Team", "9"), "tiny")
        period = meter.check(("Team", "9"))
        # Halfway through the period, 900 of 1,000 tokens used at a steady rate: the
        # projection crosses the limit before the period ends, whatever today's date.
        middle = period.period_start + (period.period_end - period.period_start) / 2
        monkeypatch.setattr(outlook, "utcnow", lambda: middle)
        n = max(1, (middle - period.period_start).days)
        meter.record_batch(
            [
                {
                    "billable": ("Team", "9"),
                    "provider": "openai",
                    "model": "gpt-4o-mini",
                    "usage": {"input_tokens": 900 // n},
                    "occurred_at": period.period_start + dt.timedelta(days=k, hours=1),
                }
                for k in range(n)
            ]
        )
        data = pages.overview(meter.runtime(), parse_filters({}, "UTC"))
        [(billable, check)] = data.near_limits
        fc = data.forecasts[billable]
        assert fc.reaches_limit_on is not None
        page = app.test_client().get("/ai-metering/").get_data(as_text=True)
        assert f"reaches its limit on {fc.reaches_limit_on.isoformat()}" in page
        billable_page = app.test_client().get("/ai-metering/billables/Team/9").get_data(as_text=True)
        assert f"reaches its limit on {fc.reaches_limit_on.isoformat()}" in billable_page


def test_auto_refresh_is_off_by_default(make_app: AppFactory) -> None:
    app, _, meter = make_app()
    meter.dashboard_authorizer(lambda user: True)
    client = app.test_client()
    assert 'http-equiv="refresh"' not in client.get("/ai-metering/").get_data(as_text=True)
    assert '<meta http-equiv="refresh" content="60">' in client.get("/ai-metering/?refresh=60").get_data(as_text=True)
    assert client.get("/ai-metering/?refresh=7").status_code == 400


def test_percentiles_read_off_the_latency_histogram() -> None:
    assert outlook.percentile({}, 0.5) is None
    # 10 calls under 50 ms and 10 in [100, 200): the median is the top of the first bucket.
    histogram = {0: 10, 2: 10}
    assert outlook.percentile(histogram, 0.5) == 50.0
    assert outlook.percentile(histogram, 0.95) == 190.0  # 9 of the 10 calls into [100, 200)
    assert outlook.percentile({len(outlook.LATENCY_BOUNDS_MS): 4}, 0.5) == 90000.0  # the open bucket


def test_latency_per_model_comes_from_the_metered_durations(backend: str, make_app: AppFactory) -> None:
    app, db, meter = make_app(AI_METERING_DASHBOARD_ENABLED=True)
    meter.dashboard_authorizer(lambda user: True)
    with app.app_context():
        for _ in range(20):
            meter.call(lambda: None, billable=("Team", "1"), provider="manual", model="m", usage={"input_tokens": 1})
        usage = Usage.__table__
        with meter.runtime().store.engine.begin() as conn:
            ids = list(conn.execute(sa.select(usage.c.id).order_by(usage.c.id)).scalars())
            for index, usage_id in enumerate(ids):  # 10 fast calls (20 ms) and 10 slow ones (1,200 ms)
                conn.execute(
                    sa.update(usage).where(usage.c.id == usage_id).values(duration_ms=20 if index < 10 else 1200)
                )
        data = pages.overview(meter.runtime(), parse_filters({}, "UTC"))
        [row] = [r for r in data.health.by_model if r.model == "m"]
        assert sum(row.latency.values()) == 20
        assert row.p50_ms == 50.0  # the top of the [0, 50) bucket holding the 10 fast calls
        assert 1000 < t.cast(float, row.p95_ms) <= 1500  # inside the [1000, 1500) bucket
        today = local_day(dt.datetime.now(dt.timezone.utc), ZoneInfo("UTC"))
        assert sum(data.health.latency_by_day[(today, "m")].values()) == 20
        page = app.test_client().get("/ai-metering/").get_data(as_text=True)
        assert 'data-test="p95"' in page and 'data-chart="latency"' in page


# -- the latency rollup: the health panel without a scan of the ledger ----------------------


def _timed_calls(meter: t.Any, db: t.Any, *, days_ago: int, offset: int = 0) -> None:
    """Calls of three models on a day ``days_ago`` back, with durations across the buckets (and some without)."""
    usage = t.cast(sa.Table, Usage.__table__)
    when = dt.datetime.now(UTC) - dt.timedelta(days=days_ago)
    with db.engine.connect() as conn:
        before = conn.execute(sa.select(sa.func.max(usage.c.id))).scalar() or 0
    meter.record_batch(
        [
            {
                "billable": ("Team", str(i % 3)),
                "tenant": ("Org", f"t{i % 2}"),
                "provider": "openai",
                "model": ("fast", "slow", "mixed")[i % 3],
                "feature": "chat" if i % 4 else None,
                "usage": {"input_tokens": 10 + i, "output_tokens": 1},
                "occurred_at": when - dt.timedelta(minutes=i),
            }
            for i in range(24)
        ]
    )
    with db.engine.begin() as conn:
        rows = list(conn.execute(sa.select(usage.c.id, usage.c.model).where(usage.c.id > before)))
        for index, (usage_id, model) in enumerate(sorted(rows)):
            if index % 5 == 4:
                continue  # no duration, as ``record`` leaves it
            duration = {"fast": 20 + index % 4, "slow": 2400 + 13 * index, "mixed": 130 + 97 * index}[model]
            conn.execute(sa.update(usage).where(usage.c.id == usage_id).values(duration_ms=duration + offset))


def _health(meter: t.Any, query: dict[str, str]) -> outlook.Health:
    return pages.overview(meter.runtime(), parse_filters(query, "Europe/Berlin")).health


def test_the_latency_rollup_gives_the_ledger_s_percentiles_and_calls(backend: str, make_app: AppFactory) -> None:
    """Rollup days plus the ledger's fresh days show exactly what the ledger alone shows."""
    from flask_ai_metering.reporting import queries
    from flask_ai_metering.reporting.rollups import LATENCY
    from flask_ai_metering.reporting.rollups import aggregate

    ledger_app, db, meter = make_app(AI_METERING_VALIDATE_FEATURES=False, AI_METERING_TIMEZONE="Europe/Berlin")
    rollup_app, _, rollup_meter = make_app(
        AI_METERING_VALIDATE_FEATURES=False, AI_METERING_AGGREGATION_TABLES=True, AI_METERING_TIMEZONE="Europe/Berlin"
    )
    variants = [{}, {"model": "mixed"}, {"feature": "chat"}, {"tenant": "t1"}, {"billable": "Team:2"}]
    with ledger_app.app_context():
        for days_ago in (0, 2, 6, 9):  # 9: outside the panel's last 7 days
            _timed_calls(meter, db, days_ago=days_ago)
        [call] = ledger(db)[:1]
        meter.refund(call.id, reason="test")  # an adjustment is a ledger row the panel counts too
    with rollup_app.app_context():
        assert aggregate(rollup_meter.runtime()) > 0

    def compare() -> None:
        for query in variants:
            with ledger_app.app_context():
                expected = _health(meter, query)
            with rollup_app.app_context():
                assert _health(rollup_meter, query) == expected, query
            if not query:
                assert {r.model for r in expected.by_model if r.latency} == {"fast", "slow", "mixed"}

    compare()
    with ledger_app.app_context():
        whole = _health(meter, {})
        by_model = {row.model: row for row in whole.by_model}
        assert by_model["fast"].p50_ms is not None and by_model["fast"].p50_ms <= 50
        assert t.cast(float, by_model["slow"].p95_ms) > 2000
        assert sum(whole.recorded_by_day.values()) == 3 * 24 + 1  # the days shown, the refund included
        # Written after the last aggregate run, today and on a back-filled day: read from the ledger.
        _timed_calls(meter, db, days_ago=0, offset=700)
        _timed_calls(meter, db, days_ago=4, offset=3)
    with rollup_app.app_context(), rollup_meter.runtime().store.engine.connect() as conn:
        found = queries.sources(conn, parse_filters({}, "Europe/Berlin"), use_rollups=True, rollup=LATENCY)
        assert [source.name for source, _ in found] == [LATENCY.name, "ai_metering_usage"]
    compare()
    with rollup_app.app_context():
        aggregate(rollup_meter.runtime(), period="week")
    compare()


def test_a_page_with_and_without_the_one_pass_shows_the_same(
    backend: str, make_app: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tenants and cache savings from PostgreSQL's one pass equal their own queries (refunds included)."""
    from flask_ai_metering.reporting import queries

    app, db, meter = make_app(AI_METERING_PROVIDERS=PRICES)
    with app.app_context():
        meter.record_batch(
            [
                {
                    "billable": ("Team", str(i % 4)),
                    "tenant": ("Org", f"t{i % 3}") if i % 5 else None,
                    "provider": "openai",
                    "model": ("gpt-4o-mini", "other")[i % 2],
                    "usage": {"input_tokens": 1000 + i, "cached_input_tokens": 30 * i, "output_tokens": i},
                }
                for i in range(30)
            ]
        )
        [call] = [row for row in ledger(db) if row.cached_input_tokens > 0][:1]
        meter.refund(call.id, reason="test")
        rt = meter.runtime()
        f = parse_filters({}, "UTC")
        one = pages.overview(rt, f)
        monkeypatch.setattr(queries, "one_pass", lambda *args, **kwargs: False)
        apart = pages.overview(rt, f)
    assert one.savings == apart.savings and one.savings.cached_tokens > 0
    assert pages.ranked(one.by_tenant) == pages.ranked(apart.by_tenant)
    assert one.current.top_billables == apart.current.top_billables
    assert one.forecast == apart.forecast
    assert one.health == apart.health


@pytest.mark.parametrize("zone", ["UTC", "Europe/Berlin"])
def test_the_postgresql_passes_show_what_each_figures_own_query_shows(
    backend: str, make_app: AppFactory, monkeypatch: pytest.MonkeyPatch, zone: str
) -> None:
    """Every overview figure from PostgreSQL's passes equals the per-figure queries: days,
    each ranking (ties broken by name), the chart's daily series by model and by provider,
    unpriced and cached pairs, top billables and their forecasts, on a few days and zones."""
    from flask_ai_metering.reporting import queries

    # The openai models are priced (two alike), the others' calls are unpriced: equal costs, equal calls.
    prices = {"input_price_per_1k": "0.001", "output_price_per_1k": "0.002", "cached_input_price_per_1k": "0.0005"}
    priced = {f"m-{k:02d}": {**prices, "input_price_per_1k": f"0.00{k // 4 + 1}"} for k in range(0, 15, 3)}
    app, db, meter = make_app(AI_METERING_PROVIDERS={"openai": {"models": priced}})
    now = dt.datetime.now(UTC)
    # The forecasts project from the clock: the same instant for both reads.
    monkeypatch.setattr(outlook, "utcnow", lambda: now)
    with app.app_context():
        add_plan(db, slug="small", token_limit=10**7, cost_limit=None)
        for i in range(6):
            meter.subscribe(("Team", str(i)), "small")
        meter.record_batch(
            [
                {
                    "billable": ("Team", str(i % 6)),
                    "tenant": ("Org", f"t{i % 4}") if i % 7 else None,
                    "provider": ("openai", "anthropic", "manual")[i % 3],
                    # Models past TOP_N, and pairs of them used alike: equal cost and calls, ranked by name.
                    "model": (f"m-{i % 15:02d}", None)[i % 29 == 0],
                    "feature": ("chat", "summary", None)[i % 3] if i % 5 else "import",
                    "usage": {
                        "input_tokens": 100 * (i % 15 // 2 + 1),
                        "cached_input_tokens": 10 * (i % 4),
                        "output_tokens": 7,
                    },
                    "occurred_at": now - dt.timedelta(hours=5 * i),
                }
                for i in range(120)
            ]
        )
        calls = [row for row in ledger(db) if row.cached_input_tokens > 0]
        meter.refund(calls[0].id, reason="test")
        rt = meter.runtime()

        def shown(group: str) -> list[t.Any]:
            data = pages.overview(rt, parse_filters({"group": group}, zone), group=group)
            current = data.current
            return [
                current.totals,
                current.by_day,
                *(pages.ranked(current.ranking(name)) for name in pages.OVERVIEW_BREAKDOWNS),
                current.by_day_group,
                current.unpriced,
                current.unpriced_pairs,
                data.top,
                data.forecasts,
                data.savings,
            ]

        one = [shown(group) for group in ("model", "provider")]
        monkeypatch.setattr(queries, "one_pass", lambda *args, **kwargs: False)
        apart = [shown(group) for group in ("model", "provider")]
    assert one == apart
    assert one[0][3][-1][0] == "Other" and one[0][9] and one[0][10]  # models cut; top billables, forecasts
