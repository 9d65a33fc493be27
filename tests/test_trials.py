"""Trials (issue 12): trial limits while a trial runs, and ``trial_ending``/``trial_ended`` once each."""

from __future__ import annotations

import datetime as dt
import typing as t
from decimal import Decimal
from types import SimpleNamespace

import pytest

from flask_ai_metering import AiLimitExceeded
from flask_ai_metering import signals
from flask_ai_metering.models import utcnow
from flask_ai_metering.ops import reports
from flask_ai_metering.ops.reconcile import reconcile
from flask_ai_metering.quota.subscriptions import trial_terms
from tests.conftest import add_plan
from tests.conftest import concurrently

if t.TYPE_CHECKING:
    from tests.conftest import AppFactory

TEAM = ("Team", "1")


def spend(meter: t.Any, tokens: int, billable: t.Any = TEAM) -> t.Any:
    return meter.call(
        lambda: None, billable=billable, provider="manual", max_tokens=tokens, usage={"output_tokens": tokens}
    )


def test_a_trial_holds_the_trial_limits_until_it_ends(make_app: AppFactory, backend: str) -> None:
    app, db, meter = make_app(AI_METERING_PERIOD_TYPE="yearly")
    with app.app_context():
        add_plan(db, slug="pro", token_limit=1000, cost_limit=Decimal(50), trial_days=14, trial_token_limit=300)
        sub = meter.subscribe(TEAM, "pro")
        assert sub.trial_ends_at == sub.started_at + dt.timedelta(days=14) and sub.is_in_trial()
        check = meter.check(TEAM)
        assert (check.token_limit, check.cost_limit) == (300, Decimal(50))  # no trial cost limit: the plan's
        assert spend(meter, 200).remaining_tokens == 100  # on PostgreSQL, the one-statement hold
        assert spend(meter, 100).remaining_tokens == 0
        with pytest.raises(AiLimitExceeded):
            spend(meter, 1)
        after = sub.trial_ends_at + dt.timedelta(seconds=1)
        assert meter.check(TEAM, now=after).token_limit == 1000  # the same counter: usage carried
        assert meter.check(TEAM, now=after).remaining_tokens == 700
        assert reconcile(meter.runtime()) == []


def test_a_trial_without_its_own_limits_uses_the_plans(make_app: AppFactory, backend: str) -> None:
    app, db, meter = make_app()
    with app.app_context():
        add_plan(db, slug="pro", token_limit=1000, trial_days=7)
        meter.subscribe(TEAM, "pro")
        assert meter.check(TEAM).token_limit == 1000
        assert spend(meter, 1000).remaining_tokens == 0
        with pytest.raises(AiLimitExceeded):
            spend(meter, 1)
        assert reconcile(meter.runtime()) == []


def test_changing_plans_never_restarts_a_trial(make_app: AppFactory, backend: str) -> None:
    app, db, meter = make_app(AI_METERING_PERIOD_TYPE="yearly")
    with app.app_context():
        add_plan(db, slug="basic", token_limit=500)
        add_plan(db, slug="pro", token_limit=5000, trial_days=14, trial_token_limit=1000)
        add_plan(db, slug="max", token_limit=50_000, trial_days=30, trial_token_limit=2000)
        first = meter.subscribe(TEAM, "basic")
        assert first.trial_ends_at is None
        trial = meter.subscribe(TEAM, "pro")  # moving to a plan with a trial starts one
        assert trial.trial_ends_at is not None and meter.check(TEAM).token_limit == 1000
        spend(meter, 400)
        # During the trial, another plan's trial limits apply, until the same end.
        moved = meter.subscribe(TEAM, "max")
        assert moved.trial_ends_at == trial.trial_ends_at and meter.check(TEAM).token_limit == 2000
        meter.subscribe(TEAM, "basic")
        assert meter.check(TEAM).token_limit == 500  # basic has no trial limit: its own
        back = meter.subscribe(TEAM, "pro")
        assert back.trial_ends_at == trial.trial_ends_at
        after = trial.trial_ends_at + dt.timedelta(seconds=1)
        assert meter.check(TEAM, now=after).token_limit == 5000
        # Once the trial is over, no plan change starts another one.
        plan = SimpleNamespace(
            trial_days=30, trial_token_limit=2000, trial_cost_units=None, token_limit=1, cost_units=None
        )
        current = SimpleNamespace(trial_ends_at=trial.trial_ends_at, plan_id=-1)
        assert trial_terms(plan, current, None, after, after) == {}
        assert spend(meter, 100).remaining_tokens == 500
        assert reconcile(meter.runtime()) == []


def test_an_explicit_trial_end_starts_a_trial_with_fresh_notices(make_app: AppFactory) -> None:
    app, db, meter = make_app()
    with app.app_context():
        add_plan(db, slug="pro", token_limit=1000, trial_token_limit=100)
        end = utcnow() + dt.timedelta(days=2)
        sub = meter.subscribe(TEAM, "pro", trial_ends_at=end)
        assert sub.trial_ends_at == end and meter.check(TEAM).token_limit == 100
        assert meter.check_trials().ending == 1
        extended = meter.subscribe(TEAM, "pro", trial_ends_at=end + dt.timedelta(days=30))
        assert extended.trial_ending_sent_at is None  # a new trial: its own notices
        assert meter.check_trials().ending == 0  # not due yet


def test_trial_notices_fire_once_each_even_from_many_checks(make_app: AppFactory, backend: str) -> None:
    app, db, meter = make_app(AI_METERING_TRIAL_ENDING_DAYS=3)
    ending: list[dict[str, t.Any]] = []
    ended: list[dict[str, t.Any]] = []
    with app.app_context():
        add_plan(db, slug="pro", token_limit=1000, trial_days=14)
        sub = meter.subscribe(TEAM, "pro")
        meter.subscribe(("Team", "late"), "pro")
        end = sub.trial_ends_at

    def check(at: dt.datetime) -> t.Any:
        with app.app_context():
            return meter.check_trials(now=at)

    with (
        signals.trial_ending.connected_to(lambda sender, **kw: ending.append(kw), app),
        signals.trial_ended.connected_to(lambda sender, **kw: ended.append(kw), app),
    ):
        assert check(end - dt.timedelta(days=5)).ending == 0
        results = concurrently(lambda: check(end - dt.timedelta(days=2, hours=12)), times=6)
        assert sum(r.ending for r in results) == 2 and len(ending) == 2
        assert ending[0]["days_left"] == 2 and ending[0]["plan"] == "pro" and ending[0]["trial_ends_at"] == end
        assert check(end - dt.timedelta(days=1)).ending == 0
        results = concurrently(lambda: check(end + dt.timedelta(minutes=1)), times=6)
        assert sum(r.ended for r in results) == 2 and len(ended) == 2 and len(ending) == 2
        assert {e["billable"] for e in ended} == {TEAM, ("Team", "late")}
        assert check(end + dt.timedelta(days=1)).ended == 0


def test_a_trial_found_over_gets_trial_ended_alone(make_app: AppFactory) -> None:
    app, db, meter = make_app()
    with app.app_context():
        add_plan(db, slug="pro", token_limit=1000, trial_days=1)
        sub = meter.subscribe(TEAM, "pro")
        notices = meter.check_trials(now=sub.trial_ends_at + dt.timedelta(days=3))
        assert (notices.ending, notices.ended) == (0, 1)


def test_expire_reservations_sends_the_notices_and_plans_show_trials(make_app: AppFactory) -> None:
    app, db, meter = make_app()
    meter.dashboard_authorizer(lambda user: True)
    with app.app_context():
        add_plan(db, slug="pro", token_limit=1000, trial_days=2, trial_token_limit=100, trial_cost_limit=Decimal(1))
        add_plan(db, slug="free", token_limit=10)
        meter.subscribe(TEAM, "pro")
        runner = app.test_cli_runner()
        outcome = runner.invoke(args=["ai-metering", "expire-reservations"])
        assert outcome.exit_code == 0 and "sent 1 trial_ending and 0 trial_ended notice(s)" in outcome.stderr
        lines = reports.plans_table(meter.runtime()).splitlines()
        assert lines[0].split()[-3:] == ["trial", "subscribers", "trialling"]
        assert lines[2].split()[-6:] == ["2d:", "100", "tokens,", "1.00", "1", "1"]
    page = app.test_client().get("/ai-metering/plans").get_data(as_text=True)
    assert "2 days:" in page and "100 tokens" in page and 'data-test="in-trial">1 in trial<' in page
