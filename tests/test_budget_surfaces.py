"""Budgets' surfaces (issue 15): the ``budgets`` command, ``report --budgets``, ``validate``,
``reconcile`` of budget counters, and the dashboard's burn-down bars and near-limit list."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import typing as t
from decimal import Decimal

import pytest
import sqlalchemy as sa
from flask import Flask
from jinja2 import StrictUndefined

from flask_ai_metering import AiLimitExceeded
from flask_ai_metering import AiMetering
from flask_ai_metering.models import BudgetCounter
from flask_ai_metering.models import Plan
from flask_ai_metering.ops.health import validate
from flask_ai_metering.ops.reconcile import reconcile
from flask_ai_metering.reporting import budgets as budget_report
from tests.conftest import add_plan

if t.TYPE_CHECKING:
    from flask_sqlalchemy import SQLAlchemy

    from tests.conftest import AppFactory

UTC = dt.timezone.utc
TEAM = ("Team", "1")
#: 1 per 1k tokens in and out: 1,000 tokens cost exactly 1.
PRICES = {"manual": {"models": {"m": {"input_price_per_1k": "1", "output_price_per_1k": "1"}}}}


def use(meter: AiMetering, tokens: int, *, user: t.Any = None, feature: str | None = None, fn: t.Any = None) -> t.Any:
    """One metered call of ``tokens`` input tokens on the manual model ``m``."""
    return meter.call(
        fn or (lambda: "ok"),
        billable=TEAM,
        user=user,
        provider="manual",
        model="m",
        feature=feature,
        usage={"input_tokens": tokens, "output_tokens": 0},
    )


def counters(meter: AiMetering) -> list[t.Any]:
    table = BudgetCounter.__table__
    with meter.runtime().store.engine.connect() as conn:
        return list(conn.execute(sa.select(table).order_by(table.c.id)))


@pytest.fixture
def team(make_app: AppFactory) -> t.Iterator[tuple[Flask, SQLAlchemy, AiMetering]]:
    """Team:1 on a plan of 100k tokens and 100 a month, prices of 1 per 1k tokens."""
    app, db, meter = make_app(AI_METERING_PROVIDERS=PRICES, AI_METERING_VALIDATE_FEATURES=False)
    with app.app_context():
        add_plan(db, slug="pro", token_limit=100_000, cost_limit=Decimal("100"), features=["chat", "images"])
        db.session.remove()
        meter.subscribe(TEAM, "pro")
        yield app, db, meter


# -- flask ai-metering budgets ---------------------------------------------------------------


def test_budgets_command_lists_scope_period_limits_usage_and_reset(
    team: tuple[Flask, SQLAlchemy, AiMetering], backend: str
) -> None:
    app, _, meter = team
    whole = meter.add_budget(TEAM, period="month", token_limit=50_000, cost_limit="20")
    member = meter.add_budget(TEAM, user=("User", "7"), period="day", request_limit=10, token_limit=5000)
    meter.add_budget(("Team", "2"), period="week", token_limit=10)
    use(meter, 1000, user=("User", "7"))
    use(meter, 500)
    runner = app.test_cli_runner()

    result = runner.invoke(args=["ai-metering", "budgets", "--billable", "Team:1", "--format", "json"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.output)
    assert [b["id"] for b in listed] == [whole.id, member.id]  # the team's budget above its member's
    team_budget, member_budget = listed
    assert team_budget["scope"] == "Team:1" and team_budget["period"] == "month" and team_budget["mode"] == "hard"
    assert team_budget["limits"] == {"tokens": 50_000, "cost": "20.000000000000", "requests": None}
    assert team_budget["used"] == {"tokens": 1500, "cost": "1.500000000000", "requests": 2}
    assert team_budget["usage_percentage"] == 7.5  # cost: 1.5 of 20
    assert member_budget["scope"] == "Team:1 user 7" and member_budget["user_id"] == "7"
    assert member_budget["used"]["requests"] == 1 and member_budget["used"]["tokens"] == 1000
    assert member_budget["usage_percentage"] == 20.0  # tokens: 1000 of 5000
    today = dt.datetime.now(UTC).date()
    assert dt.datetime.fromisoformat(member_budget["resets_at"]).date() == today + dt.timedelta(days=1)

    table = runner.invoke(args=["ai-metering", "budgets"])
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert lines[0].split() == ["id", "scope", "period", "mode", "tokens", "cost", "requests", "resets", "at"]
    assert "1,500 / 50,000 (3%)" in lines[1] and "1.50 / 20.00 (8%)" in lines[1]
    assert "Team:1 user 7" in lines[2] and "1 / 10 (10%)" in lines[2]
    assert "Team:2" in lines[3] and "0 / 10 (0%)" in lines[3]

    assert runner.invoke(args=["ai-metering", "budgets", "--billable", "Team:9"]).output.strip() == "No budgets."
    bad = runner.invoke(args=["ai-metering", "budgets", "--billable", "nope"])
    assert bad.exit_code == 2 and "TYPE:ID" in bad.output


def test_budgets_command_shows_calls_in_flight_as_held(team: tuple[Flask, SQLAlchemy, AiMetering]) -> None:
    app, _, meter = team
    meter.add_budget(TEAM, period="hour", token_limit=10_000)
    runner = app.test_cli_runner()
    seen: list[str] = []

    def in_flight() -> str:
        seen.append(runner.invoke(args=["ai-metering", "budgets", "--format", "json"]).output)
        return "ok"

    use(meter, 2000, fn=in_flight)
    [listed] = json.loads(seen[0])
    assert listed["reserved"]["tokens"] == 2000 and listed["reserved"]["requests"] == 1
    assert listed["used"]["tokens"] == 0
    [after] = json.loads(runner.invoke(args=["ai-metering", "budgets", "--format", "json"]).output)
    assert after["reserved"] == {"tokens": 0, "cost": "0.000000000000", "requests": 0}
    assert after["used"]["tokens"] == 2000


# -- reconcile ---------------------------------------------------------------------------------


def test_reconcile_finds_budget_counters_equal_to_the_ledger_then_fixes_drift(
    make_app: AppFactory, backend: str
) -> None:
    """Calls, recorded usage, a refund, a call in flight and one reserved before its budget existed."""
    app, db, meter = make_app(AI_METERING_PROVIDERS=PRICES, AI_METERING_VALIDATE_FEATURES=False)
    with app.app_context():
        add_plan(db, slug="pro", token_limit=1_000_000)
        db.session.remove()
        meter.subscribe(TEAM, "pro")
        whole = meter.add_budget(TEAM, period="day", token_limit=100_000)
        chat = meter.add_budget(TEAM, feature="chat", period="minute", request_limit=1000)
        member = meter.add_budget(TEAM, user=("User", "7"), period="month", cost_limit="50")
        use(meter, 1000, user=("User", "7"), feature="chat")
        refunded = use(meter, 300, feature="chat")
        meter.refund(refunded.usage_id, reason="bad answer")
        meter.record(billable=TEAM, user=("User", "7"), provider="manual", model="m", usage={"input_tokens": 40})
        # Recorded for an earlier day: it counts on that day's counter, as the engine counts it.
        meter.record(
            billable=TEAM,
            provider="manual",
            model="m",
            usage={"input_tokens": 5},
            occurred_at=dt.datetime.now(UTC) - dt.timedelta(days=3),
        )
        seen: list[list[str]] = []

        def add_budget_mid_call() -> str:
            # Reserved before this budget existed, committed after: it is not on the budget.
            meter.add_budget(TEAM, user=("User", "8"), period="day", token_limit=10)
            seen.append(reconcile(meter.runtime()))
            return "ok"

        use(meter, 20, user=("User", "8"), fn=add_budget_mid_call)

        def in_flight() -> str:
            seen.append(reconcile(meter.runtime()))
            return "ok"

        use(meter, 70, user=("User", "7"), fn=in_flight)
        assert seen == [[], []]  # pending reservations count as reserved on the counters they hold
        assert reconcile(meter.runtime()) == []

        by_budget = {row.budget_id: row for row in counters(meter) if row.period_end > dt.datetime.now(UTC)}
        # The refund gives its tokens back to the budgets too (its period still runs); the request stays counted.
        assert by_budget[whole.id].used_tokens == 1000 + 40 + 20 + 70
        assert by_budget[chat.id].used_requests == 2
        assert by_budget[member.id].used_cost_units == (1000 + 40 + 70) * 10**9

        table = t.cast(sa.Table, BudgetCounter.__table__)
        with meter.runtime().store.engine.begin() as conn:
            conn.execute(
                sa.update(table)
                .where(table.c.id == by_budget[whole.id].id)
                .values(used_tokens=table.c.used_tokens + 5, reserved_requests=2)
            )
        [problem] = reconcile(meter.runtime())
        assert problem.startswith(f"budget counter {by_budget[whole.id].id} (budget {whole.id}, Team:1, per day")
        assert "used_tokens 1135 != ledger 1130" in problem and "reserved_requests 2 != ledger 0" in problem
        runner = app.test_cli_runner()
        assert runner.invoke(args=["ai-metering", "reconcile"]).exit_code == 1
        fixed = runner.invoke(args=["ai-metering", "reconcile", "--fix"])
        assert fixed.exit_code == 0 and "budget counter" in fixed.output
        assert reconcile(meter.runtime()) == []
        assert runner.invoke(args=["ai-metering", "reconcile"]).exit_code == 0


# -- validate ----------------------------------------------------------------------------------


def test_validate_flags_budgets_the_plan_makes_pointless_or_unusable(
    team: tuple[Flask, SQLAlchemy, AiMetering], backend: str
) -> None:
    app, db, meter = team  # plan pro: 100k tokens and 100 a month, features chat and images
    month = meter.add_budget(TEAM, period="month", token_limit=200_000)
    day = meter.add_budget(TEAM, user=("User", "7"), period="day", cost_limit="150")
    meter.add_budget(TEAM, period="year", token_limit=500_000)  # longer than the plan's period: it binds
    meter.add_budget(TEAM, period="month", token_limit=100_000, cost_limit="100")  # equal: not above
    images = meter.add_budget(TEAM, feature="images", period="week", request_limit=5).id
    meter.add_budget(("Team", "2"), period="month", token_limit=10**9)  # no plan: unlimited, nothing to judge

    def budget_lines() -> list[str]:
        return [line for line in validate(app) if line.startswith("budgets:")]

    assert budget_lines() == [
        f"budgets: budget {month.id} (Team:1, per month) has a token limit of 200,000 tokens, above plan 'pro''s"
        " 100,000 tokens per month: the plan refuses first, so it never binds; lower it or remove it",
        f"budgets: budget {day.id} (Team:1 user 7, per day) has a cost limit of 150, above plan 'pro''s 100 per"
        " month: the plan refuses first, so it never binds; lower it or remove it",
    ]
    plan = db.session.execute(sa.select(Plan).where(Plan.slug == "pro")).scalar_one()
    plan.features = ["chat"]
    db.session.commit()
    db.session.remove()
    [*_, unusable] = budget_lines()
    assert unusable == (
        f"budgets: budget {images} (Team:1 feature images, per week) is on feature 'images', which plan 'pro'"
        " no longer allows: no call can use it; remove it with meter.remove_budget"
    )
    result = app.test_cli_runner().invoke(args=["ai-metering", "validate"])
    assert result.exit_code == 1 and unusable in result.output
    meter.remove_budget(images)
    assert len(budget_lines()) == 2


def test_validate_judges_budgets_of_unsubscribed_billables_by_the_default_plan(make_app: AppFactory) -> None:
    app, db, meter = make_app(AI_METERING_DEFAULT_PLAN="free")
    with app.app_context():
        add_plan(db, slug="free", token_limit=1000, period="daily")
        db.session.remove()
        week = meter.add_budget(("Team", "5"), period="week", token_limit=5000)  # longer than a day: binds
        hour = meter.add_budget(("Team", "5"), period="hour", token_limit=5000)
        lines = [line for line in validate(app) if line.startswith("budgets:")]
        assert [line.split(" (")[0] for line in lines] == [f"budgets: budget {hour.id}"]
        assert "above plan 'free''s 1,000 tokens per day" in lines[0]
        assert week.id != hour.id


# -- report --budgets --------------------------------------------------------------------------


def test_report_by_budget_sums_each_budgets_counters_in_the_month(
    team: tuple[Flask, SQLAlchemy, AiMetering], backend: str
) -> None:
    app, _, meter = team
    daily = meter.add_budget(TEAM, user=("User", "7"), period="day", token_limit=1000, request_limit=3)
    monthly = meter.add_budget(TEAM, feature="chat", period="month", cost_limit="10")
    gone = meter.add_budget(TEAM, period="hour", request_limit=100)
    now = dt.datetime.now(UTC)
    for tokens in (400, 600):
        use(meter, tokens, user=("User", "7"), feature="chat")
    with pytest.raises(AiLimitExceeded):
        use(meter, 1, user=("User", "7"))  # the day's 1,000 tokens are used up
    meter.remove_budget(gone)
    meter.record(billable=("Team", "2"), provider="manual", model="m", usage={"input_tokens": 1})
    runner = app.test_cli_runner()
    month = now.strftime("%Y-%m")

    plain = json.loads(runner.invoke(args=["ai-metering", "report", "--month", month, "--format", "json"]).output)
    assert "by_budget" not in plain  # the contract's shape is unchanged without the flag

    result = runner.invoke(args=["ai-metering", "report", "--month", month, "--budgets", "--format", "json"])
    assert result.exit_code == 0, result.output
    rows = {row["budget_id"]: row for row in json.loads(result.output)["by_budget"]}
    assert set(rows) == {daily.id, monthly.id, gone.id}
    assert rows[daily.id] | {"peak_percentage": None} == {
        "budget_id": daily.id,
        "billable": "Team:1",
        "billable_type": "Team",
        "billable_id": "1",
        "user_id": "7",
        "feature": None,
        "model": None,
        "scope": "Team:1 user 7",
        "period": "day",
        "mode": "hard",
        "removed": False,
        "token_limit": 1000,
        "cost_limit": None,
        "request_limit": 3,
        "periods": 1,
        "periods_at_limit": 1,
        "total_tokens": 1000,
        "total_cost": "1.000000000000",
        "requests": 2,
        "peak_percentage": None,
    }
    assert rows[daily.id]["peak_percentage"] == 100.0
    assert rows[monthly.id]["total_cost"] == "1.000000000000" and rows[monthly.id]["peak_percentage"] == 10.0
    assert rows[gone.id]["removed"] is True and rows[gone.id]["requests"] == 2

    other = runner.invoke(args=["ai-metering", "report", "--budgets", "--billable", "Team:2", "--format", "json"])
    assert json.loads(other.output)["by_budget"] == []
    earlier = runner.invoke(args=["ai-metering", "report", "--month", "2020-01", "--budgets", "--format", "json"])
    assert json.loads(earlier.output)["by_budget"] == []

    text = runner.invoke(args=["ai-metering", "report", "--month", month, "--budgets"]).output
    section = text[text.index("By budget") :].splitlines()
    assert section[1].split()[:4] == ["budget", "scope", "period", "periods"]
    assert any("Team:1 user 7" in line and "1,000 tokens, 3 requests" in line and "100%" in line for line in section)
    assert any(line.strip().startswith(f"{gone.id} (removed)") for line in section)

    table = runner.invoke(args=["ai-metering", "report", "--month", month, "--budgets", "--format", "csv"]).output
    parsed = list(csv.DictReader(io.StringIO(table)))
    budget_rows = [row for row in parsed if row["section"] == "by_budget"]
    assert len(budget_rows) == 3 and all(row["budget_id"] for row in budget_rows)
    mine = next(row for row in budget_rows if row["budget_id"] == str(daily.id))
    assert mine["calls"] == "2" and mine["total_tokens"] == "1000" and mine["scope"] == "Team:1 user 7"
    assert mine["request_limit"] == "3" and mine["billable_id"] == "1"
    assert all(row["budget_id"] == "" for row in parsed if row["section"] != "by_budget")


# -- the dashboard -----------------------------------------------------------------------------

HOSTILE_MODEL = "<img src=x onerror=alert(1)>"


@pytest.fixture
def dashboard(team: tuple[Flask, SQLAlchemy, AiMetering]) -> tuple[Flask, SQLAlchemy, AiMetering]:
    app, db, meter = team
    app.jinja_env.undefined = StrictUndefined
    meter.dashboard_authorizer(lambda user: True)
    return app, db, meter


def test_billable_page_shows_each_budget_as_a_burn_down_bar(
    dashboard: tuple[Flask, SQLAlchemy, AiMetering],
) -> None:
    app, _, meter = dashboard
    whole = meter.add_budget(TEAM, period="month", token_limit=10_000, cost_limit="20", request_limit=100)
    member = meter.add_budget(TEAM, user=("User", "7"), period="day", token_limit=1000, mode="soft")
    odd = meter.add_budget(TEAM, model=HOSTILE_MODEL, period="hour", request_limit=5)
    meter.add_budget(("Team", "2"), period="week", token_limit=7777)
    use(meter, 900, user=("User", "7"))
    client = app.test_client()
    pages: list[str] = []

    def in_flight() -> str:
        pages.append(client.get("/ai-metering/billables/Team/1").get_data(as_text=True))
        return "ok"

    use(meter, 50, user=("User", "7"), fn=in_flight)
    html = client.get("/ai-metering/billables/Team/1").get_data(as_text=True)
    section = html[html.index('data-test="budgets"') : html.index("Daily cost")]
    assert [f'data-budget-id="{b.id}"' in section for b in (whole, member, odd)] == [True, True, True]
    assert "7,777" not in section  # another billable's budget
    # Tokens, cost and requests of the team's budget, each against its limit, and when it resets.
    assert "950 / 10,000 · 10%" in section and "$0.9500 / $20.00 · 5%" in section and "2 / 100 · 2%" in section
    assert "Team:1 user 7" in section and "soft (alerts only)" in section and "950 / 1,000 · 95%" in section
    assert section.count('data-test="budget-resets"') == 3 and "resets at " in section
    # Scopes are text: the model name is escaped, never markup.
    assert HOSTILE_MODEL not in html and "&lt;img src=x onerror=alert(1)&gt;" in section
    # While a call is in flight its hold is shown beside what is used, as a hatched part of the bar.
    held = pages[0][pages[0].index('data-test="budgets"') : pages[0].index("Daily cost")]
    assert "900 + 50 held / 10,000" in held and 'class="fill held"' in held
    assert 'class="fill held"' not in section


def test_billable_page_reads_all_budgets_in_one_query(dashboard: tuple[Flask, SQLAlchemy, AiMetering]) -> None:
    """The page's statements do not grow with its budgets (one query reads them all)."""
    app, _, meter = dashboard
    client = app.test_client()
    engine = meter.runtime().store.engine
    statements: list[str] = []

    def count(*args: t.Any) -> None:
        statements.append(str(args[2]))

    def page_statements() -> int:
        statements.clear()
        sa.event.listen(engine, "before_cursor_execute", count)
        try:
            assert client.get("/ai-metering/billables/Team/1").status_code == 200
        finally:
            sa.event.remove(engine, "before_cursor_execute", count)
        return len(statements)

    meter.add_budget(TEAM, period="day", token_limit=1000)
    use(meter, 10)
    page_statements()  # the first request also reads what the app caches
    one = page_statements()
    for i in range(6):
        meter.add_budget(TEAM, user=("User", str(i)), period="hour", request_limit=10)
        use(meter, 10, user=("User", str(i)))
    assert page_statements() == one
    html = client.get("/ai-metering/billables/Team/1").get_data(as_text=True)
    assert html.count('data-test="budget"') == 7


def test_billable_page_without_budgets_says_so(dashboard: tuple[Flask, SQLAlchemy, AiMetering]) -> None:
    app, _, _ = dashboard
    html = app.test_client().get("/ai-metering/billables/Team/1").get_data(as_text=True)
    assert "No budgets: only the plan limits this billable." in html


def test_overview_lists_budgets_at_or_over_the_warning_threshold(
    dashboard: tuple[Flask, SQLAlchemy, AiMetering], backend: str
) -> None:
    app, _, meter = dashboard  # warning threshold: 80%
    full = meter.add_budget(TEAM, user=("User", "7"), period="day", request_limit=2)
    near = meter.add_budget(TEAM, feature="chat", period="month", cost_limit="1")
    quiet = meter.add_budget(TEAM, period="month", token_limit=1_000_000)
    meter.add_budget(TEAM, user=("User", "9"), period="day", token_limit=100)  # never used
    use(meter, 100, user=("User", "7"))
    use(meter, 850, user=("User", "7"), feature="chat")  # 2 of 2 requests; 0.85 of 1
    with pytest.raises(AiLimitExceeded):
        use(meter, 1, user=("User", "7"))
    with app.app_context():
        rt = meter.runtime()
        with rt.store.engine.connect() as conn:
            listed = budget_report.near_limit(conn, timezone=rt.settings.timezone, warning_threshold=80)
    assert [u.id for u in listed] == [full.id, near.id]  # fullest first
    assert listed[0].check.allowed is False and listed[1].usage_percentage == 85.0
    html = app.test_client().get("/ai-metering/").get_data(as_text=True)
    table = html[html.index('data-test="near-budgets"') :]
    table = table[: table.index("</table>")]
    assert table.count("<tr class=") == 2 and "blocked" in table
    assert "user <code>7</code>" in table and "feature <code>chat</code>" in table
    assert "2 / 2 requests" in table and "$0.8500 / $1.00" in table
    assert "1,000,000" not in table and quiet.id not in {u.id for u in listed}


def test_overview_says_when_no_budget_is_near_its_limit(dashboard: tuple[Flask, SQLAlchemy, AiMetering]) -> None:
    app, _, meter = dashboard
    meter.add_budget(TEAM, period="month", token_limit=1_000_000)
    use(meter, 10)
    html = app.test_client().get("/ai-metering/").get_data(as_text=True)
    assert "Every budget is below the warning threshold." in html


def test_a_refusal_names_the_refusing_budget_by_its_own_id(team: tuple[Flask, SQLAlchemy, AiMetering]) -> None:
    _, _, meter = team
    burst = meter.add_budget(TEAM, user=("User", "8"), period="minute", request_limit=1).id
    meter.add_budget(TEAM, user=("User", "9"), period="day", token_limit=10**6)
    use(meter, 1, user=("User", "9"))  # the first counter is the other budget's
    use(meter, 1, user=("User", "8"))
    with pytest.raises(AiLimitExceeded) as refused:
        use(meter, 1, user=("User", "8"))
    check = refused.value.check
    assert check is not None and check.budget_scope == "Team:1 user 8"
    assert check.budget_id == burst
