"""Reserve+commit throughput on one hot billable and on many, beside a naive baseline.

The naive baseline is what the reference packages do: read the period's usage,
compare with the limit in Python, then increment. Run with the same threads in
the same run, it shows the overshoot our conditional UPDATE prevents.
"""

from __future__ import annotations

import threading
import time
import typing as t

import sqlalchemy as sa

from bench.common import add_plan
from bench.common import database
from bench.common import make_app
from bench.common import percentiles
from flask_ai_metering import AiLimitExceeded
from flask_ai_metering.models import Counter

SECONDS = 3.0


def _throughput(app: t.Any, meter: t.Any, concurrency: int, billables: list[tuple[str, str]]) -> dict[str, t.Any]:
    """Calls per second and latency with ``concurrency`` threads for ``SECONDS``."""
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    barrier = threading.Barrier(concurrency + 1)
    stop = threading.Event()

    def worker(i: int) -> None:
        billable = billables[i % len(billables)]
        with app.app_context():
            barrier.wait()
            while not stop.is_set():
                start = time.perf_counter()
                meter.call(
                    lambda: None, billable=billable, provider="manual", max_tokens=100, usage={"output_tokens": 100}
                )
                latencies[i].append((time.perf_counter() - start) * 1000)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for th in threads:
        th.start()
    barrier.wait()
    started = time.perf_counter()
    time.sleep(SECONDS)
    stop.set()
    for th in threads:
        th.join()
    elapsed = time.perf_counter() - started
    samples = [x for per in latencies for x in per]
    p50, p99 = percentiles(samples)
    return {"calls_per_s": round(len(samples) / elapsed), "p50_ms": round(p50, 2), "p99_ms": round(p99, 2)}


def _overshoot_ours(app: t.Any, db: t.Any, meter: t.Any, threads: int) -> int:
    """Tokens committed past a 10,000 limit by ``threads`` racing callers: must be 0."""
    billable = ("Team", "race")
    add_plan(db, "race", token_limit=10_000)
    meter.subscribe(billable, "race")
    barrier = threading.Barrier(threads)

    def worker() -> None:
        with app.app_context():
            barrier.wait()
            while True:
                try:
                    meter.call(
                        lambda: None, billable=billable, provider="manual", max_tokens=100, usage={"output_tokens": 100}
                    )
                except AiLimitExceeded:
                    return

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    table = Counter.__table__
    with db.engine.connect() as conn:
        used = conn.execute(sa.select(table.c.used_tokens).where(table.c.billable_id == "race")).scalar_one()
    return int(used) - 10_000


def _overshoot_naive(db: t.Any, threads: int) -> int:
    """The reference packages' read → check → increment on a plain counter row, same threads."""
    engine = db.engine
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE naive_counter (id INTEGER PRIMARY KEY, used BIGINT NOT NULL)")
        conn.exec_driver_sql("INSERT INTO naive_counter (id, used) VALUES (1, 0)")
    barrier = threading.Barrier(threads)

    def worker() -> None:
        barrier.wait()
        while True:
            with engine.connect() as conn:
                used = conn.exec_driver_sql("SELECT used FROM naive_counter WHERE id = 1").scalar_one()
                if used + 100 > 10_000:
                    conn.rollback()
                    return
                time.sleep(0.001)  # the provider call between the check and the increment
                conn.exec_driver_sql("UPDATE naive_counter SET used = used + 100 WHERE id = 1")
                conn.commit()

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    with engine.connect() as conn:
        return int(conn.exec_driver_sql("SELECT used FROM naive_counter WHERE id = 1").scalar_one()) - 10_000


def run(backends: list[str], concurrencies: tuple[int, ...] = (1, 8, 32)) -> list[dict[str, t.Any]]:
    rows = []
    for backend in backends:
        with database(backend) as url:
            app, db, meter = make_app(url, pool_size=max(concurrencies) + 2)
            with app.app_context():
                add_plan(db, "big", token_limit=10**15)
                hot = [("Team", "hot")]
                many = [("Team", f"b{i}") for i in range(max(concurrencies))]
                for billable in hot + many:
                    meter.subscribe(billable, "big")
                for label, billables in (("hot billable", hot), ("many billables", many)):
                    for concurrency in concurrencies:
                        result = _throughput(app, meter, concurrency, billables)
                        rows.append(
                            {
                                "bench": f"reserve+commit, {label}",
                                "backend": backend,
                                "concurrency": concurrency,
                                **result,
                            }
                        )
                ours = _overshoot_ours(app, db, meter, 16)
                naive = _overshoot_naive(db, 16)
                rows.append(
                    {
                        "bench": "overshoot past 10,000 tokens, 16 threads",
                        "backend": backend,
                        "ours_tokens": ours,
                        "naive_check_then_increment_tokens": naive,
                    }
                )
                db.engine.dispose()
    return rows
