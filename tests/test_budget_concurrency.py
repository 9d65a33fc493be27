"""Budgets under real concurrency: 4 processes × 8 threads on SQLite, PostgreSQL and MariaDB.

Each worker process builds its own app from the same database URL (as gunicorn
workers would) and runs threads that call ``meter.call`` until refused. Every limit
a call runs under, the plan's and its budgets', must be filled exactly and never
passed, the counters must equal the ledger, and each alert threshold fire once.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import multiprocessing
import threading
import time
import typing as t

import pytest

from flask_ai_metering import AiLimitExceeded
from flask_ai_metering import signals
from flask_ai_metering.models import BudgetCounter
from flask_ai_metering.models import Counter
from flask_ai_metering.models import Reservation
from flask_ai_metering.models import Usage
from flask_ai_metering.ops.reconcile import reconcile
from tests.conftest import add_plan
from tests.test_concurrency import build_app
from tests.test_concurrency import table_rows

PROCESSES = 4
THREADS = 8
PLAN_LIMIT = 6_000
MEMBER_BUDGET = 1_500
RATE = 40
#: One billable per scenario, so one run of the worker processes covers all three.
MEMBER, RATED, ALERTED = ("Team", "member"), ("Team", "rated"), ("Team", "alerted")
SCENARIOS = {"member": MEMBER, "rate": RATED, "thresholds": ALERTED}

pytestmark = pytest.mark.slow


def worker(url: str) -> dict[str, dict[str, int]]:
    """One process: for each scenario, THREADS threads each calling until refused once."""
    app, meter = build_app(url)
    counts = {name: {"ok": 0, "refused": 0, "crossed_plan": 0, "crossed_budget": 0} for name in SCENARIOS}
    lock = threading.Lock()
    by_billable = {billable: name for name, billable in SCENARIOS.items()}

    def crossed(_: t.Any, **kw: t.Any) -> None:
        with lock:
            counts[by_billable[kw["billable"]]]["crossed_budget" if kw["budget"] is not None else "crossed_plan"] += 1

    signals.threshold_crossed.connect(crossed, sender=app, weak=False)

    def thread(scenario: str, index: int, barrier: threading.Barrier) -> None:
        if scenario == "member":  # half the threads are the member with a budget, spending more per call
            user, tokens, feature = ("member", 100, None) if index % 2 == 0 else ("other", 50, None)
        else:
            user, tokens, feature = f"u{index}", 100 if scenario == "thresholds" else 1, "search"
        with app.app_context():
            barrier.wait()
            while True:
                try:
                    meter.call(
                        lambda: None,
                        billable=SCENARIOS[scenario],
                        user=user,
                        feature=feature,
                        provider="manual",
                        max_tokens=tokens,
                        usage={"output_tokens": tokens},
                    )
                except AiLimitExceeded:
                    with lock:
                        counts[scenario]["refused"] += 1
                    return
                with lock:
                    counts[scenario]["ok"] += 1

    for scenario in SCENARIOS:
        barrier = threading.Barrier(THREADS)
        threads = [threading.Thread(target=thread, args=(scenario, i, barrier)) for i in range(THREADS)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    with app.app_context():
        app.extensions["sqlalchemy"].engine.dispose()
    return counts


def run(url: str) -> dict[str, dict[str, int]]:
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(PROCESSES, mp_context=ctx) as pool:
        results = list(pool.map(worker, [url] * PROCESSES))
    return {name: {k: sum(r[name][k] for r in results) for k in results[0][name]} for name in SCENARIOS}


def _one_window() -> None:
    """Start well inside an hour, so the rate-limited run falls in one window."""
    now = dt.datetime.now(dt.timezone.utc)
    if now.minute == 59 and now.second > 20:
        time.sleep(60.5 - now.second)


def test_budgets_hold_exactly_under_four_processes_of_eight_threads(backend, make_app, db_url):
    """A member budget inside a team plan, a request-rate budget and alert thresholds, all at once."""
    app, db, meter = make_app()
    with app.app_context():
        add_plan(db, slug="team", token_limit=PLAN_LIMIT)
        add_plan(db, slug="big", token_limit=10**9)
        meter.subscribe(MEMBER, "team")
        meter.add_budget(MEMBER, user="member", period="day", token_limit=MEMBER_BUDGET)
        meter.subscribe(RATED, "big")
        rate = meter.add_budget(RATED, feature="search", period="hour", request_limit=RATE)
        meter.subscribe(ALERTED, "team")
        alerts = meter.add_budget(
            ALERTED, feature="search", period="day", token_limit=PLAN_LIMIT * 2, mode="soft", thresholds=[25, 50]
        )
    _one_window()
    counts = run(db_url)
    with app.app_context():
        counters = {(c.billable_id): c for c in table_rows(db, Counter)}
        budget_counters = {b.budget_id: b for b in table_rows(db, BudgetCounter)}
        usage = table_rows(db, Usage)
        assert {r.status for r in table_rows(db, Reservation)} == {"committed"}
        assert reconcile(meter.runtime()) == []
    for name in SCENARIOS:
        assert counts[name]["refused"] == PROCESSES * THREADS, counts
        assert counts[name]["ok"] == len([u for u in usage if u.billable_id == SCENARIOS[name][1]]), counts

    # A member budget inside a team plan: neither is ever exceeded, both are filled exactly.
    plan = counters["member"]
    [member_budget] = [b for b in budget_counters.values() if b.budget_id not in (rate.id, alerts.id)]
    member_rows = [u for u in usage if u.billable_id == "member" and u.user_id == "member"]
    assert (member_budget.used_tokens, member_budget.reserved_tokens) == (MEMBER_BUDGET, 0), counts
    assert (plan.used_tokens, plan.reserved_tokens) == (PLAN_LIMIT, 0), counts
    assert sum(u.total_tokens for u in member_rows) == MEMBER_BUDGET
    assert member_budget.used_requests == len(member_rows) and member_budget.reserved_requests == 0
    assert sum(u.total_tokens for u in usage if u.billable_id == "member") == PLAN_LIMIT

    # A request-rate budget lets exactly N calls through per window.
    window = budget_counters[rate.id]
    assert counts["rate"]["ok"] == RATE == window.used_requests and window.reserved_requests == 0, counts

    # Thresholds crossed by many concurrent calls fire once each: the plan's 80 and 100, the budget's 25 and 50.
    assert (counts["thresholds"]["crossed_plan"], counts["thresholds"]["crossed_budget"]) == (2, 2), counts
    assert (counters["alerted"].alert_level, budget_counters[alerts.id].alert_level) == (100, 50)
    assert budget_counters[alerts.id].used_tokens == PLAN_LIMIT == counters["alerted"].used_tokens
