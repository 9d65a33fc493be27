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


def use(
    meter: AiMetering, tokens: int, *, user: t.Any = None, feature: str | None = None, fn: t.Any = None
) -> t.Any:
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
    team: tuple[Flask, SQLAlchemy, AiMetering],
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
        meter.record(
            billable=TEAM, user=("User", "7"), provider="manual", model="m", usage={"input_tokens": 40}
        )
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
        # The refund gives back to the plan's counter only: budgets count calls as made.
        assert by_budget[whole.id].used_tokens == 1000 + 300 + 40 + 20 + 70
        assert by_budget[chat.id].used_requests == 2
        assert by_budget[member.id].used_cost_units == (1000 + 40 + 70) * 10**9

        table = BudgetCounter.__table__
        with meter.runtime().store.engine.begin() as conn:
            conn.execute(
                sa.update(table)
                .where(table.c.id == by_budget[whole.id].id)
                .values(used_tokens=table.c.used_tokens + 5, reserved_requests=2)
            )
        [problem] = reconcile(meter.runtime())
        assert problem.startswith(f"budget counter {by_budget[whole.id].id} (budget {whole.id}, Team:1, per day")
        assert "used_tokens 1435 != ledger 1430" in problem and "reserved_requests 2 != ledger 0" in problem
        runner = app.test_cli_runner()
        assert runner.invoke(args=["ai-metering", "reconcile"]).exit_code == 1
        fixed = runner.invoke(args=["ai-metering", "reconcile", "--fix"])
        assert fixed.exit_code == 0 and "budget counter" in fixed.output
        assert reconcile(meter.runtime()) == []
        assert runner.invoke(args=["ai-metering", "reconcile"]).exit_code == 0
