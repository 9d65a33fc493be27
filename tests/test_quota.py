"""Plans, periods, overrides and the reserve → commit / release / expire cycle."""

from __future__ import annotations

import datetime as dt
import typing as t
from decimal import Decimal

import pytest
import sqlalchemy as sa

from flask_ai_metering import AiLimitExceeded
from flask_ai_metering import FeatureNotAllowed
from flask_ai_metering import signals
from flask_ai_metering.metering.holds import reserve
from flask_ai_metering.metering.spec import CallSpec
from flask_ai_metering.models import Counter
from flask_ai_metering.models import Reservation
from flask_ai_metering.models import Usage
from flask_ai_metering.models import UsageLimitOverride
from flask_ai_metering.ops.reconcile import reconcile
from tests.conftest import add_plan

TEAM = ("Team", "1")
UTC = dt.timezone.utc


def manual(meter: t.Any, tokens: int, **kw: t.Any) -> t.Any:
    """A call whose usage is exactly ``tokens`` output tokens, holding exactly that."""
    kw.setdefault("billable", TEAM)
    return meter.call(lambda: None, provider="manual", max_tokens=tokens, usage={"output_tokens": tokens}, **kw)


def counter_rows(db: t.Any) -> list[t.Any]:
    with db.engine.connect() as conn:
        return list(conn.execute(sa.select(Counter.__table__).order_by(Counter.__table__.c.id)))


def test_hard_limit_refuses_before_the_call_and_says_why(meter, db, backend):
    add_plan(db, slug="small", token_limit=1000)
    meter.subscribe(TEAM, "small")
    reached: list[t.Any] = []
    signals.limit_reached.connect(lambda sender, **kw: reached.append(kw), weak=False)
    for _ in range(9):
        manual(meter, 100)
    ran: list[int] = []
    with pytest.raises(AiLimitExceeded) as info:
        meter.call(lambda: ran.append(1), provider="manual", billable=TEAM, max_tokens=200, usage={"output_tokens": 1})
    assert ran == []
    error = info.value
    assert error.code == 429
    assert "100 tokens remain" in error.message and "resets" in error.message
    assert error.check.remaining_tokens == 100
    assert reached[-1]["billable"] == TEAM
    last = manual(meter, 100)
    assert last.remaining_tokens == 0 and last.is_limit_reached
    assert meter.check(TEAM).allowed is False
    assert reconcile(meter.runtime()) == []


def test_cost_limit_holds_worst_case_cost(meter, db):
    add_plan(db, slug="cheap", cost_limit=Decimal("0.001"))
    meter.subscribe(TEAM, "cheap")
    # gpt-4o-mini: the hold is max_tokens × $0.60/M (the output price, the higher one)
    meter.record(billable=TEAM, provider="openai", model="gpt-4o-mini", usage={"output_tokens": 1000})
    with pytest.raises(AiLimitExceeded, match="Cost limit"):
        meter.call(
            lambda: None,
            billable=TEAM,
            provider="openai",
            model="gpt-4o-mini",
            max_tokens=1000,
            usage={"output_tokens": 1},
        )
    ok = meter.call(
        lambda: None,
        billable=TEAM,
        provider="openai",
        model="gpt-4o-mini",
        max_tokens=600,
        usage={"output_tokens": 600},
    )
    assert ok.remaining_cost == Decimal("0.00004")


def test_unknown_model_needs_only_some_cost_left(meter, db):
    add_plan(db, slug="c", cost_limit=Decimal("0.0001"))
    meter.subscribe(TEAM, "c")
    meter.record(billable=TEAM, provider="openai", model="gpt-4o-mini", usage={"output_tokens": 166})
    result = meter.call(
        lambda: None, billable=TEAM, provider="openai", max_tokens=10_000, usage={"output_tokens": 10_000}, model=None
    )
    # the commit may pass the limit by this one call, as documented
    assert result.usage.unpriced is True
    meter.record(billable=TEAM, provider="openai", model="gpt-4o-mini", usage={"output_tokens": 1000})
    with pytest.raises(AiLimitExceeded):
        meter.call(lambda: None, billable=TEAM, provider="openai", usage={"output_tokens": 1})


def test_commit_above_the_hold_is_recorded_and_unused_hold_returned(meter, db):
    add_plan(db, slug="p", token_limit=10_000)
    meter.subscribe(TEAM, "p")
    over = meter.call(lambda: None, billable=TEAM, provider="manual", max_tokens=100, usage={"output_tokens": 150})
    under = meter.call(lambda: None, billable=TEAM, provider="manual", max_tokens=500, usage={"output_tokens": 20})
    assert over.usage.total_tokens == 150 and under.remaining_tokens == 10_000 - 170
    [counter] = counter_rows(db)
    assert (counter.used_tokens, counter.reserved_tokens) == (170, 0)


def test_reservation_expires_and_sweeper_releases_it(meter, db, backend):
    add_plan(db, slug="p", token_limit=1000)
    meter.subscribe(TEAM, "p")
    rt = meter.runtime()
    hold = reserve(rt, CallSpec(billable=TEAM, provider="manual", max_tokens=900))
    assert meter.check(TEAM, tokens=200).allowed is False
    assert meter.expire_reservations() == 0
    later = dt.datetime.now(UTC) + dt.timedelta(seconds=rt.settings.reservation_ttl + 1)
    assert meter.expire_reservations(now=later) == 1
    assert meter.check(TEAM, tokens=1000).allowed is True
    with db.engine.connect() as conn:
        assert conn.execute(sa.select(Reservation.__table__.c.status)).scalar_one() == "expired"
    # a late commit after expiry still records the tokens, once
    from flask_ai_metering.metering.commits import commit
    from flask_ai_metering.metering.usage import Extracted
    from flask_ai_metering.metering.usage import TokenCounts

    commit(rt, CallSpec(billable=TEAM, provider="manual"), hold, Extracted(TokenCounts(output_tokens=50)))
    [counter] = counter_rows(db)
    assert (counter.used_tokens, counter.reserved_tokens) == (50, 0)
    assert reconcile(rt) == []


def test_plan_change_mid_period_carries_the_usage(meter, db):
    add_plan(db, slug="basic", token_limit=1000)
    add_plan(db, slug="pro", token_limit=5000)
    changes: list[dict[str, t.Any]] = []
    signals.plan_changed.connect(lambda sender, **kw: changes.append(kw), weak=False)
    meter.subscribe(TEAM, "basic")
    manual(meter, 900)
    sub = meter.subscribe(TEAM, "pro")
    assert sub.plan.slug == "pro" and sub.previous_plan.slug == "basic" and sub.plan_version == 1
    assert changes == [{"billable": TEAM, "old_plan": "basic", "new_plan": "pro", "subscription_id": sub.id}]
    result = manual(meter, 4000)
    assert result.remaining_tokens == 100  # AI_METERING_PLAN_CHANGE = "carry": the 900 count
    assert [c.used_tokens for c in counter_rows(db)] == [4900]
    assert meter.subscription(TEAM).plan_id == sub.plan_id
    assert reconcile(meter.runtime()) == []


def test_override_wins_for_its_window(meter, db):
    add_plan(db, slug="p", token_limit=100)
    meter.subscribe(TEAM, "p")
    now = dt.datetime.now(UTC)
    db.session.add(
        UsageLimitOverride(
            billable_type="Team",
            billable_id="1",
            token_limit=2000,
            period_start=now - dt.timedelta(days=1),
            period_end=now + dt.timedelta(days=1),
        )
    )
    db.session.commit()
    assert manual(meter, 1500).remaining_tokens == 500


def test_no_subscription_is_metered_and_unlimited(meter):
    result = manual(meter, 10**9)
    assert result.remaining_tokens is None and result.limit.allowed


def test_expired_subscription_refuses_and_grace_period_keeps_it_active(meter, db):
    add_plan(db, slug="p", token_limit=1000)
    past = dt.datetime.now(UTC) - dt.timedelta(days=1)
    sub = meter.subscribe(TEAM, "p", ends_at=past)
    assert sub.is_expired() and not sub.is_active()
    with pytest.raises(AiLimitExceeded, match="expired"):
        manual(meter, 1)
    sub = meter.subscribe(TEAM, "p", grace_period_ends_at=past + dt.timedelta(days=3))
    assert sub.is_in_grace_period() and sub.is_active()
    assert manual(meter, 1).usage.total_tokens == 1


def test_features_listed_by_the_plan(meter, db):
    add_plan(db, slug="p", features=["chat"])
    meter.subscribe(TEAM, "p")
    manual(meter, 1, feature="chat")
    with pytest.raises(FeatureNotAllowed):
        manual(meter, 1, feature="summary")


@pytest.mark.parametrize("behavior", ["allow", "charge"])
def test_allow_and_charge_do_not_block(make_app, behavior):
    app, db, meter = make_app(AI_METERING_OVERAGE_BEHAVIOR=behavior)
    with app.app_context():
        add_plan(db, slug="p", token_limit=100, overage_price_per_1k_tokens=Decimal("0.01"))
        meter.subscribe(TEAM, "p")
        result = manual(meter, 250)
        assert result.limit.hard_limit_reached  # reported, not enforced
        with db.engine.connect() as conn:
            overages = conn.execute(sa.text("select tokens from ai_metering_overages")).scalars().all()
        assert overages == ([150] if behavior == "charge" else [])


def test_limit_approaching_fires_once_per_period(meter, db):
    add_plan(db, slug="p", token_limit=1000)
    meter.subscribe(TEAM, "p")
    seen: list[t.Any] = []
    signals.limit_approaching.connect(lambda sender, **kw: seen.append(kw["check"]), weak=False)
    manual(meter, 700)
    assert seen == []
    manual(meter, 150)
    manual(meter, 50)
    assert len(seen) == 1 and seen[0].usage_percentage == 85.0


def test_call_straddling_period_end_counts_in_the_period_it_reserved_in(meter, db):
    add_plan(db, slug="p", token_limit=1000, period="monthly")
    meter.subscribe(TEAM, "p", started_at=dt.datetime(2026, 1, 1, tzinfo=UTC))
    rt = meter.runtime()
    last_second = dt.datetime(2026, 10, 31, 23, 59, 59, tzinfo=UTC)
    hold = reserve(rt, CallSpec(billable=TEAM, provider="manual", max_tokens=10), now=last_second)
    from flask_ai_metering.metering.commits import commit
    from flask_ai_metering.metering.usage import Extracted
    from flask_ai_metering.metering.usage import TokenCounts

    commit(rt, CallSpec(billable=TEAM, provider="manual"), hold, Extracted(TokenCounts(output_tokens=10)))
    [counter] = counter_rows(db)
    assert counter.period_start == dt.datetime(2026, 10, 1, tzinfo=UTC)
    assert counter.used_tokens == 10
    with db.engine.connect() as conn:
        assert conn.execute(sa.select(Usage.__table__.c.counter_id)).scalar_one() == counter.id


def test_rolling_period_anchored_on_subscription_start(make_app):
    app, db, meter = make_app(AI_METERING_PERIOD_ALIGNMENT="rolling")
    with app.app_context():
        add_plan(db, slug="p", token_limit=100)
        start = dt.datetime.now(UTC) - dt.timedelta(days=40)
        meter.subscribe(TEAM, "p", started_at=start)
        check = meter.check(TEAM)
        assert check.period_start.day == start.day or check.period_start.month != start.month
        assert check.period_start <= dt.datetime.now(UTC) < check.period_end


def test_reconcile_reports_and_fixes_drift(meter, db, app):
    manual(meter, 10)
    with db.engine.begin() as conn:
        conn.execute(sa.update(Counter.__table__).values(used_tokens=999, reserved_tokens=5))
    problems = reconcile(meter.runtime())
    assert len(problems) == 1 and "used_tokens 999 != ledger 10" in problems[0]
    runner = app.test_cli_runner()
    assert runner.invoke(args=["ai-metering", "reconcile"]).exit_code == 1
    assert reconcile(meter.runtime(), fix=True) == problems
    assert reconcile(meter.runtime()) == []
    assert runner.invoke(args=["ai-metering", "reconcile"]).exit_code == 0


def test_subscribe_returns_the_new_row_even_when_the_apps_session_holds_an_old_snapshot(meter, db, backend):
    plan = add_plan(db, slug="p", token_limit=10)
    assert plan.id  # reading the expired plan opens a transaction (a snapshot on MariaDB) in db.session
    sub = meter.subscribe(TEAM, plan)
    assert sub.plan.slug == "p" and meter.subscription(TEAM).id == sub.id
    add_plan(db, slug="q", token_limit=20)
    assert meter.subscribe(TEAM, "q").plan.slug == "q"
    assert meter.subscription(TEAM).plan_version == 1
