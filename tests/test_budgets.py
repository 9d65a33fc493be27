"""Budgets: several exact limits on one call, held with the plan's counter all or none."""

from __future__ import annotations

import datetime as dt
import json
import typing as t
from decimal import Decimal

import pytest
import sqlalchemy as sa

from flask_ai_metering import AiLimitExceeded
from flask_ai_metering import InvalidUsage
from flask_ai_metering import signals
from flask_ai_metering.models import BudgetCounter
from flask_ai_metering.models import Counter
from flask_ai_metering.models import Reservation
from flask_ai_metering.models import Usage
from flask_ai_metering.ops.reconcile import reconcile
from tests.conftest import add_plan

TEAM = ("Team", "1")


def spend(meter: t.Any, tokens: int = 100, **options: t.Any) -> t.Any:
    options.setdefault("billable", TEAM)
    return meter.call(lambda: None, provider="manual", max_tokens=tokens, usage={"output_tokens": tokens}, **options)


def rows(db: t.Any, model: t.Any) -> list[t.Any]:
    with db.engine.connect() as conn:
        return list(conn.execute(sa.select(model.__table__).order_by(model.__table__.c.id)))


@pytest.fixture
def team(meter, db):
    add_plan(db, slug="team", token_limit=1000, features=["chat", "search", "images"])
    meter.subscribe(TEAM, "team")
    return meter


def test_a_member_budget_refuses_inside_the_team_plan_and_names_itself(team, db, backend):
    budget = team.add_budget(TEAM, user="7", period="day", token_limit=300)
    for _ in range(3):
        spend(team, user="7")
    with pytest.raises(AiLimitExceeded) as refused:
        spend(team, user="7")
    check = refused.value.check
    assert (check.budget_id, check.budget_scope, check.budget_period) == (budget.id, "Team:1 user 7", "day")
    assert check.remaining_tokens == 0 and check.token_limit == 300
    assert "Team:1 user 7" in str(refused.value) and "resets at" in str(refused.value)
    body = json.loads(refused.value.get_body())
    assert body["budget"] == {"id": budget.id, "scope": "Team:1 user 7", "period": "day"}
    assert body["remaining_tokens"] == 0
    # The refused call held nothing: the plan still has 700 and another member may use it.
    [counter] = rows(db, Counter)
    assert (counter.used_tokens, counter.reserved_tokens) == (300, 0)
    spend(team, user="8", tokens=700)
    [bc] = rows(db, BudgetCounter)
    assert (bc.used_tokens, bc.reserved_tokens, bc.used_requests, bc.reserved_requests) == (300, 0, 3, 0)
    assert reconcile(team.runtime()) == []


def test_the_plan_refusing_rolls_the_budget_hold_back(team, db, backend):
    team.add_budget(TEAM, user="7", period="day", token_limit=5000)
    spend(team, user="8", tokens=950)
    with pytest.raises(AiLimitExceeded) as refused:
        spend(team, user="7", tokens=100)
    assert refused.value.check.budget_id is None  # the plan refused; the budget had room
    assert [(b.reserved_tokens, b.used_tokens) for b in rows(db, BudgetCounter)] in ([], [(0, 0)])
    [counter] = rows(db, Counter)
    assert (counter.used_tokens, counter.reserved_tokens) == (950, 0)


def test_the_narrowest_refusing_budget_is_named(team, db, backend):
    team.add_budget(TEAM, period="day", token_limit=150)
    narrow = team.add_budget(TEAM, user="7", feature="chat", period="hour", token_limit=120)
    spend(team, user="7", feature="chat", tokens=100)
    with pytest.raises(AiLimitExceeded) as refused:
        spend(team, user="7", feature="chat", tokens=100)
    assert refused.value.check.budget_id == narrow.id


def test_a_request_budget_is_an_exact_rate_limit(team, db, backend):
    team.add_budget(TEAM, feature="search", period="hour", request_limit=3)
    for _ in range(3):
        spend(team, feature="search", tokens=1)
    with pytest.raises(AiLimitExceeded) as refused:
        spend(team, feature="search", tokens=1)
    check = refused.value.check
    assert (check.request_limit, check.remaining_requests) == (3, 0)
    assert check.as_json()["remaining_requests"] == 0
    spend(team, feature="chat", tokens=1)  # another feature is not limited
    [bc] = rows(db, BudgetCounter)
    assert (bc.used_requests, bc.reserved_requests) == (3, 0)


def test_a_soft_budget_counts_and_alerts_but_never_refuses(team, db, backend):
    crossed: list[dict[str, t.Any]] = []
    signals.threshold_crossed.connect(lambda _, **kw: crossed.append(kw), weak=False)
    try:
        budget = team.add_budget(TEAM, model="gpt-x", period="month", token_limit=100, mode="soft")
        spend(team, model="gpt-x", tokens=150)
    finally:
        signals.threshold_crossed.receivers.clear()
    [bc] = rows(db, BudgetCounter)
    assert bc.used_tokens == 150
    assert [(c["budget"], c["threshold"]) for c in crossed] == [(budget.id, 80), (budget.id, 100)]


def test_cost_budget_holds_the_worst_case_cost(make_app, backend):
    app, db, meter = make_app(
        AI_METERING_PROVIDERS={
            "openai": {"models": {"m": {"input_price_per_1k": "0.01", "output_price_per_1k": "0.01"}}}
        }
    )
    with app.app_context():
        add_plan(db, slug="p", token_limit=10**6)
        meter.subscribe(TEAM, "p")
        meter.add_budget(TEAM, feature="images", period="month", cost_limit="0.02")
        ok = meter.call(
            lambda: None,
            billable=TEAM,
            provider="openai",
            model="m",
            feature="images",
            max_tokens=1000,
            usage={"input_tokens": 1000},
        )
        assert ok.usage.total_cost == Decimal("0.01")
        with pytest.raises(AiLimitExceeded) as refused:  # 2000 tokens may cost 0.02, and 0.01 is left
            meter.call(
                lambda: None,
                billable=TEAM,
                provider="openai",
                model="m",
                feature="images",
                max_tokens=2000,
                usage={"input_tokens": 10},
            )
        assert refused.value.check.remaining_cost == Decimal("0.01")


def test_a_call_that_raises_gives_the_budget_back(team, db, backend):
    team.add_budget(TEAM, user="7", period="day", token_limit=300, request_limit=5)

    def boom() -> None:
        raise RuntimeError("provider down")

    with pytest.raises(RuntimeError):
        team.call(boom, billable=TEAM, user="7", provider="manual", max_tokens=200)
    [bc] = rows(db, BudgetCounter)
    assert (bc.reserved_tokens, bc.reserved_requests, bc.used_requests) == (0, 0, 0)


def test_an_expired_hold_gives_the_budget_back(team, db, backend):
    team.add_budget(TEAM, user="7", period="day", token_limit=300)
    runtime = team.runtime()
    from flask_ai_metering.metering.holds import reserve
    from flask_ai_metering.metering.spec import build_spec

    reserve(runtime, build_spec(runtime, TEAM, user="7", provider="manual", max_tokens=200))
    [bc] = rows(db, BudgetCounter)
    assert (bc.reserved_tokens, bc.reserved_requests) == (200, 1)
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)
    assert team.expire_reservations(now=later) == 1
    [bc] = rows(db, BudgetCounter)
    assert (bc.reserved_tokens, bc.reserved_requests, bc.used_tokens) == (0, 0, 0)


def test_recorded_usage_counts_on_budgets_and_is_never_refused(team, db, backend):
    team.add_budget(TEAM, user="7", period="day", token_limit=100)
    team.record(billable=TEAM, user="7", provider="manual", usage={"output_tokens": 250})
    [bc] = rows(db, BudgetCounter)
    assert (bc.used_tokens, bc.used_requests) == (250, 1)
    with pytest.raises(AiLimitExceeded):
        spend(team, user="7", tokens=1)


def test_removed_budgets_stop_holding(team, db, backend):
    budget = team.add_budget(TEAM, user="7", period="day", token_limit=100)
    spend(team, user="7", tokens=100)
    assert team.remove_budget(budget) is True
    assert team.remove_budget(budget.id) is False
    assert team.budgets(TEAM) == []
    spend(team, user="7", tokens=100)
    [bc] = rows(db, BudgetCounter)
    assert bc.used_tokens == 100  # kept for the record, no longer counting


def test_budget_period_starts_are_calendar_periods(team, db, backend):
    per_minute = team.add_budget(TEAM, period="minute", request_limit=10)
    team.add_budget(TEAM, period="week", token_limit=10**6)
    spend(team, tokens=1)
    spend(team, tokens=1)  # on PostgreSQL, through the one-statement hold (the first creates the counters)
    counters = rows(db, BudgetCounter)
    minute = [c for c in counters if c.budget_id == per_minute.id][-1]
    [week] = [c for c in counters if c.budget_id != per_minute.id]
    assert minute.period_end - minute.period_start == dt.timedelta(minutes=1)
    assert minute.period_start.second == 0 and minute.period_start.microsecond == 0
    assert week.period_start.weekday() == 0 and week.period_end - week.period_start == dt.timedelta(weeks=1)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({}, "token_limit, cost_limit or request_limit"),
        ({"token_limit": -1}, "token_limit"),
        ({"cost_limit": "-0.01"}, "cost_limit"),
        ({"cost_limit": 0.5}, "cost_limit"),
        ({"request_limit": 1.5}, "request_limit"),
        ({"token_limit": 10, "period": "fortnight"}, "period"),
        ({"token_limit": 10, "mode": "loose"}, "mode"),
        ({"token_limit": 10, "feature": "video"}, "feature"),
        ({"token_limit": 10, "thresholds": [50, 150]}, "thresholds"),
    ],
)
def test_bad_budgets_are_refused_naming_the_field(team, db, options, field):
    with pytest.raises(InvalidUsage, match=field):
        team.add_budget(TEAM, **options)
    assert rows(db, BudgetCounter) == [] and team.budgets() == []


def test_thresholds_fire_once_each_and_a_budget_may_set_its_own(team, db, backend):
    crossed: list[tuple[t.Any, ...]] = []
    signals.threshold_crossed.connect(
        lambda _, **kw: crossed.append((kw["budget"], kw["plan"], kw["threshold"], kw["event_id"])), weak=False
    )
    try:
        own = team.add_budget(TEAM, user="7", period="day", token_limit=400, thresholds=[50])
        spend(team, user="7", tokens=100)  # 25 %
        spend(team, user="7", tokens=100)  # 50 %: the budget's own threshold
        spend(team, user="7", tokens=100)
        spend(team, user="8", tokens=500)  # the plan: 800 of 1000
        spend(team, user="8", tokens=100)
    finally:
        signals.threshold_crossed.receivers.clear()
    [bc] = rows(db, BudgetCounter)
    [counter] = rows(db, Counter)
    assert crossed == [
        (own.id, None, 50, f"budget-{bc.id}-50"),
        (None, "team", 80, f"plan-{counter.id}-80"),
    ]
    assert (counter.alert_level, bc.alert_level) == (80, 50)


def test_headers_report_the_tightest_limit(make_app):
    from flask_ai_metering import quota_required

    app, db, meter = make_app()

    @app.get("/chat")
    @quota_required()
    def chat() -> t.Any:
        result = meter.call(
            lambda: "hi", billable=TEAM, user="7", provider="manual", max_tokens=10, usage={"output_tokens": 10}
        )
        return {"remaining": result.limit.remaining_requests}

    meter.billable_resolver(lambda: TEAM)
    with app.app_context():
        add_plan(db, slug="team", token_limit=1000)
        meter.subscribe(TEAM, "team")
        meter.add_budget(TEAM, user="7", period="minute", request_limit=2)
    client = app.test_client()
    assert client.get("/chat").get_json() == {"remaining": 1}  # the request budget is the tightest
    response = client.get("/chat")
    assert response.status_code == 200
    response = client.get("/chat")
    assert response.status_code == 429
    body = response.get_json()
    assert body["budget"]["period"] == "minute" and body["remaining_requests"] == 0
    assert response.headers["RateLimit-Limit"] == "2" and response.headers["RateLimit-Remaining"] == "0"
    assert 1 <= int(response.headers["Retry-After"]) <= 60


@pytest.mark.parametrize("backend", ["postgresql"])
def test_on_postgresql_a_budgeted_hold_is_one_statement(team, db, backend, monkeypatch):
    import psycopg

    team.add_budget(TEAM, user="7", period="day", token_limit=10_000)
    team.add_budget(TEAM, period="month", request_limit=100)
    spend(team, user="7", tokens=1)  # creates the counters (the portable path)
    spend(team, user="7", tokens=1)  # learns the budgets' terms
    statements: list[str] = []

    def note(*args: t.Any) -> None:
        statements.append(args[2])

    # The hold is sent through psycopg's RawCursor (its text is precompiled): spy on both ways.
    raw_execute = psycopg.RawCursor.execute

    def raw(cursor: t.Any, query: t.Any, *args: t.Any, **kwargs: t.Any) -> t.Any:
        statements.append(str(query))
        return raw_execute(cursor, query, *args, **kwargs)

    monkeypatch.setattr(psycopg.RawCursor, "execute", raw)
    sa.event.listen(db.engine, "before_cursor_execute", note)
    spend(team, user="7", tokens=1)
    sa.event.remove(db.engine, "before_cursor_execute", note)
    holds = [s for s in statements if "INSERT INTO ai_metering_reservations" in s]
    commits = [s for s in statements if "INSERT INTO ai_metering_usage" in s]
    assert len(statements) == 2 and len(holds) == 1 and len(commits) == 1, [s[:120] for s in statements]
    assert "ai_metering_budget_counters" in holds[0] and "ai_metering_budget_counters" in commits[0]
    reservation = rows(db, Reservation)[-1]
    assert len(reservation.budget_counter_ids) == 2
    assert [(b.used_tokens, b.used_requests, b.reserved_tokens) for b in rows(db, BudgetCounter)] == [
        (3, 3, 0),
        (3, 3, 0),
    ]


@pytest.mark.parametrize("backend", ["postgresql"])
def test_on_postgresql_a_refusing_budget_writes_nothing(team, db, backend):
    team.add_budget(TEAM, period="day", token_limit=10_000)
    team.add_budget(TEAM, user="7", period="day", token_limit=150)
    spend(team, user="7", tokens=100)
    spend(team, user="7", tokens=10)
    with pytest.raises(AiLimitExceeded) as refused:
        spend(team, user="7", tokens=100)
    assert refused.value.check.budget_scope == "Team:1 user 7"
    assert [(b.used_tokens, b.reserved_tokens) for b in rows(db, BudgetCounter)] == [(110, 0), (110, 0)]
    [counter] = rows(db, Counter)
    assert (counter.used_tokens, counter.reserved_tokens) == (110, 0)
    assert len(rows(db, Usage)) == 2


def test_a_refund_gives_the_budget_back_while_its_period_runs(team, db, backend):
    team.add_budget(TEAM, user="7", period="day", token_limit=300)
    called = spend(team, user="7", tokens=200)
    recorded = team.record(billable=TEAM, user="7", provider="manual", usage={"output_tokens": 100})
    with pytest.raises(AiLimitExceeded):
        spend(team, user="7", tokens=50)
    team.refund(called.usage_id, reason="bad answer")
    team.refund(recorded.usage_id, reason="duplicate", tokens=40)
    [bc] = rows(db, BudgetCounter)
    assert (bc.used_tokens, bc.used_requests) == (60, 2)  # requests stay counted: the calls were made
    spend(team, user="7", tokens=240)
    assert reconcile(team.runtime()) == []


def test_repricing_adds_the_cost_to_the_budgets_too(make_app, backend):
    from flask_ai_metering.ops.reprice import reprice

    prices = {"manual": {"models": {"m": {"input_price_per_1k": "1", "output_price_per_1k": "2"}}}}
    before, db, old = make_app()  # no price for "m" yet
    with before.app_context():
        add_plan(db, slug="pro", token_limit=100_000)
        old.subscribe(TEAM, "pro")
        old.add_budget(TEAM, model="m", period="month", cost_limit="10")
        old.call(lambda: "ok", billable=TEAM, provider="manual", model="m", usage={"input_tokens": 1000})
    app, now_db, meter = make_app(AI_METERING_PROVIDERS=prices)
    with app.app_context():
        assert reprice(meter.runtime()).repriced == 1
        [bc] = rows(now_db, BudgetCounter)
        assert bc.used_cost_units == 10**12  # 1,000 input tokens at 1 per 1k
        assert reconcile(meter.runtime()) == []


def test_the_budgeted_commit_fits_psycopgs_statement_cache() -> None:
    """The budgeted commit runs on every budgeted call: psycopg must convert it once, not each time.

    (The budgeted hold embeds the policy query and the budgets' upsert: it is over the limit,
    and its conversion is part of what ``python -m bench budgets`` measures.)
    """
    import re

    from psycopg import _queries
    from sqlalchemy.dialects.postgresql import psycopg as dialect_module

    from flask_ai_metering.quota import postgres

    text = postgres._commit_budgeted_statement().statement.compile(dialect=dialect_module.dialect()).string
    assert len(text) <= _queries.MAX_CACHED_STATEMENT_LENGTH
    assert len(set(re.findall(r"%\((\w+)\)s", text))) <= _queries.MAX_CACHED_STATEMENT_PARAMS
