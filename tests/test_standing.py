"""The guard's check (``@quota_required``, ``meter.check``): one statement, and always the current counter.

A billable's check joins the counter its last check named, so a remembered
billable's check is one statement; when the fresh policy names another counter
(a plan change, a new period, a rolling anchor moved) the check reads that one.
"""

from __future__ import annotations

import datetime as dt
import typing as t

import pytest
import sqlalchemy as sa

from tests.conftest import add_plan

TEAM = ("Team", "1")
UTC = dt.timezone.utc

pytestmark = pytest.mark.usefixtures("backend")


def manual(meter: t.Any, tokens: int) -> t.Any:
    usage = {"output_tokens": tokens}
    return meter.call(lambda: None, billable=TEAM, provider="manual", max_tokens=tokens, usage=usage)


def test_a_remembered_billables_check_is_one_statement(meter, db):
    add_plan(db, slug="p", token_limit=1000)
    meter.subscribe(TEAM, "p")
    manual(meter, 100)
    assert meter.check(TEAM).remaining_tokens == 900
    statements: list[str] = []
    sa.event.listen(db.engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    assert meter.check(TEAM).remaining_tokens == 900
    assert len(statements) == 1, statements


def test_a_check_after_a_plan_change_reads_the_new_segment(make_app):
    app, db, meter = make_app(AI_METERING_PLAN_CHANGE="reset")  # a fresh counter per plan segment
    with app.app_context():
        add_plan(db, slug="basic", token_limit=1000)
        add_plan(db, slug="pro", token_limit=5000)
        meter.subscribe(TEAM, "basic")
        manual(meter, 900)
        assert meter.check(TEAM).remaining_tokens == 100
        meter.subscribe(TEAM, "pro")
        assert meter.check(TEAM).remaining_tokens == 5000
        manual(meter, 4000)
        assert meter.check(TEAM).remaining_tokens == 1000


def test_a_check_after_a_carried_plan_change_reads_the_same_counter(meter, db):
    add_plan(db, slug="basic", token_limit=1000)
    add_plan(db, slug="pro", token_limit=5000)
    meter.subscribe(TEAM, "basic")
    manual(meter, 900)
    assert meter.check(TEAM).remaining_tokens == 100
    meter.subscribe(TEAM, "pro")  # AI_METERING_PLAN_CHANGE defaults to carry
    assert meter.check(TEAM).remaining_tokens == 4100
    manual(meter, 4000)
    assert meter.check(TEAM).remaining_tokens == 100


def test_a_check_in_another_period_reads_that_periods_counter(meter, db):
    add_plan(db, slug="p", token_limit=1000)
    meter.subscribe(TEAM, "p")
    manual(meter, 300)
    now = dt.datetime.now(UTC)
    assert meter.check(TEAM, now=now).remaining_tokens == 700
    assert meter.check(TEAM, now=now + dt.timedelta(days=400)).remaining_tokens == 1000
    assert meter.check(TEAM, now=now).remaining_tokens == 700


def test_a_check_sees_usage_committed_since_the_last_check(meter, db):
    add_plan(db, slug="p", token_limit=1000)
    meter.subscribe(TEAM, "p")
    assert meter.check(TEAM).remaining_tokens == 1000  # no counter yet: remembered all the same
    manual(meter, 250)
    assert meter.check(TEAM).remaining_tokens == 750
    manual(meter, 750)
    check = meter.check(TEAM)
    assert check.remaining_tokens == 0 and not check.allowed


@pytest.mark.parametrize("backend", ["postgresql"])
def test_on_postgresql_a_call_after_the_guards_check_holds_in_one_statement(meter, db, backend):
    """The policy the check read names the counter for the call's hold: no second policy read."""
    add_plan(db, slug="p", token_limit=10**6)
    meter.subscribe(TEAM, "p")
    manual(meter, 1)  # the counter exists
    meter.runtime().fast.recent._policies.clear()  # as in a process that has not metered TEAM yet
    meter.check(TEAM)
    statements: list[str] = []
    sa.event.listen(db.engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    manual(meter, 1)
    assert len(statements) == 2, statements
    assert statements[0].startswith("WITH pol AS") and "INSERT INTO ai_metering_reservations" in statements[0]
