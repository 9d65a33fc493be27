"""Alert webhooks: written in the commit, signed, retried with backoff, each seen once by a receiver.

The receiver is a real HTTP server on 127.0.0.1 that checks every signature and
records every POST, so "exactly once" counts what arrived on the wire. Each test runs
on SQLite, PostgreSQL and MariaDB.
"""

from __future__ import annotations

import collections
import datetime as dt
import http.server
import json
import subprocess
import sys
import threading
import time
import typing as t
from pathlib import Path

import pytest
import sqlalchemy as sa
from flask import Flask

from flask_ai_metering.alerts import delivery
from flask_ai_metering.alerts import worker
from flask_ai_metering.alerts.delivery import deliver_due
from flask_ai_metering.alerts.outbox import events
from flask_ai_metering.alerts.outbox import write_alert
from flask_ai_metering.alerts.signing import sign
from flask_ai_metering.alerts.signing import verify
from flask_ai_metering.errors import ConfigurationError
from flask_ai_metering.errors import InvalidUsage
from flask_ai_metering.models import utcnow
from flask_ai_metering.ops.maintenance import cleanup
from flask_ai_metering.runtime import Runtime
from tests.conftest import AppFactory

ROOT = Path(__file__).resolve().parent.parent
SECRET = "whsec-test-0123456789"
TEAM = ("Team", "7")

pytestmark = pytest.mark.usefixtures("backend")


class Receiver:
    """A webhook receiver on loopback: verifies each signature, records each POST's event id.

    ``statuses`` are answered in turn (then 200). While ``hold`` is set, a request
    that arrives waits for ``release`` before answering (``arrived`` tells it came).
    """

    def __init__(self) -> None:
        self.posts: list[str] = []
        self.verified: list[str] = []
        self.headers: list[dict[str, str]] = []
        self.statuses: collections.deque[int] = collections.deque()
        self.hold = False
        self.arrived = threading.Event()
        self.release = threading.Event()
        self.lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                event_id = json.loads(body)["id"]
                ok = verify(body, self.headers.get("AI-Metering-Signature", ""), SECRET)
                with receiver.lock:
                    receiver.posts.append(event_id)
                    receiver.headers.append(dict(self.headers))
                    if ok and self.headers.get("AI-Metering-Event-Id") == event_id:
                        receiver.verified.append(event_id)
                    status = receiver.statuses.popleft() if receiver.statuses else (200 if ok else 400)
                    hold = receiver.hold
                if hold:
                    receiver.arrived.set()
                    receiver.release.wait(60)
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: t.Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/ai"
        # A short poll: shutdown() waits up to one interval, and every test stops a receiver.
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def counts(self) -> collections.Counter[str]:
        with self.lock:
            return collections.Counter(self.posts)

    def wait_for(self, n: int, timeout: float = 60.0) -> None:
        """Wait until ``n`` POSTs arrived (a deadline against hangs, not a speed check)."""
        deadline = time.monotonic() + timeout
        while len(self.posts) < n:
            assert time.monotonic() < deadline, f"only {len(self.posts)} of {n} alerts arrived"
            time.sleep(0.02)


@pytest.fixture
def receiver() -> t.Iterator[Receiver]:
    server = Receiver()
    server.thread.start()
    yield server
    server.release.set()
    server.server.shutdown()
    server.server.server_close()


class Made(t.NamedTuple):
    app: Flask
    rt: Runtime


@pytest.fixture
def make_alerting(make_app: AppFactory, receiver: Receiver) -> t.Iterator[t.Callable[..., Made]]:
    """``(app, rt)`` of an app that sends alerts to the receiver (CLI delivery unless told)."""
    apps: list[Flask] = []

    def factory(**config: t.Any) -> Made:
        config.setdefault("AI_METERING_ALERT_WEBHOOK_URL", receiver.url)
        config.setdefault("AI_METERING_ALERT_WEBHOOK_SECRET", SECRET)
        config.setdefault("AI_METERING_ALERT_DELIVERY", "cli")
        app, _, meter = make_app(**config)
        apps.append(app)
        with app.app_context():
            return Made(app, meter.runtime())

    yield factory
    for app in apps:
        assert worker.stop(app)


def write(rt: Runtime, *ids: str, now: dt.datetime | None = None) -> list[bool]:
    """Commit alerts ``ids`` in one metering transaction, as a threshold crossing does."""

    def work(conn: sa.Connection) -> list[bool]:
        return [
            write_alert(
                conn,
                rt.settings,
                event_id=event_id,
                kind="threshold_crossed",
                billable=TEAM,
                data={"threshold": 80, "usage": "81.5", "budget": None},
                now=now or utcnow(),
            )
            for event_id in ids
        ]

    return rt.store.run(work)


def rows(rt: Runtime) -> dict[str, t.Any]:
    with rt.store.engine.connect() as conn:
        return {row.event_id: row for row in conn.execute(sa.select(events))}


def deliver_cli(app: Flask, *args: str) -> tuple[int, dict[str, int]]:
    result = app.test_cli_runner().invoke(args=["ai-metering", "deliver-alerts", *args])
    return result.exit_code, json.loads(result.stdout)


#: Checks that never reach a database: run on one backend, not three.
ONE_BACKEND = pytest.mark.parametrize("backend", ["sqlite"])


# -- the outbox -------------------------------------------------------------------------


def test_write_alert_stores_the_body_once_per_event_id(make_alerting: t.Callable[..., Made]) -> None:
    _, rt = make_alerting()
    now = utcnow()
    assert write(rt, "evt-1", now=now) == [True]

    def again(conn: sa.Connection) -> int:
        # A duplicate neither raises nor spoils the transaction: the statement after it runs.
        duplicate = write_alert(
            conn, rt.settings, event_id="evt-1", kind="threshold_crossed", billable=TEAM, data={}, now=now
        )
        assert duplicate is False
        return int(conn.execute(sa.select(sa.func.count()).select_from(events)).scalar_one())

    assert rt.store.run(again) == 1
    row = rows(rt)["evt-1"]
    assert row.payload == {
        "id": "evt-1",
        "type": "threshold_crossed",
        "created": now.isoformat(),
        "data": {"threshold": 80, "usage": "81.5", "budget": None},
    }
    assert (row.billable_type, row.billable_id, row.attempts, row.delivered_at) == ("Team", "7", 0, None)


def test_write_alert_without_a_webhook_writes_nothing(make_app: AppFactory) -> None:
    app, _, meter = make_app()
    with app.app_context():
        rt = meter.runtime()
    assert write(rt, "evt-1") == [False]
    assert rows(rt) == {}
    assert deliver_due(rt).remaining == 0


def test_a_rolled_back_crossing_leaves_no_alert(make_alerting: t.Callable[..., Made]) -> None:
    _, rt = make_alerting()

    def crossing_then_failure(conn: sa.Connection) -> None:
        write_alert(conn, rt.settings, event_id="evt-1", kind="threshold_crossed", billable=TEAM, data={}, now=utcnow())
        raise RuntimeError("the counter update failed")

    with pytest.raises(RuntimeError):
        rt.store.run(crossing_then_failure)
    assert rows(rt) == {}


@ONE_BACKEND  # refused in Python before any INSERT: the same on every database
@pytest.mark.parametrize(
    ("field", "options"),
    [
        ("event_id", {"event_id": "x" * 65}),
        ("event_id", {"event_id": ""}),
        ("kind", {"kind": "k" * 51}),
        ("billable id", {"billable": ("Team", "")}),
        ("JSON", {"data": {"amount": object()}}),
        ("timezone-aware", {"now": dt.datetime(2026, 1, 1)}),
    ],
)
def test_bad_alerts_are_refused_naming_the_field(
    make_alerting: t.Callable[..., Made], field: str, options: dict[str, t.Any]
) -> None:
    _, rt = make_alerting()
    arguments: dict[str, t.Any] = {
        "event_id": "evt-1",
        "kind": "threshold_crossed",
        "billable": TEAM,
        "data": {},
        "now": utcnow(),
        **options,
    }
    with pytest.raises(InvalidUsage, match=field):
        rt.store.run(lambda conn: write_alert(conn, rt.settings, **arguments))
    assert rows(rt) == {}


# -- delivery ---------------------------------------------------------------------------


def test_the_cli_delivers_each_alert_once_signed(make_alerting: t.Callable[..., Made], receiver: Receiver) -> None:
    app, rt = make_alerting()
    ids = [f"evt-{i}" for i in range(5)]
    write(rt, *ids)
    assert deliver_cli(app) == (0, {"delivered": 5, "failed": 0, "remaining": 0, "exhausted": 0})
    assert deliver_cli(app) == (0, {"delivered": 0, "failed": 0, "remaining": 0, "exhausted": 0})
    assert receiver.counts() == {event_id: 1 for event_id in ids}
    assert sorted(receiver.verified) == ids
    assert all(h["Content-Type"] == "application/json" for h in receiver.headers)
    assert all(row.delivered_at is not None and row.claimed_until is None for row in rows(rt).values())


def test_the_thread_delivers_each_alert_once(make_alerting: t.Callable[..., Made], receiver: Receiver) -> None:
    app, rt = make_alerting(AI_METERING_ALERT_DELIVERY="thread")
    ids = [f"evt-{i}" for i in range(6)]
    write(rt, *ids[:3])
    worker.wake(rt)
    receiver.wait_for(3)
    write(rt, *ids[3:])
    worker.wake(rt)  # a running thread is nudged; a thread that went idle is started again
    receiver.wait_for(6)
    assert worker.stop(app)
    assert receiver.counts() == {event_id: 1 for event_id in ids}
    assert sorted(receiver.verified) == ids
    assert all(row.delivered_at is not None for row in rows(rt).values())


def test_the_thread_stops_when_nothing_is_left(make_alerting: t.Callable[..., Made], receiver: Receiver) -> None:
    app, rt = make_alerting(AI_METERING_ALERT_DELIVERY="thread")
    write(rt, "evt-1")
    worker.wake(rt)
    receiver.wait_for(1)
    deadline = time.monotonic() + 60
    while worker.running(app):
        assert time.monotonic() < deadline, "the idle deliverer thread did not stop"
        time.sleep(0.02)
    assert receiver.counts() == {"evt-1": 1}


@ONE_BACKEND
def test_wake_does_nothing_in_cli_mode(make_alerting: t.Callable[..., Made]) -> None:
    app, rt = make_alerting(AI_METERING_ALERT_DELIVERY="cli")
    write(rt, "evt-1")
    worker.wake(rt)
    assert not worker.running(app)
    assert rows(rt)["evt-1"].delivered_at is None


def test_a_failed_delivery_is_retried_with_backoff_under_the_same_id(
    make_alerting: t.Callable[..., Made], receiver: Receiver
) -> None:
    _, rt = make_alerting()
    t0 = utcnow()
    write(rt, "evt-1", now=t0)
    receiver.statuses.append(500)

    report = deliver_due(rt, now=t0)
    assert (report.delivered, report.failed, report.remaining, report.exhausted) == (0, 1, 1, 0)
    row = rows(rt)["evt-1"]
    assert (row.attempts, row.last_error, row.delivered_at, row.claimed_until) == (1, "HTTP 500", None, None)
    assert t0 + dt.timedelta(seconds=2) <= row.next_attempt_at <= t0 + dt.timedelta(seconds=2.5)

    assert deliver_due(rt, now=t0 + dt.timedelta(seconds=1)).delivered == 0  # not due yet
    report = deliver_due(rt, now=t0 + dt.timedelta(seconds=3))
    assert (report.delivered, report.failed, report.remaining) == (1, 0, 0)
    assert receiver.posts == ["evt-1", "evt-1"]
    assert receiver.verified == ["evt-1", "evt-1"]
    row = rows(rt)["evt-1"]
    assert (row.attempts, row.last_error) == (2, None)
    assert row.delivered_at == t0 + dt.timedelta(seconds=3)


@ONE_BACKEND
def test_backoff_doubles_up_to_an_hour() -> None:
    for attempt, seconds in [(1, 2), (2, 4), (5, 32), (11, 2048), (12, 3600), (40, 3600)]:
        wait = delivery.backoff(attempt).total_seconds()
        assert seconds <= wait <= seconds * 1.25


def test_an_alert_out_of_attempts_fails_the_cli_until_retried(
    make_alerting: t.Callable[..., Made], receiver: Receiver
) -> None:
    app, rt = make_alerting(AI_METERING_ALERT_MAX_ATTEMPTS=2)
    t0 = utcnow() - dt.timedelta(hours=3)
    write(rt, "evt-1", now=t0)
    receiver.statuses.extend([503, 500])
    assert deliver_due(rt, now=t0).failed == 1
    report = deliver_due(rt, now=t0 + dt.timedelta(hours=1))
    assert (report.failed, report.remaining, report.exhausted, report.ok) == (1, 1, 1, False)
    assert rows(rt)["evt-1"].last_error == "HTTP 500"

    code, counts = deliver_cli(app)  # nothing left to try: it says so and fails
    assert (code, counts["delivered"], counts["exhausted"]) == (1, 0, 1)
    code, counts = deliver_cli(app, "--retry-failed")
    assert (code, counts) == (0, {"delivered": 1, "failed": 0, "remaining": 0, "exhausted": 0})
    assert receiver.counts() == {"evt-1": 3}
    assert receiver.verified == ["evt-1"] * 3


def test_an_unreachable_receiver_is_recorded_by_exception_class(make_alerting: t.Callable[..., Made]) -> None:
    # Nothing listens on port 9 of loopback (discard, never served here).
    _, rt = make_alerting(AI_METERING_ALERT_WEBHOOK_URL="http://127.0.0.1:9/hook")
    write(rt, "evt-1")
    assert deliver_due(rt).failed == 1
    assert rows(rt)["evt-1"].last_error == "URLError(ConnectionRefusedError)"


def test_a_redirect_is_a_failure_not_followed(make_alerting: t.Callable[..., Made], receiver: Receiver) -> None:
    _, rt = make_alerting()
    write(rt, "evt-1")
    receiver.statuses.append(302)
    assert deliver_due(rt).failed == 1
    assert rows(rt)["evt-1"].last_error == "HTTP 302"
    assert receiver.posts == ["evt-1"]


# -- concurrency and crashes ------------------------------------------------------------


def test_a_claimed_alert_is_not_sent_by_another_deliverer(
    make_alerting: t.Callable[..., Made], receiver: Receiver
) -> None:
    """While one deliverer's POST is in flight, a second (another app: another pool) skips that row."""
    _, first = make_alerting()
    _, second = make_alerting()
    write(first, "evt-1", "evt-2")
    receiver.hold = True
    reports: list[delivery.DeliveryReport] = []
    slow = threading.Thread(target=lambda: reports.append(deliver_due(first, limit=1)))
    slow.start()
    assert receiver.arrived.wait(60)
    receiver.hold = False
    other = deliver_due(second)
    assert (other.delivered, other.remaining) == (1, 1)  # evt-2 sent; evt-1 held by the first
    receiver.release.set()
    slow.join(60)
    assert reports[0].delivered == 1
    assert receiver.counts() == {"evt-1": 1, "evt-2": 1}


def test_concurrent_deliverers_never_send_an_alert_twice(
    make_alerting: t.Callable[..., Made], receiver: Receiver
) -> None:
    """Four deliverers of two apps and the background thread, all at once, over 40 alerts."""
    _, one = make_alerting(AI_METERING_ALERT_DELIVERY="thread")
    _, two = make_alerting()
    ids = [f"evt-{i:02}" for i in range(40)]
    write(one, *ids)
    start = threading.Barrier(4)

    def run(rt: Runtime) -> None:
        start.wait()
        deliver_due(rt, limit=None)

    threads = [threading.Thread(target=run, args=(rt,)) for rt in (one, one, two, two)]
    for thread in threads:
        thread.start()
    worker.wake(one)
    for thread in threads:
        thread.join(120)
    receiver.wait_for(40)
    assert worker.stop(one.app)
    assert receiver.counts() == {event_id: 1 for event_id in ids}
    assert all(row.delivered_at is not None for row in rows(one).values())


def _crash(db_url: str, receiver: Receiver, mode: str, event_id: str) -> None:
    crashed = subprocess.run(
        [sys.executable, "-m", "tests.crash_alerts", db_url, receiver.url, SECRET, mode, event_id],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert crashed.returncode == 3, crashed.stderr  # os._exit: no clean-up, no atexit, no thread ran


def test_an_alert_committed_by_a_sender_that_died_is_delivered_once(
    make_alerting: t.Callable[..., Made], receiver: Receiver, db_url: str
) -> None:
    app, rt = make_alerting()
    _crash(db_url, receiver, "after-write", "evt-crash")
    assert receiver.posts == []
    assert rows(rt)["evt-crash"].delivered_at is None
    assert deliver_cli(app) == (0, {"delivered": 1, "failed": 0, "remaining": 0, "exhausted": 0})
    assert deliver_cli(app)[1]["delivered"] == 0
    assert receiver.counts() == {"evt-crash": 1}
    assert receiver.verified == ["evt-crash"]


def test_a_deliverer_that_died_holding_a_claim_loses_it_when_it_runs_out(
    make_alerting: t.Callable[..., Made], receiver: Receiver, db_url: str
) -> None:
    app, rt = make_alerting()
    write(rt, "evt-1")
    _crash(db_url, receiver, "after-claim", "evt-1")
    row = rows(rt)["evt-1"]
    assert (row.attempts, row.delivered_at) == (1, None)
    assert row.claimed_until is not None

    assert deliver_cli(app) == (0, {"delivered": 0, "failed": 0, "remaining": 1, "exhausted": 0})
    assert receiver.posts == []  # the claim still holds
    later = row.claimed_until + dt.timedelta(seconds=1)
    assert delivery.next_due(rt) == row.claimed_until
    assert deliver_due(rt, now=later).delivered == 1
    assert receiver.counts() == {"evt-1": 1}
    assert rows(rt)["evt-1"].attempts == 2


# -- housekeeping -----------------------------------------------------------------------


def test_cleanup_deletes_old_delivered_alerts_only(make_alerting: t.Callable[..., Made]) -> None:
    _, rt = make_alerting()
    old = utcnow() - dt.timedelta(days=400)
    write(rt, "old-delivered", "old-undelivered", now=old)
    write(rt, "new-delivered")
    with rt.store.engine.begin() as conn:
        conn.execute(sa.update(events).where(events.c.event_id == "old-delivered").values(delivered_at=old))
        conn.execute(sa.update(events).where(events.c.event_id == "new-delivered").values(delivered_at=utcnow()))
    assert cleanup(rt, dry_run=True)["delivered alerts"] == 1
    assert cleanup(rt)["delivered alerts"] == 1
    assert sorted(rows(rt)) == ["new-delivered", "old-undelivered"]


@ONE_BACKEND
def test_the_webhook_url_must_be_http(make_app: AppFactory) -> None:
    with pytest.raises(ConfigurationError, match="AI_METERING_ALERT_WEBHOOK_URL must be an http"):
        make_app(AI_METERING_ALERT_WEBHOOK_URL="file:///etc/passwd", AI_METERING_ALERT_WEBHOOK_SECRET=SECRET)
    with pytest.raises(ConfigurationError, match="AI_METERING_ALERT_WEBHOOK_SECRET"):
        make_app(AI_METERING_ALERT_WEBHOOK_URL="https://example.com/hook")


# -- signatures -------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_verify_accepts_only_a_fresh_signature_of_these_bytes_with_this_secret() -> None:
    body = b'{"id":"evt-1"}'
    now = 1_800_000_000
    header = sign(body, SECRET, now)
    assert header.startswith(f"t={now},v1=")
    assert verify(body, header, SECRET, now=now + 299)
    assert not verify(body + b" ", header, SECRET, now=now)  # a changed body
    assert not verify(body, header, "another-secret", now=now)
    assert not verify(body, header, SECRET, now=now + 301)  # too old: a replay
    assert not verify(body, header, SECRET, now=now - 301)  # from the future
    assert verify(body, header, SECRET, now=now + 10_000, tolerance=0)
    assert not verify(body, header.replace(f"t={now}", f"t={now + 1}"), SECRET, now=now)
    for garbage in ["", "v1=abc", f"t={now}", "t=soon,v1=abc", f"t={now},v1=é", "nonsense"]:
        assert not verify(body, garbage, SECRET, now=now)
    rotated = f"t={now},v1={'0' * 64},{header.split(',')[1]}"  # one of several signatures matches
    assert verify(body, rotated, SECRET, now=now)


# -- end to end: crossings of plans and budgets --------------------------------------------


@pytest.mark.parametrize("delivery", ["cli", "thread"])
def test_thresholds_crossed_by_calls_reach_the_webhook_once_each(
    make_alerting: t.Callable[..., Made], receiver: Receiver, delivery: str
) -> None:
    """Calls cross a plan's and a budget's thresholds; each alert is POSTed once, signed, with its data."""
    from tests.conftest import add_plan

    made = make_alerting(AI_METERING_ALERT_DELIVERY=delivery)
    meter = made.app.extensions["ai_metering"]
    with made.app.app_context():
        add_plan(made.app.extensions["sqlalchemy"], slug="team", token_limit=1000)
        meter.subscribe(TEAM, "team")
        budget = meter.add_budget(TEAM, user="member", period="day", token_limit=200)
        # The budget: 75 %, then 100 %. The plan: 90 %, then 100 %.
        for user, tokens in (("member", 150), ("member", 50), ("other", 700), ("other", 100)):
            meter.call(
                lambda: None,
                billable=TEAM,
                user=user,
                provider="manual",
                max_tokens=tokens,
                usage={"output_tokens": tokens},
            )
        if delivery == "cli":
            assert deliver_cli(made.app)[0] == 0
        receiver.wait_for(4)
        assert worker.stop(made.app)
    assert sorted(receiver.counts().values()) == [1, 1, 1, 1]
    assert sorted(receiver.verified) == sorted(receiver.posts)
    by_id = {row.event_id: row.payload for row in rows(made.rt).values()}
    budget_alerts = [p["data"] for p in by_id.values() if p["data"]["budget"] is not None]
    plan_alerts = [p["data"] for p in by_id.values() if p["data"]["budget"] is None]
    assert sorted(a["threshold"] for a in budget_alerts) == [80, 100]
    assert {a["budget"]["id"] for a in budget_alerts} == {budget.id}
    assert sorted(a["threshold"] for a in plan_alerts) == [80, 100] and {a["plan"] for a in plan_alerts} == {"team"}
    assert all(row.delivered_at is not None for row in rows(made.rt).values())
