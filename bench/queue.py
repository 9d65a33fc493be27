"""Request-path time of ``meter.call`` with and without queued recording, in the same run.

Queued recording takes the ledger INSERT (and its index updates) out of the
request but adds a publish to the broker; this measures what is left on the
request path. Calls alternate between a synchronous and a queued app on the
same database so drift (caches, disk, other load) hits both alike. The broker
is ``AI_METERING_TEST_REDIS_URL`` (else Celery's in-memory transport, which
leaves the network round trip out: the row says which). No worker runs: the
queued rows stay in the outbox of the throwaway database.
"""

from __future__ import annotations

import os
import time
import typing as t
import uuid

from bench.common import database
from bench.common import make_app
from bench.common import percentiles
from bench.common import postgres_available

WARMUP = 50


def _time_call(meter: t.Any, i: int) -> float:
    started = time.perf_counter()
    meter.call(
        lambda: "ok",
        billable=("Team", str(i % 50)),
        provider="manual",
        model="gpt-4o-mini",
        usage={"input_tokens": 1000, "output_tokens": 200},
        feature="bench",
        meta={"i": i},
    )
    return (time.perf_counter() - started) * 1000


def run(backends: list[str] | None = None, calls: int = 1000) -> list[dict[str, t.Any]]:
    """One row per database: request-path latency synchronous vs queued, and the time saved."""
    if backends is None:
        backends = ["sqlite", "postgresql"] if postgres_available() else ["sqlite"]
    broker = os.environ.get("AI_METERING_TEST_REDIS_URL") or "memory://"
    queue = f"aim-bench-{uuid.uuid4().hex[:8]}"
    try:
        return [_bench(backend, broker, queue, calls) for backend in backends]
    finally:
        if broker.startswith("redis"):
            import redis

            client = redis.Redis.from_url(broker)
            client.delete(queue)
            client.close()


def _bench(backend: str, broker: str, queue: str, calls: int) -> dict[str, t.Any]:
    celery = {"broker_url": broker, "task_default_queue": queue}
    with database(backend) as url:
        apps = [make_app(url, AI_METERING_QUEUE_RECORDING=queued, CELERY=celery) for queued in (False, True)]
        samples: list[list[float]] = [[], []]
        for i in range(WARMUP + calls):
            for which, (app, _, meter) in enumerate(apps):
                with app.app_context():
                    elapsed = _time_call(meter, i)
                if i >= WARMUP:
                    samples[which].append(elapsed)
        for app, db, _ in apps:
            with app.app_context():
                db.engine.dispose()
    (s50, s99), (q50, q99) = percentiles(samples[0]), percentiles(samples[1])
    return {
        "bench": "queued recording",
        "backend": backend,
        "broker": broker.split("://")[0],
        "calls": calls,
        "sync_p50_ms": round(s50, 3),
        "sync_p99_ms": round(s99, 3),
        "queued_p50_ms": round(q50, 3),
        "queued_p99_ms": round(q99, 3),
        "saved_p50_ms": round(s50 - q50, 3),
    }


if __name__ == "__main__":
    for row in run():
        print(row)
