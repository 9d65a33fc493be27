"""``AI_METERING_DEFAULT_PLAN`` (issue 12): billables without a subscription held to a plan."""

from __future__ import annotations

import datetime as dt
import typing as t

import pytest
import sqlalchemy as sa

from flask_ai_metering import AiLimitExceeded
from flask_ai_metering import ConfigurationError
from flask_ai_metering.models import Counter
from flask_ai_metering.models import Plan
from flask_ai_metering.models import Subscription
from flask_ai_metering.models import Usage
from flask_ai_metering.ops.reconcile import reconcile
from tests.conftest import add_plan

TEAM = ("Team", "free-rider")


def manual(meter: t.Any, tokens: int, billable: t.Any = TEAM) -> t.Any:
    return meter.call(
        lambda: None, billable=billable, provider="manual", max_tokens=tokens, usage={"output_tokens": tokens}
    )


def rows(db: t.Any, model: t.Any) -> list[t.Any]:
    with db.engine.connect() as conn:
        return list(conn.execute(sa.select(model.__table__)))


def test_an_unsubscribed_billable_is_held_to_the_default_plan_on_its_own_counter(make_app, backend):
    app, db, meter = make_app(AI_METERING_DEFAULT_PLAN="free")
    with app.app_context():
        add_plan(db, slug="free", token_limit=500)
        assert manual(meter, 200).limit.token_limit == 500
        assert manual(meter, 200).remaining_tokens == 100  # on PostgreSQL, the one-statement hold
        with pytest.raises(AiLimitExceeded):
            manual(meter, 101)
        assert manual(meter, 100, billable=("Team", "other")).remaining_tokens == 400  # its own counter
        assert meter.subscription(TEAM) is None and rows(db, Subscription) == []
        check = meter.check(TEAM)
        assert check.token_limit == 500 and check.remaining_tokens == 100
        assert sorted((c.billable_id, c.plan_version, c.used_tokens) for c in rows(db, Counter)) == [
            ("free-rider", 0, 400),
            ("other", 0, 100),
        ]
        assert reconcile(meter.runtime()) == []


def test_subscribing_carries_the_default_plans_usage(make_app):
    app, db, meter = make_app(AI_METERING_DEFAULT_PLAN="free")
    with app.app_context():
        add_plan(db, slug="free", token_limit=500)
        add_plan(db, slug="pro", token_limit=2000)
        manual(meter, 400)
        meter.subscribe(TEAM, "pro")
        assert manual(meter, 100).remaining_tokens == 1500
        assert [c.used_tokens for c in rows(db, Counter)] == [500]
        assert reconcile(meter.runtime()) == []


def test_the_default_plans_own_period_applies(make_app):
    app, db, meter = make_app(AI_METERING_DEFAULT_PLAN="free")
    with app.app_context():
        add_plan(db, slug="free", token_limit=500, period="daily")
        check = meter.check(TEAM)
        assert check.period_end - check.period_start <= dt.timedelta(days=1, hours=1)


def test_an_unknown_default_plan_is_named_at_first_use_and_records_nothing(make_app, backend):
    app, db, meter = make_app(AI_METERING_DEFAULT_PLAN="nope")
    with app.app_context():
        with pytest.raises(ConfigurationError, match="AI_METERING_DEFAULT_PLAN names plan 'nope'"):
            manual(meter, 10)
        with pytest.raises(ConfigurationError, match="AI_METERING_DEFAULT_PLAN"):
            meter.check(TEAM)
        assert rows(db, Usage) == [] and rows(db, Counter) == []
        result = app.test_cli_runner().invoke(args=["ai-metering", "validate"])
        assert result.exit_code == 1 and "AI_METERING_DEFAULT_PLAN names plan 'nope'" in result.output


def test_a_default_plan_deleted_after_use_is_refused_not_unlimited(make_app, backend):
    """PostgreSQL's one-statement hold re-checks the plan it read: a vanished plan falls to the checked path."""
    app, db, meter = make_app(AI_METERING_DEFAULT_PLAN="free")
    with app.app_context():
        add_plan(db, slug="free", token_limit=500)
        manual(meter, 10)
        with db.engine.begin() as conn:
            conn.execute(sa.delete(Plan.__table__))
        with pytest.raises(ConfigurationError, match="AI_METERING_DEFAULT_PLAN"):
            manual(meter, 10)


@pytest.mark.parametrize("bad", [5, "  ", ["free"]])
def test_a_default_plan_that_is_not_a_slug_is_refused_at_init(make_app, bad):
    with pytest.raises(ConfigurationError, match="AI_METERING_DEFAULT_PLAN"):
        make_app(AI_METERING_DEFAULT_PLAN=bad)


def test_without_the_setting_unsubscribed_billables_are_unlimited_and_validate_says_so(make_app):
    app, db, meter = make_app()
    with app.app_context():
        add_plan(db, slug="free", token_limit=5)
        assert meter.check(TEAM).token_limit is None
        result = app.test_cli_runner().invoke(args=["ai-metering", "validate"])
        assert result.exit_code == 0, result.output
        assert "billables without a subscription are unlimited" in result.output
        assert "AI_METERING_DEFAULT_PLAN" in result.output


def test_with_the_setting_validate_says_nothing_about_unlimited_billables(make_app):
    app, db, meter = make_app(AI_METERING_DEFAULT_PLAN="free")
    with app.app_context():
        add_plan(db, slug="free", token_limit=5)
        result = app.test_cli_runner().invoke(args=["ai-metering", "validate"])
        assert result.exit_code == 0, result.output
        assert "unlimited" not in result.output
