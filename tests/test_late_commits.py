"""Calls that outlive their reservation, retries around them, and other edges a review found."""

from __future__ import annotations

import datetime as dt
import threading
import time
import typing as t
from decimal import Decimal

import pytest
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from flask_ai_metering import IdempotencyConflict
from flask_ai_metering import InvalidUsage
from flask_ai_metering import queueing
from flask_ai_metering.models import Reservation
from flask_ai_metering.models import Usage
from flask_ai_metering.ops.reconcile import reconcile
from flask_ai_metering.quota import engine as quota
from flask_ai_metering.quota.leases import keeper
from tests.conftest import add_plan

TEAM = ("Team", "42")
LATER = dt.timedelta(hours=1)


def ledger(meter: t.Any) -> list[t.Any]:
    with meter.runtime().store.engine.connect() as conn:
        return list(conn.execute(sa.select(Usage.__table__).order_by(Usage.__table__.c.id)))


def manual(meter: t.Any, fn: t.Callable[[], t.Any], tokens: int, **kw: t.Any) -> t.Any:
    return meter.call(fn, billable=TEAM, provider="manual", model="m", usage={"input_tokens": tokens}, **kw)


@pytest.mark.parametrize("queued", [False, True], ids=["direct", "queued"])
def test_a_late_commit_after_its_key_was_freed_and_reused_records_both_calls(make_app, backend, queued, monkeypatch):
    app, _, meter = make_app(AI_METERING_QUEUE_RECORDING=queued)
    monkeypatch.setattr(queueing, "enqueue_usage", lambda rt, rid: None)  # rows wait for the flush
    with app.app_context():

        def first() -> str:
            # The call outlives its hold: the sweeper expires it and frees the key...
            assert meter.expire_reservations(now=dt.datetime.now(dt.timezone.utc) + LATER) == 1
            # ...and the client's retry with the same key runs and records.
            assert not manual(meter, lambda: "second", 7, idempotency_key="K").replayed
            return "first"

        assert manual(meter, first, 100, idempotency_key="K").response == "first"
        if queued:
            assert queueing.flush_outbox(meter.runtime()) == 2
        rows = ledger(meter)
        assert sorted(r.input_tokens for r in rows) == [7, 100]
        late = next(r for r in rows if r.input_tokens == 100)
        assert late.idempotency_key is None  # recorded, without the key the retry now holds
        assert meter.check(TEAM).used_tokens == 107
        assert reconcile(meter.runtime()) == []


def test_live_calls_keep_their_hold_past_the_ttl(make_app, backend):
    app, db, meter = make_app(AI_METERING_RESERVATION_TTL=3)
    with app.app_context():
        add_plan(db, slug="p", token_limit=100)
        meter.subscribe(TEAM, "p")
        stop = threading.Event()

        def sweeper() -> None:
            with app.app_context():
                while not stop.is_set():
                    meter.expire_reservations()  # the real clock, as cron would run it
                    time.sleep(0.2)

        def traffic() -> None:
            # Steady short calls beside the long one: they must not starve its renewals.
            with app.app_context():
                while not stop.is_set():
                    meter.call(lambda: None, billable=("Team", "other"), provider="manual", usage={"output_tokens": 1})

        threads = [threading.Thread(target=sweeper), threading.Thread(target=traffic)]
        for thread in threads:
            thread.start()
        try:
            result = meter.call(
                lambda: time.sleep(5), billable=TEAM, provider="manual", max_tokens=60, usage={"output_tokens": 60}
            )
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        assert result.usage.total_tokens == 60
        long_call = Reservation.__table__.c
        with db.engine.connect() as conn:
            query = sa.select(long_call.status).where(long_call.billable_id == TEAM[1])
            assert conn.execute(query).scalar_one() == "committed"
        assert keeper.live() == []
        assert reconcile(meter.runtime()) == []


class _LockTimeout(Exception):
    sqlstate = "55P03"


@pytest.mark.parametrize("queued", [False, True], ids=["direct", "queued"])
def test_a_retried_warning_flag_never_commits_twice(make_app, backend, queued, monkeypatch):
    app, db, meter = make_app(AI_METERING_QUEUE_RECORDING=queued)
    monkeypatch.setattr(queueing, "enqueue_usage", lambda rt, rid: None)
    with app.app_context():
        add_plan(db, slug="p", token_limit=100)
        meter.subscribe(TEAM, "p")
        manual(meter, lambda: None, 1, max_tokens=5)
        real = quota.mark_approaching
        calls = {"n": 0}

        def flaky(conn: t.Any, *, counter_id: int) -> bool:
            calls["n"] += 1
            if calls["n"] == 1:
                raise sa_exc.OperationalError("UPDATE", {}, _LockTimeout("lock timeout"))
            return real(conn, counter_id=counter_id)

        monkeypatch.setattr(quota, "mark_approaching", flaky)
        manual(meter, lambda: None, 85, max_tokens=90)
        queueing.flush_outbox(meter.runtime())
        assert meter.check(TEAM).used_tokens == 86 and len(ledger(meter)) == 2
        assert reconcile(meter.runtime()) == []


def test_record_respects_a_key_held_by_a_call_in_flight(make_app, monkeypatch):
    app, _, meter = make_app(AI_METERING_QUEUE_RECORDING=True)
    monkeypatch.setattr(queueing, "enqueue_usage", lambda rt, rid: None)
    with app.app_context():

        def in_flight() -> None:
            with pytest.raises(IdempotencyConflict):
                meter.record(billable=TEAM, provider="manual", usage={"input_tokens": 1}, idempotency_key="K")

        manual(meter, in_flight, 5, idempotency_key="K")
        # Committed but still queued: a record with the key is a replay of that call.
        again = meter.record(billable=TEAM, provider="manual", usage={"input_tokens": 1}, idempotency_key="K")
        assert again.replayed and again.usage.input_tokens == 5
        assert queueing.flush_outbox(meter.runtime()) == 1 and len(ledger(meter)) == 1


def test_record_charges_a_credits_billables_wallet(make_app):
    app, db, meter = make_app(
        AI_METERING_PROVIDERS={"manual": {"models": {"m": {"input_price_per_1k": "1", "output_price_per_1k": "1"}}}}
    )
    with app.app_context():
        add_plan(db, slug="c", token_limit=None)
        meter.subscribe(TEAM, "c", billing_mode="credits")
        meter.wallet(TEAM).add_credits(Decimal("10"))
        meter.record(billable=TEAM, provider="manual", model="m", usage={"input_tokens": 3000})
        assert meter.wallet(TEAM).balance == Decimal("7")
        # past the balance, usage that already happened is still recorded; the wallet stops at 0
        meter.record(billable=TEAM, provider="manual", model="m", usage={"input_tokens": 9000})
        assert meter.wallet(TEAM).balance == Decimal(0)
        assert [r.billing_mode for r in ledger(meter)] == ["credits", "credits"]
        assert reconcile(meter.runtime()) == []


def test_subscribe_keeps_the_apps_own_pending_changes(make_app):
    app, db, meter = make_app()
    with app.app_context():
        add_plan(db, slug="a", token_limit=100)
        add_plan(db, slug="b", token_limit=200)
        meter.subscribe(TEAM, "a")
        sub = meter.subscription(TEAM)
        trial = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)
        sub.trial_ends_at = trial  # the app's own unflushed change
        moved = meter.subscribe(TEAM, "b")
        assert moved is sub and sub.plan_id == moved.plan_id and sub in db.session.dirty
        db.session.commit()
        assert meter.subscription(TEAM).trial_ends_at == trial


def test_a_hold_too_large_to_store_is_refused_cleanly(meter):
    with pytest.raises(InvalidUsage, match="max_tokens"):
        meter.call(lambda: None, billable=TEAM, provider="openai", model="gpt-4o-mini", max_tokens=2**53 - 1)
