"""Invariants 1–3 under real concurrency: processes × threads on SQLite, PostgreSQL and MariaDB.

Each worker process builds its own app from the same database URL (as gunicorn
workers would) and runs threads that call ``meter.call`` until the limit refuses
them. The limit must be filled exactly, never passed, with nothing left held.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import multiprocessing
import os
import signal
import threading
import time
import typing as t

import pytest
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_ai_metering import AiLimitExceeded
from flask_ai_metering import AiMetering
from flask_ai_metering import IdempotencyConflict
from flask_ai_metering.models import Counter
from flask_ai_metering.models import Reservation
from flask_ai_metering.models import Usage
from flask_ai_metering.ops.reconcile import reconcile
from tests.conftest import add_plan

PROCESSES = 4
THREADS = 8
LIMIT = 10_000
CALL = 100
TEAM = ("Team", "hot")

pytestmark = pytest.mark.slow


def build_app(url: str) -> tuple[Flask, AiMetering]:
    app = Flask("worker")
    app.config["SQLALCHEMY_DATABASE_URI"] = url
    if url.startswith("sqlite"):
        app.config["SQLALCHEMY_ENGINE_OPTIONS"] = {"connect_args": {"timeout": 60}}
    else:
        app.config["SQLALCHEMY_ENGINE_OPTIONS"] = {"pool_size": THREADS, "max_overflow": 0}
    db = SQLAlchemy()
    db.init_app(app)
    return app, AiMetering(app, db=db)


def spend_until_refused(url: str, key: str | None = None) -> dict[str, int]:
    """One worker process: THREADS threads calling until each is refused once."""
    app, meter = build_app(url)
    counts = {"ok": 0, "refused": 0, "replayed": 0, "conflict": 0}
    lock = threading.Lock()
    barrier = threading.Barrier(THREADS)

    def thread() -> None:
        with app.app_context():
            barrier.wait()
            while True:
                try:
                    result = meter.call(
                        lambda: None,
                        billable=TEAM,
                        provider="manual",
                        max_tokens=CALL,
                        usage={"output_tokens": CALL},
                        idempotency_key=key,
                    )
                except AiLimitExceeded:
                    outcome = "refused"
                except IdempotencyConflict:
                    outcome = "conflict"
                else:
                    outcome = "replayed" if result.replayed else "ok"
                with lock:
                    counts[outcome] += 1
                if outcome == "refused" or key is not None:
                    return

    threads = [threading.Thread(target=thread) for _ in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    with app.app_context():
        app.extensions["sqlalchemy"].engine.dispose()
    return counts


def run_processes(url: str, key: str | None = None) -> dict[str, int]:
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(PROCESSES, mp_context=ctx) as pool:
        results = list(pool.map(spend_until_refused, [url] * PROCESSES, [key] * PROCESSES))
    return {k: sum(r[k] for r in results) for k in results[0]}


def table_rows(db: SQLAlchemy, model: t.Any) -> list[t.Any]:
    with db.engine.connect() as conn:
        return list(conn.execute(sa.select(model.__table__)))


def test_limit_is_filled_exactly_never_passed(backend, make_app, db_url):
    app, db, meter = make_app()
    with app.app_context():
        add_plan(db, slug="hot", token_limit=LIMIT)
        meter.subscribe(TEAM, "hot")
    counts = run_processes(db_url)
    with app.app_context():
        [counter] = table_rows(db, Counter)
        usage = table_rows(db, Usage)
        assert counter.used_tokens == LIMIT, counts
        assert counter.reserved_tokens == 0
        assert counts["ok"] == LIMIT // CALL == len(usage)
        assert counts["refused"] == PROCESSES * THREADS
        assert sum(u.total_tokens for u in usage) == LIMIT
        assert {r.status for r in table_rows(db, Reservation)} == {"committed"}
        assert reconcile(meter.runtime()) == []


def test_one_key_replayed_concurrently_is_recorded_once(backend, make_app, db_url):
    app, db, meter = make_app()
    counts = run_processes(db_url, key="same-key")
    with app.app_context():
        usage = table_rows(db, Usage)
        [counter] = table_rows(db, Counter)
        assert len(usage) == 1 and counts["ok"] == 1, counts
        assert counts["ok"] + counts["replayed"] + counts["conflict"] == PROCESSES * THREADS
        assert (counter.used_tokens, counter.reserved_tokens) == (CALL, 0)
        assert reconcile(meter.runtime()) == []


def hold_and_hang(url: str, ready: t.Any) -> None:
    """Reserve, then hang inside the provider call until killed."""
    app, meter = build_app(url)
    with app.app_context():
        meter.call(lambda: (ready.set(), time.sleep(600)), billable=TEAM, provider="manual", max_tokens=700)


def test_killed_process_reservation_is_released_by_expiry(backend, make_app, db_url):
    app, db, meter = make_app()
    with app.app_context():
        add_plan(db, slug="p", token_limit=1000)
        meter.subscribe(TEAM, "p")
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    child = ctx.Process(target=hold_and_hang, args=(db_url, ready))
    child.start()
    try:
        assert ready.wait(60), "the child never reached the provider call"
        os.kill(t.cast(int, child.pid), signal.SIGKILL)
        child.join(30)
    finally:
        if child.is_alive():
            child.kill()
    with app.app_context():
        assert meter.check(TEAM, tokens=400).allowed is False  # 700 still held by the dead process
        later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=meter.settings().reservation_ttl + 1)
        assert meter.expire_reservations(now=later) == 1
        [counter] = table_rows(db, Counter)
        assert (counter.used_tokens, counter.reserved_tokens) == (0, 0)
        assert meter.check(TEAM, tokens=1000).allowed is True
        assert reconcile(meter.runtime()) == []


@pytest.mark.parametrize("queued", [False, True], ids=["direct", "queued"])
def test_sweeper_racing_live_commits_keeps_counters_exact(backend, make_app, queued):
    """Expire every reservation in flight while calls commit: each is counted once either way."""
    # Queued: an unreachable broker makes the publisher thread write each row itself.
    config = {"AI_METERING_QUEUE_RECORDING": True, "CELERY": {"broker_url": "redis://127.0.0.1:9/0"}} if queued else {}
    app, db, meter = make_app(**config)
    with app.app_context():
        add_plan(db, slug="p", token_limit=10**9)
        meter.subscribe(TEAM, "p")
    stop = threading.Event()
    failures: list[BaseException] = []

    def caller() -> None:
        with app.app_context():
            for _ in range(25):
                try:
                    meter.call(
                        lambda: time.sleep(0.005),
                        billable=TEAM,
                        provider="manual",
                        max_tokens=100,
                        usage={"output_tokens": 60},
                    )
                except BaseException as exc:  # pragma: no cover - reported below
                    failures.append(exc)

    def sweeper() -> None:
        with app.app_context():
            future = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1)
            while not stop.is_set():
                meter.expire_reservations(now=future)

    sweep = threading.Thread(target=sweeper)
    sweep.start()
    callers = [threading.Thread(target=caller) for _ in range(4)]
    for th in callers:
        th.start()
    for th in callers:
        th.join()
    stop.set()
    sweep.join()
    assert failures == []
    with app.app_context():
        if queued:
            from flask_ai_metering.queueing import drain
            from flask_ai_metering.queueing import flush_outbox

            assert drain()
            flush_outbox(meter.runtime())  # what the publisher has not written yet
        [counter] = table_rows(db, Counter)
        statuses = [r.status for r in table_rows(db, Reservation)]
        assert counter.used_tokens == 100 * 60 == sum(u.total_tokens for u in table_rows(db, Usage))
        assert counter.reserved_tokens == 0
        assert statuses.count("expired") > 0, "the sweeper never won a race: the test proves nothing"
        assert reconcile(meter.runtime()) == []
