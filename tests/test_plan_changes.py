"""Plan changes mid-period (issue 12): ``AI_METERING_PLAN_CHANGE`` = carry | prorate | reset.

Changing plans must never refill an allowance beyond what the policy gives, however
often and from however many threads it happens, and a hold taken under the old
plan commits on the counter it was taken on.
"""

from __future__ import annotations

import datetime as dt
import itertools
import threading
import time
import typing as t
from fractions import Fraction

import pytest
import sqlalchemy as sa

from flask_ai_metering import AiLimitExceeded
from flask_ai_metering import ConfigurationError
from flask_ai_metering.models import Counter
from flask_ai_metering.models import Reservation
from flask_ai_metering.models import Usage
from flask_ai_metering.models import UsageLimitOverride
from flask_ai_metering.ops.reconcile import reconcile
from flask_ai_metering.quota import subscriptions
from flask_ai_metering.quota.subscriptions import prorate
from tests.conftest import add_plan
from tests.conftest import concurrently

TEAM = ("Team", "flap")
UTC = dt.timezone.utc


def manual(meter: t.Any, tokens: int, **kw: t.Any) -> t.Any:
    return meter.call(
        lambda: None, billable=TEAM, provider="manual", max_tokens=tokens, usage={"output_tokens": tokens}, **kw
    )


def rows(db: t.Any, model: t.Any) -> list[t.Any]:
    with db.engine.connect() as conn:
        return list(conn.execute(sa.select(model.__table__)))


def change_at(monkeypatch: pytest.MonkeyPatch, meter: t.Any, plan: str, at: dt.datetime) -> None:
    """Move TEAM to ``plan`` as if it happened at ``at``."""
    monkeypatch.setattr(subscriptions, "utcnow", lambda: at)
    meter.subscribe(TEAM, plan)
    monkeypatch.undo()


def share(check: t.Any, fraction: Fraction) -> dt.datetime:
    """The moment ``fraction`` of the check's period has elapsed."""
    length = check.period_end - check.period_start
    return check.period_start + length * fraction.numerator / fraction.denominator


# -- the rule ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("in_force", "old", "new", "remaining", "expected"),
    [
        (1000, 1000, 5000, Fraction(3, 4), 4000),  # upgrade a quarter in
        (4000, 5000, 1000, Fraction(1, 2), 2000),  # and back at half-time: 250 + 1250 + 500
        (1000, 1000, 5000, Fraction(0), 1000),  # at the very end: nothing of the new plan
        (1000, 1000, 5000, Fraction(1), 5000),  # at the very start: all of it
        (1000, 1000, None, Fraction(1, 2), None),  # to an unlimited plan: unlimited
        (None, None, 1000, Fraction(1, 2), 1000),  # from an unlimited plan: the new limit, usage carried
        (1000, 1000, 999, Fraction(1, 3), 999),  # rounded down
    ],
)
def test_prorate_weighs_the_old_and_new_limits_by_the_shares_of_the_period(in_force, old, new, remaining, expected):
    assert prorate(in_force, old, new, remaining) == expected


def test_an_unknown_plan_change_policy_names_the_key(make_app):
    with pytest.raises(ConfigurationError, match="AI_METERING_PLAN_CHANGE"):
        make_app(AI_METERING_PLAN_CHANGE="refill")


# -- each policy, one change at a time -----------------------------------------------------------


def test_carry_flapping_never_refills(meter, db):
    add_plan(db, slug="pro", token_limit=1000)
    add_plan(db, slug="basic", token_limit=300)
    meter.subscribe(TEAM, "pro")
    manual(meter, 1000)
    meter.subscribe(TEAM, "basic")
    meter.subscribe(TEAM, "pro")
    with pytest.raises(AiLimitExceeded):
        manual(meter, 1)
    check = meter.check(TEAM)
    assert check.token_limit == 1000 and check.remaining_tokens == 0
    assert [c.used_tokens for c in rows(db, Counter)] == [1000]
    assert reconcile(meter.runtime()) == []


def test_prorate_limits_follow_the_shares_and_end_with_the_period(make_app, monkeypatch):
    app, db, meter = make_app(AI_METERING_PLAN_CHANGE="prorate")
    with app.app_context():
        add_plan(db, slug="basic", token_limit=1000)
        add_plan(db, slug="pro", token_limit=5000)
        meter.subscribe(TEAM, "basic")
        manual(meter, 600)
        check = meter.check(TEAM)
        change_at(monkeypatch, meter, "pro", share(check, Fraction(1, 4)))
        check = meter.check(TEAM)
        assert check.token_limit == 4000 and check.used_tokens == 600 and check.remaining_tokens == 3400
        change_at(monkeypatch, meter, "basic", share(check, Fraction(1, 2)))
        assert meter.check(TEAM).token_limit == 2000
        manual(meter, 1400)
        with pytest.raises(AiLimitExceeded):
            manual(meter, 1)
        # Flapping back and forth at one moment changes nothing: no share of the period moved.
        moment = share(check, Fraction(1, 2))
        for plan in ("pro", "basic", "pro", "basic"):
            change_at(monkeypatch, meter, plan, moment)
        assert meter.check(TEAM).token_limit == 2000
        # The next period is the plan's own.
        assert meter.check(TEAM, now=check.period_end + dt.timedelta(seconds=1)).token_limit == 1000
        assert [c.used_tokens for c in rows(db, Counter)] == [2000]
        assert reconcile(meter.runtime()) == []


def test_an_override_wins_over_a_prorated_limit(make_app, monkeypatch):
    app, db, meter = make_app(AI_METERING_PLAN_CHANGE="prorate")
    with app.app_context():
        add_plan(db, slug="basic", token_limit=1000)
        add_plan(db, slug="pro", token_limit=5000)
        meter.subscribe(TEAM, "basic")
        check = meter.check(TEAM)
        change_at(monkeypatch, meter, "pro", share(check, Fraction(1, 2)))
        assert meter.check(TEAM).token_limit == 3000
        now = dt.datetime.now(UTC)
        db.session.add(
            UsageLimitOverride(
                billable_type=TEAM[0],
                billable_id=TEAM[1],
                token_limit=50,
                period_start=now - dt.timedelta(days=1),
                period_end=now + dt.timedelta(days=1),
            )
        )
        db.session.commit()
        assert meter.check(TEAM).token_limit == 50


def test_reset_gives_each_plan_segment_its_whole_allowance(make_app):
    app, db, meter = make_app(AI_METERING_PLAN_CHANGE="reset")
    with app.app_context():
        add_plan(db, slug="pro", token_limit=1000)
        add_plan(db, slug="basic", token_limit=300)
        meter.subscribe(TEAM, "pro")
        manual(meter, 1000)
        meter.subscribe(TEAM, "basic")
        meter.subscribe(TEAM, "pro")
        assert manual(meter, 1000).remaining_tokens == 0
        # One counter per plan segment: 1,000 on the first pro segment, 1,000 on the last.
        assert sorted((c.plan_version, c.used_tokens) for c in rows(db, Counter)) == [(0, 1000), (2, 1000)]
        assert reconcile(meter.runtime()) == []


@pytest.mark.parametrize("policy", ["carry", "prorate", "reset"])
def test_a_hold_taken_before_a_change_commits_on_its_own_counter(make_app, backend, policy):
    app, db, meter = make_app(AI_METERING_PLAN_CHANGE=policy)
    with app.app_context():
        add_plan(db, slug="pro", token_limit=1000)
        add_plan(db, slug="basic", token_limit=300)
        meter.subscribe(TEAM, "pro")
        manual(meter, 100)  # on PostgreSQL, the next hold is the one-statement one

        def provider() -> None:
            meter.subscribe(TEAM, "basic")  # while the call is in flight

        meter.call(provider, billable=TEAM, provider="manual", max_tokens=500, usage={"output_tokens": 400})
        counters = rows(db, Counter)
        assert sum(c.used_tokens for c in counters) == 500
        assert all(c.reserved_tokens == 0 for c in counters)
        assert {r.status for r in rows(db, Reservation)} == {"committed"}
        if policy != "reset":
            with pytest.raises(AiLimitExceeded):  # 500 used, basic allows 300 (prorated: at most 1000)
                manual(meter, 501)
        assert reconcile(meter.runtime()) == []


# -- under load ----------------------------------------------------------------------------------

FLAPPERS = SPENDERS = 8
FLIPS = 6
CALL = 50
BIG, SMALL = 2000, 700


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["carry", "prorate"])
def test_flapping_plans_while_spending_never_passes_what_the_policy_allows(make_app, backend, policy):
    """8 threads move the billable between two plans while 8 others spend until refused."""
    app, db, meter = make_app(AI_METERING_PLAN_CHANGE=policy)
    with app.app_context():
        add_plan(db, slug="big", token_limit=BIG)
        add_plan(db, slug="small", token_limit=SMALL)
        meter.subscribe(TEAM, "big")
    roles = itertools.count()
    lock = threading.Lock()
    flapping = threading.Event()
    flappers_left = [FLAPPERS]
    outcome = {"ok": 0, "refused": 0, "changes": 0}
    errors: list[Exception] = []

    def flap(index: int) -> None:
        plans = itertools.cycle(["small", "big"] if index % 2 else ["big", "small"])
        try:
            for _ in range(FLIPS):
                meter.subscribe(TEAM, next(plans))
                with lock:
                    outcome["changes"] += 1
        except Exception as error:  # shown by the assertion below; the spenders must still stop
            errors.append(error)
        finally:
            with lock:
                flappers_left[0] -= 1
                if not flappers_left[0]:
                    flapping.set()

    def spend() -> None:
        while True:
            try:
                manual(meter, CALL)
            except AiLimitExceeded:
                with lock:
                    outcome["refused"] += 1
                if flapping.is_set():
                    return
                time.sleep(0.005)
            else:
                with lock:
                    outcome["ok"] += 1

    def work() -> None:
        with lock:
            role = next(roles)
        with app.app_context():
            (flap(role) if role < FLAPPERS else spend())

    concurrently(work, times=FLAPPERS + SPENDERS, timeout=300)
    with app.app_context():
        spent = sum(u.total_tokens for u in rows(db, Usage))
        counters = rows(db, Counter)
        assert errors == [] and outcome["changes"] == FLAPPERS * FLIPS, (outcome, errors)
        # carry: every hold fits one plan's limit on the one counter; prorate: every prorated
        # limit is a weighted mean of the two, so neither ever allows more than the larger.
        assert spent == outcome["ok"] * CALL <= BIG, outcome
        assert len(counters) == 1 and counters[0].used_tokens == spent and counters[0].reserved_tokens == 0
        assert {r.status for r in rows(db, Reservation)} == {"committed"}
        # The billable ends on one plan; whatever it is, nothing more fits.
        final = meter.check(TEAM)
        assert final.token_limit is not None and spent + CALL > final.token_limit
        # A move to the plan it is already on is not a change; how many were depends on how the
        # flappers interleave (on MariaDB under load, as few as a fifth), but the plan did move.
        assert 0 < meter.subscription(TEAM).plan_version <= FLAPPERS * FLIPS
        assert reconcile(meter.runtime()) == []
