"""Grouped writes on PostgreSQL: holds and commits queued on one counter are made together, each exactly once."""

from __future__ import annotations

import datetime as dt
import itertools
import threading
import time
import typing as t
from decimal import Decimal

import pytest
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from flask_ai_metering import AiLimitExceeded
from flask_ai_metering.metering import holds
from flask_ai_metering.metering import ledger
from flask_ai_metering.metering.spec import CallSpec
from flask_ai_metering.metering.spec import Hold
from flask_ai_metering.metering.usage import TokenCounts
from flask_ai_metering.models import Counter
from flask_ai_metering.models import Usage
from flask_ai_metering.models import utcnow
from flask_ai_metering.money import to_units
from flask_ai_metering.ops.reconcile import reconcile
from flask_ai_metering.quota import grouped as group_commit
from flask_ai_metering.quota import postgres
from tests.conftest import add_plan

TEAM = ("Team", "7")


# Grouping serves PostgreSQL's one-statement holds and commits only.
pytestmark = pytest.mark.parametrize("backend", ["postgresql"])


@pytest.fixture
def pg_app(make_app: t.Any, backend: str) -> t.Any:
    app, db, meter = make_app()
    with app.app_context():
        add_plan(db, slug="p", token_limit=10**9)
        meter.subscribe(TEAM, "p")
        yield app, db, meter


def test_concurrent_commits_on_one_counter_share_statements_and_each_gets_its_own_row(pg_app):
    app, db, meter = pg_app
    batches: list[str] = []
    sa.event.listen(db.engine, "before_cursor_execute", lambda *a: batches.append(a[2]) if "unnest(" in a[2] else None)
    results: list[t.Any] = []
    failures: list[BaseException] = []

    def caller(n: int) -> None:
        with app.app_context():
            for i in range(30):
                try:
                    results.append(
                        meter.call(
                            lambda: time.sleep(0.001),
                            billable=TEAM,
                            provider="openai",
                            model="gpt-4o-mini",
                            max_tokens=100,
                            usage={"output_tokens": 1 + (n * 30 + i) % 50},
                            meta={"caller": n, "i": i},
                        )
                    )
                except BaseException as error:  # pragma: no cover - reported below
                    failures.append(error)

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert failures == []
    assert batches, "no two commits were ever written together"
    with db.engine.connect() as conn:
        rows = {r.id: r for r in conn.execute(sa.select(Usage.__table__))}
        used = conn.execute(sa.select(Counter.used_tokens, Counter.reserved_tokens, Counter.calls)).one()
    # Every caller got its own row back, holding its own usage and metadata.
    assert len({r.usage_id for r in results}) == len(results) == len(rows) == 240
    started = utcnow() - dt.timedelta(minutes=5)
    for result in results:
        row = rows[result.usage_id]
        assert row.output_tokens == result.usage.output_tokens
        assert row.total_cost == result.usage.total_cost > 0
        assert started < row.occurred_at <= utcnow()
    assert sorted((r.meta["caller"], r.meta["i"]) for r in rows.values()) == [
        (n, i) for n in range(8) for i in range(30)
    ]
    assert tuple(used) == (sum(r.output_tokens for r in rows.values()), 0, 240)
    assert reconcile(meter.runtime()) == []


def _pending_commit(meter: t.Any, tokens: int, key: str | None = None) -> group_commit._Commit:
    """A reserved call and the commit it would write, built as the pipeline builds it."""
    rt = meter.runtime()
    spec = CallSpec(billable=TEAM, provider="manual", max_tokens=100, idempotency_key=key)
    hold = holds.reserve(rt, spec)
    assert isinstance(hold, Hold)
    at = utcnow()
    counts = TokenCounts(output_tokens=tokens)
    costs = rt.prices.cost("manual", None, counts, at)
    values = {**ledger.usage_values(spec, counts, costs, None, at, hold=hold), "created_at": at}
    true_up = postgres.TrueUp(
        hold.reservation_id, hold.counter_id, at, tokens, to_units(costs.total_cost), hold.tokens, hold.cost_units
    )
    return group_commit._Commit(rt.store, true_up, values)


def test_a_refused_group_writes_each_commit_alone(pg_app):
    """One row the database refuses must not cost the others theirs: each is written alone."""
    app, db, meter = pg_app
    good, bad = _pending_commit(meter, 30), _pending_commit(meter, 40)
    with db.engine.begin() as conn:  # a row already holds the bad commit's reservation: unique key
        conn.execute(sa.insert(Usage.__table__).values({**bad.values, "output_tokens": 1}))
    outcomes = group_commit._write_commits([good, bad])
    assert isinstance(outcomes[0], tuple)
    assert isinstance(outcomes[1], sa_exc.IntegrityError)
    with db.engine.connect() as conn:
        counter = conn.execute(sa.select(Counter.used_tokens, Counter.reserved_tokens)).one()
    assert tuple(counter) == (30, 100)  # the good commit counted; the bad one's hold still held


def test_a_group_mixing_won_and_expired_holds_returns_each_hold_once(pg_app):
    app, db, meter = pg_app
    first, second = _pending_commit(meter, 30, key="k-first"), _pending_commit(meter, 40)
    later = utcnow().replace(year=utcnow().year + 1)
    # The sweeper expires both (returning both holds), then one more hold is taken.
    assert meter.expire_reservations(now=later) == 2
    third = _pending_commit(meter, 50)
    usage_ids, state = meter.runtime().store.run(
        lambda conn: postgres.commit_many(conn, [(c.true_up, c.values) for c in (first, second, third)]),
        autocommit=True,
    )
    assert len(set(usage_ids.values())) == 3
    assert (state.used_tokens, state.reserved_tokens) == (120, 0)
    assert reconcile(meter.runtime()) == []
    # The expired hold's key was freed for a retry: its row keeps it in meta, as the portable path does.
    row = db.session.get(Usage, usage_ids[first.true_up.reservation_id])
    assert row.idempotency_key is None and row.meta["released_idempotency_key"] == "k-first"


def _requests(*sizes: tuple[int, int]) -> list[postgres.HoldRequest]:
    at = utcnow()
    return [postgres.HoldRequest(n, c, None, "", at + dt.timedelta(minutes=1), at) for n, c in sizes]


def _hold_many(meter: t.Any, *sizes: tuple[int, int]) -> list[t.Any] | None:
    rt = meter.runtime()
    recent = rt.fast.recent.get(TEAM, utcnow())
    assert recent is not None
    return rt.store.run(
        lambda conn: postgres.reserve_pinned_many(
            conn, recent, _requests(*sizes), enforce=True, mode_from_plan=True, feature=None, now=utcnow()
        ),
        autocommit=True,
    )


def _counter(db: t.Any) -> tuple[int, int, int]:
    with db.engine.connect() as conn:
        row = conn.execute(sa.select(Counter.used_tokens, Counter.reserved_tokens, Counter.reserved_cost_units)).one()
    return tuple(row)


@pytest.fixture
def limited(make_app: t.Any, backend: str) -> t.Any:
    """A billable with 1,000 tokens and 1 unit of cost, its policy remembered by a first call."""
    app, db, meter = make_app()
    with app.app_context():
        add_plan(db, slug="small", token_limit=1000, cost_limit=Decimal("1"))
        meter.subscribe(TEAM, "small")
        meter.call(lambda: None, billable=TEAM, provider="manual", max_tokens=100, usage={"output_tokens": 100})
        yield db, meter


def test_grouped_holds_are_all_or_nothing(limited):
    db, meter = limited
    assert _hold_many(meter, (500, 0), (401, 0)) is None  # 901 more would pass 1,000
    assert _counter(db) == (100, 0, 0)  # nothing written
    rows = _hold_many(meter, (500, 0), (400, 0))
    assert rows is not None and [r.tokens for r in rows] == [500, 400]
    assert len({r.reservation_id for r in rows}) == 2
    assert _counter(db) == (100, 900, 0)


def test_a_grouped_zero_token_call_needs_a_token_left(limited):
    db, meter = limited
    assert _hold_many(meter, (900, 0), (0, 0)) is not None  # the zero-token call first: a token was left
    assert _hold_many(meter, (0, 0), (0, 0)) is None  # now none is
    assert _counter(db)[1] == 900


def test_grouped_holds_need_some_cost_left_for_the_costliest(limited):
    db, meter = limited
    unit = 10**12  # 1 unit of money in pico-units: the whole cost limit
    assert _hold_many(meter, (1, unit), (1, 1)) is None  # all the cost and one pico more
    assert _hold_many(meter, (1, unit - 1), (1, 1)) is not None  # exactly the limit, each call had some left
    assert _counter(db)[2] == unit


@pytest.mark.parametrize("keyed", [False, True], ids=["keyless", "keyed"])
def test_concurrent_calls_share_holds_and_fill_a_limit_exactly(make_app, backend, keyed):
    app, db, meter = make_app()
    grouped: list[str] = []

    def seen(*args: t.Any) -> None:
        if "INSERT INTO ai_metering_reservations" in args[2] and "unnest(" in args[2]:
            grouped.append(args[2])

    with app.app_context():
        add_plan(db, slug="p", token_limit=20_000)
        meter.subscribe(TEAM, "p")
        sa.event.listen(db.engine, "before_cursor_execute", seen)
    refused: list[int] = []

    def caller(n: int) -> None:
        with app.app_context():
            for i in itertools.count():
                try:
                    meter.call(
                        lambda: time.sleep(0.001),
                        billable=TEAM,
                        provider="manual",
                        max_tokens=100,
                        usage={"output_tokens": 100},
                        idempotency_key=f"{n}-{i}" if keyed else None,
                    )
                except AiLimitExceeded:
                    refused.append(1)
                    return

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert grouped, "no two holds were ever made together"
    assert len(refused) == 8
    with app.app_context():
        assert _counter(db)[:2] == (20_000, 0)
        with db.engine.connect() as conn:
            keys = conn.execute(sa.select(Usage.idempotency_key)).scalars().all()
        assert len(keys) == 200 and (len(set(keys)) == 200 if keyed else set(keys) == {None})
        assert reconcile(meter.runtime()) == []
