"""Queued recording: a real Celery worker on Redis, killed mid-batch, loses and duplicates nothing."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import typing as t
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from flask_ai_metering import queueing
from flask_ai_metering.models import Counter
from flask_ai_metering.models import Reservation
from flask_ai_metering.models import Usage
from flask_ai_metering.ops.health import validate
from flask_ai_metering.ops.reconcile import reconcile
from tests.conftest import REQUIRE_SERVICES

TEAM = ("Team", "42")
ROOT = Path(__file__).resolve().parent.parent


def count(meter: t.Any, model: t.Any) -> int:
    with meter.runtime().store.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(model.__table__)).scalar_one())


def call(meter: t.Any, i: int) -> t.Any:
    return meter.call(
        lambda: "ok",
        billable=TEAM,
        provider="manual",
        model="m",
        idempotency_key=f"k{i}",
        usage={"input_tokens": 10 + i, "output_tokens": 1},
    )


def outbox(meter: t.Any) -> list[int]:
    table = Reservation.__table__
    with meter.runtime().store.engine.connect() as conn:
        return [r.id for r in conn.execute(sa.select(table.c.id, table.c.payload)) if r.payload is not None]


def test_an_unreachable_broker_writes_the_row_off_the_request_path(make_app, backend):
    app, _, meter = make_app(AI_METERING_QUEUE_RECORDING=True, CELERY={"broker_url": "redis://127.0.0.1:9/0"})
    with app.app_context():
        result = call(meter, 1)
        assert result.usage_id is None  # the request did not wait for the broker
        assert meter.check(TEAM).used_tokens == 12  # but quota already counts it
        assert queueing.drain()
        deadline = time.monotonic() + 10
        while outbox(meter) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert count(meter, Usage) == 1 and outbox(meter) == []
        assert reconcile(meter.runtime()) == []
        assert validate(app)[-1].startswith("queue: cannot reach the Celery broker at redis://127.0.0.1:9/0")


def test_flush_outbox_writes_what_no_task_wrote(make_app, backend, monkeypatch):
    app, _, meter = make_app(AI_METERING_QUEUE_RECORDING=True, AI_METERING_BATCH_SIZE=3)
    published: list[int] = []
    monkeypatch.setattr(queueing, "enqueue_usage", lambda rt, rid: published.append(rid))
    with app.app_context():
        results = [call(meter, i) for i in range(7)]
        assert all(r.usage_id is None for r in results) and len(published) == 7
        assert count(meter, Usage) == 0 and len(outbox(meter)) == 7
        # Quota is exact before any row is written: the commit counted the usage.
        assert meter.check(TEAM).used_tokens == sum(11 + i for i in range(7))
        # A replay of a queued call answers from the outbox.
        assert call(meter, 3).replayed
        rt = meter.runtime()
        assert queueing.flush_outbox(rt, older_than=dt.timedelta(hours=1)) == 0
        assert queueing.flush_outbox(rt) == 7
        assert queueing.flush_outbox(rt) == 0
        # A late task for an already written reservation writes nothing twice.
        from flask_ai_metering.metering.outbox import write_outbox

        assert write_outbox(rt.store, published[0]) is None
        assert count(meter, Usage) == 7 and outbox(meter) == []
        assert reconcile(rt) == []


def test_record_batch_writes_every_row_in_one_transaction(make_app):
    app, _, meter = make_app(AI_METERING_BATCH_SIZE=2)
    with app.app_context():
        engine = meter.runtime().store.engine
        commits: list[t.Any] = []

        def committed(conn: t.Any) -> None:
            commits.append(conn)

        sa.event.listen(engine, "commit", committed)
        meter.record_batch([{"billable": TEAM, "usage": {"input_tokens": i}} for i in range(5)])
        sa.event.remove(engine, "commit", committed)
        # All or nothing, whatever AI_METERING_BATCH_SIZE says (it sizes cleanup and the outbox).
        assert len(commits) == 1 and count(meter, Usage) == 5


def redis_url() -> str:
    url = os.environ.get("AI_METERING_TEST_REDIS_URL")
    if not url:
        message = "AI_METERING_TEST_REDIS_URL is not set: no Redis to run a Celery worker against"
        if REQUIRE_SERVICES:
            pytest.fail(message)
        pytest.skip(message)
    return url


WORKER = textwrap.dedent(
    """
    import json, os, time
    from flask import Flask
    from flask_sqlalchemy import SQLAlchemy
    from flask_ai_metering import AiMetering, queueing

    app = Flask("worker")
    app.config.update(json.loads(os.environ["TEST_APP_CONFIG"]))
    db = SQLAlchemy(app)
    AiMetering(app, db=db)
    slow = queueing.write_outbox
    def write_slowly(store, reservation_id):
        time.sleep(0.05)  # long enough to be killed in the middle of the batch
        return slow(store, reservation_id)
    queueing.write_outbox = write_slowly
    celery = queueing.make_celery(app)
    celery.worker_main(["worker", "--pool=solo", "--loglevel=WARNING", "--without-gossip",
                        "--without-mingle", "--without-heartbeat", "-Q", os.environ["TEST_QUEUE"]])
    """
)


def start_worker(config: dict[str, t.Any], queue: str, log: t.IO[bytes]) -> subprocess.Popen[bytes]:
    env = {**os.environ, "TEST_APP_CONFIG": json.dumps(config), "TEST_QUEUE": queue, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", WORKER], cwd=ROOT, env=env, stdout=log, stderr=log)


def wait_for(predicate: t.Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (see workers.log in tmp_path)")
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_real_worker_killed_mid_batch_loses_nothing(make_app, db_url, tmp_path):
    broker = redis_url()
    queue = f"aim-test-{uuid.uuid4().hex[:8]}"
    celery_config = {
        "broker_url": broker,
        "task_default_queue": queue,
        # Keys of our own, so the test never touches another user of this Redis database;
        # a short visibility timeout so the killed worker's message comes back within the test.
        "broker_transport_options": {
            "visibility_timeout": 2,
            # Sweep for abandoned messages every second (kombu's default is every ~100 s).
            "unacked_restore_interval": 1,
            "unacked_restore_throttle": 1,
            "unacked_key": f"{queue}:unacked",
            "unacked_index_key": f"{queue}:unacked_index",
            "unacked_mutex_key": f"{queue}:unacked_mutex",
        },
    }
    config = {"SQLALCHEMY_DATABASE_URI": db_url, "AI_METERING_QUEUE_RECORDING": True, "CELERY": celery_config}
    app, _, meter = make_app(AI_METERING_QUEUE_RECORDING=True, CELERY=celery_config)
    workers: list[subprocess.Popen[bytes]] = []
    log = (tmp_path / "workers.log").open("wb")  # read it when this test fails
    try:
        with app.app_context():
            workers.append(start_worker(config, queue, log))
            results = [call(meter, i) for i in range(60)]
            assert all(r.usage_id is None for r in results)  # nothing was written in the request
            wait_for(lambda: count(meter, Usage) >= 10, 60, "the first worker to write some rows")
            os.kill(workers[0].pid, signal.SIGKILL)
            workers[0].wait(10)
            written = count(meter, Usage)
            assert written < 60, "the worker finished before it could be killed mid-batch"
            results += [call(meter, i) for i in range(60, 80)]  # queued while no worker runs
            workers.append(start_worker(config, queue, log))
            wait_for(lambda: count(meter, Usage) == 80 and not outbox(meter), 90, "every row to be written")
            time.sleep(0.5)  # a duplicate delivery would land now
            with meter.runtime().store.engine.connect() as conn:
                ids = list(conn.execute(sa.select(Usage.reservation_id)).scalars())
                used = conn.execute(sa.select(sa.func.sum(Counter.used_tokens))).scalar_one()
            assert len(ids) == len(set(ids)) == 80
            assert used == sum(11 + i for i in range(80))
            assert reconcile(meter.runtime()) == []
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
                try:
                    worker.wait(10)
                except subprocess.TimeoutExpired:
                    worker.kill()
                    worker.wait()
        log.close()
        import redis

        client = redis.Redis.from_url(broker)
        client.delete(queue, f"{queue}:unacked", f"{queue}:unacked_index", f"{queue}:unacked_mutex")
        client.close()
