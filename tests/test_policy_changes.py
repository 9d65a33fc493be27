"""A change to what applies is seen by the very next call.

Every test first makes a call, so the billable's policy is remembered (on
PostgreSQL the next call then reads the policy and holds quota in one statement,
against the counter that read named); then it changes one thing and shows the
next call obeys it. Run on every backend: the behaviour is the contract, the one
statement is PostgreSQL's way of keeping it.
"""

from __future__ import annotations

import datetime as dt
import itertools
import typing as t
from decimal import Decimal

import pytest
import sqlalchemy as sa

from flask_ai_metering import AiLimitExceeded
from flask_ai_metering import CreditsInsufficient
from flask_ai_metering import FeatureNotAllowed
from flask_ai_metering.models import Counter
from flask_ai_metering.models import Plan
from flask_ai_metering.models import Subscription
from flask_ai_metering.models import UsageLimitOverride
from flask_ai_metering.ops.reconcile import reconcile
from tests.conftest import add_plan

TEAM = ("Team", "1")
UTC = dt.timezone.utc

pytestmark = pytest.mark.usefixtures("backend")


def manual(meter: t.Any, tokens: int, **kw: t.Any) -> t.Any:
    kw.setdefault("billable", TEAM)
    return meter.call(lambda: None, provider="manual", max_tokens=tokens, usage={"output_tokens": tokens}, **kw)


def edit(db: t.Any, model: type, **values: t.Any) -> None:
    """Change the billable's row as an app or an admin would: through the app's session."""
    row = db.session.execute(sa.select(model)).scalars().one()
    for name, value in values.items():
        setattr(row, name, value)
    db.session.commit()


def add_override(db: t.Any, **limits: t.Any) -> None:
    now = dt.datetime.now(UTC)
    db.session.add(
        UsageLimitOverride(
            billable_type=TEAM[0],
            billable_id=TEAM[1],
            period_start=now - dt.timedelta(days=1),
            period_end=now + dt.timedelta(days=1),
            **limits,
        )
    )
    db.session.commit()


def test_a_plan_limit_lowered_in_place_refuses_the_next_call(meter, db):
    add_plan(db, slug="p", token_limit=1000)
    meter.subscribe(TEAM, "p")
    manual(meter, 300)
    edit(db, Plan, token_limit=350)
    with pytest.raises(AiLimitExceeded) as info:
        manual(meter, 100)
    assert info.value.check.remaining_tokens == 50
    assert manual(meter, 50).remaining_tokens == 0
    assert reconcile(meter.runtime()) == []


def test_an_override_added_mid_period_applies_to_the_next_call(meter, db):
    add_plan(db, slug="p", token_limit=1000)
    meter.subscribe(TEAM, "p")
    manual(meter, 100)
    add_override(db, token_limit=150)
    with pytest.raises(AiLimitExceeded):
        manual(meter, 100)
    assert manual(meter, 50).limit.token_limit == 150


def test_a_cost_override_applies_to_the_next_call(meter, db):
    add_plan(db, slug="p")
    meter.subscribe(TEAM, "p")
    manual(meter, 100)
    add_override(db, cost_limit=Decimal("0.0001"))
    with pytest.raises(AiLimitExceeded, match="Cost limit"):
        meter.call(
            lambda: None,
            billable=TEAM,
            provider="openai",
            model="gpt-4o-mini",
            max_tokens=1000,
            usage={"output_tokens": 1},
        )


def test_a_plan_change_carries_the_periods_usage_to_the_new_limits(meter, db):
    add_plan(db, slug="basic", token_limit=1000)
    add_plan(db, slug="pro", token_limit=5000)
    meter.subscribe(TEAM, "basic")
    manual(meter, 900)
    meter.subscribe(TEAM, "pro")
    assert manual(meter, 4000).remaining_tokens == 100
    with db.engine.connect() as conn:
        rows = conn.execute(sa.select(Counter.plan_version, Counter.used_tokens).order_by(Counter.plan_version)).all()
    assert [tuple(r) for r in rows] == [(0, 4900)]


def test_under_reset_a_plan_change_moves_the_next_call_to_a_fresh_counter(make_app):
    app, db, meter = make_app(AI_METERING_PLAN_CHANGE="reset")
    with app.app_context():
        add_plan(db, slug="basic", token_limit=1000)
        add_plan(db, slug="pro", token_limit=5000)
        meter.subscribe(TEAM, "basic")
        manual(meter, 900)
        meter.subscribe(TEAM, "pro")
        assert manual(meter, 4000).remaining_tokens == 1000
        with db.engine.connect() as conn:
            rows = conn.execute(
                sa.select(Counter.plan_version, Counter.used_tokens).order_by(Counter.plan_version)
            ).all()
        assert [tuple(r) for r in rows] == [(0, 900), (1, 4000)]


def test_a_feature_removed_from_the_plan_is_refused_on_the_next_call(meter, db):
    add_plan(db, slug="p", features=["chat", "summary"])
    meter.subscribe(TEAM, "p")
    manual(meter, 1, feature="summary")
    edit(db, Plan, features=["chat"])
    with pytest.raises(FeatureNotAllowed):
        manual(meter, 1, feature="summary")
    manual(meter, 1, feature="chat")
    edit(db, Plan, features=[])  # an empty list allows every feature, as None does
    manual(meter, 1, feature="summary")


def test_an_ended_subscription_refuses_the_next_call_and_its_grace_period_allows_it(meter, db):
    add_plan(db, slug="p", token_limit=1000)
    meter.subscribe(TEAM, "p")
    manual(meter, 1)
    past = dt.datetime.now(UTC) - dt.timedelta(minutes=1)
    edit(db, Subscription, ends_at=past)
    with pytest.raises(AiLimitExceeded, match="expired"):
        manual(meter, 1)
    edit(db, Subscription, grace_period_ends_at=past + dt.timedelta(days=1))
    assert manual(meter, 1).usage.total_tokens == 1


def test_a_switch_to_credits_makes_the_next_call_pay_from_the_wallet(meter, db):
    # No limits: nothing is included, so in credits mode the wallet pays every call.
    add_plan(db, slug="p", token_limit=None)
    meter.subscribe(TEAM, "p")
    manual(meter, 1)
    edit(db, Subscription, billing_mode="credits")
    with pytest.raises(CreditsInsufficient):
        meter.call(
            lambda: None,
            billable=TEAM,
            provider="openai",
            model="gpt-4o-mini",
            max_tokens=100,
            usage={"output_tokens": 1},
        )


def test_a_zero_token_call_is_refused_once_the_limit_is_reached(meter, db):
    add_plan(db, slug="p", token_limit=100)
    meter.subscribe(TEAM, "p")
    manual(meter, 60)
    manual(meter, 40)
    with pytest.raises(AiLimitExceeded):
        manual(meter, 0)


def test_an_override_on_a_billable_without_a_subscription_applies_to_the_next_call(meter, db):
    manual(meter, 100)
    add_override(db, token_limit=150)
    with pytest.raises(AiLimitExceeded):
        manual(meter, 100)
    assert manual(meter, 50).remaining_tokens == 0


@pytest.mark.parametrize("backend", ["postgresql"])
def test_on_postgresql_a_remembered_billables_call_is_two_statements(meter, db, backend):
    """One statement per phase: the policy read and the hold together, then the commit."""
    add_plan(db, slug="p", token_limit=10**6)
    meter.subscribe(TEAM, "p")
    manual(meter, 1, feature="chat")
    statements: list[str] = []
    sa.event.listen(db.engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    manual(meter, 1, feature="chat")
    assert len(statements) == 2, statements
    assert statements[0].startswith("WITH pol AS") and "INSERT INTO ai_metering_reservations" in statements[0]
    assert "INSERT INTO ai_metering_usage" in statements[1]


@pytest.mark.parametrize("backend", ["postgresql"])
def test_the_one_statement_phases_fit_psycopgs_statement_cache(backend: str) -> None:
    """psycopg re-parses, on every execution, a statement over 4 KiB or with over 50 parameters.

    That parsing cost more than the statement's round trip; these shapes must stay under
    both limits (psycopg's ``MAX_CACHED_STATEMENT_LENGTH`` / ``_PARAMS``). The grouped hold's
    and commit's statements are over the length, and parsed once per group of calls instead.
    """
    from psycopg import _queries
    from sqlalchemy.dialects.postgresql import psycopg as dialect_module

    from flask_ai_metering.quota import postgres

    dialect = dialect_module.dialect()
    shapes = [postgres._pinned_statement(*flags).statement for flags in itertools.product([True, False], repeat=4)]
    shapes += [postgres._commit_statement().statement, postgres._queued_statement()]
    for statement in shapes:
        compiled = statement.compile(dialect=dialect)
        assert len(compiled.string) <= _queries.MAX_CACHED_STATEMENT_LENGTH
        assert len(compiled.binds) <= _queries.MAX_CACHED_STATEMENT_PARAMS
