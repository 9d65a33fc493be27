"""``cleanup``: prunes old usage and finished reservations in batches, never rollups, never a checked period."""

from __future__ import annotations

import datetime as dt
import typing as t

import sqlalchemy as sa

from flask_ai_metering.models import Reservation
from flask_ai_metering.models import Usage
from flask_ai_metering.models import UsageRollup
from flask_ai_metering.ops.maintenance import cleanup
from flask_ai_metering.ops.reconcile import reconcile
from flask_ai_metering.reporting.rollups import aggregate
from tests.conftest import AppFactory
from tests.conftest import add_plan

UTC = dt.timezone.utc
NOW = dt.datetime.now(UTC)
usage = Usage.__table__
reservations = Reservation.__table__
rollup = UsageRollup.__table__


def record(meter: t.Any, n: int, days_ago: int, billable: str = "1") -> None:
    meter.record_batch(
        [
            {
                "billable": ("Team", billable),
                "provider": "openai",
                "model": "gpt-4o-mini",
                "usage": {"input_tokens": 10 + i},
                "occurred_at": NOW - dt.timedelta(days=days_ago, minutes=i),
            }
            for i in range(n)
        ]
    )


def count(conn: sa.Connection, table: sa.Table, *where: t.Any) -> int:
    return int(conn.execute(sa.select(sa.func.count()).select_from(table).where(*where)).scalar_one())


def add_reservation(conn: sa.Connection, status: str, days_ago: int) -> None:
    counter_id = conn.execute(sa.text("SELECT min(id) FROM ai_metering_counters")).scalar_one()
    at = NOW - dt.timedelta(days=days_ago)
    conn.execute(
        sa.insert(reservations).values(
            counter_id=counter_id,
            billable_type="Team",
            billable_id="1",
            status=status,
            tokens=5,
            cost_units=0,
            expires_at=at + dt.timedelta(minutes=1),
            created_at=at,
        )
    )


def test_cleanup_prunes_old_rows_in_batches_and_keeps_rollups(make_app: AppFactory, backend: str) -> None:
    app, _, meter = make_app(AI_METERING_PRUNE_AFTER_DAYS=30, AI_METERING_BATCH_SIZE=3)
    with app.app_context():
        rt = meter.runtime()
        record(meter, 7, days_ago=70)
        record(meter, 4, days_ago=1)
        aggregate(rt, period="month")
        with rt.store.engine.begin() as conn:
            for status in ("committed", "released", "expired", "pending"):
                add_reservation(conn, status, days_ago=70)
            add_reservation(conn, "committed", days_ago=1)
            rollups_before = count(conn, rollup)

        planned = cleanup(rt, dry_run=True)
        assert planned == {"usage rows": 7, "finished reservations": 3, "failure rows": 0, "delivered alerts": 0}
        with rt.store.engine.connect() as conn:
            assert count(conn, usage) == 11

        assert cleanup(rt) == planned
        with rt.store.engine.connect() as conn:
            assert count(conn, usage) == 4
            assert count(conn, rollup) == rollups_before
            assert count(conn, reservations) == 2
            assert count(conn, reservations, reservations.c.status == "pending") == 1
        assert cleanup(rt) == {"usage rows": 0, "finished reservations": 0, "failure rows": 0, "delivered alerts": 0}
        assert reconcile(rt) == []


def test_cleanup_never_reaches_into_a_checked_or_running_period(make_app: AppFactory) -> None:
    app, db, meter = make_app(AI_METERING_PRUNE_AFTER_DAYS=30)
    with app.app_context():
        rt = meter.runtime()
        record(meter, 3, days_ago=20)
        # --days reaching into the running period stops at its start: those rows stay.
        assert cleanup(rt, days=1) == {
            "usage rows": 0,
            "finished reservations": 0,
            "failure rows": 0,
            "delivered alerts": 0,
        }
        # A yearly plan's running period started long ago: its rows stay.
        plan = add_plan(db, slug="yearly", period="yearly", token_limit=10**9)
        meter.subscribe(("Team", "y"), plan)
        start_of_year = NOW.replace(month=1, day=1, hour=0, minute=30, second=0, microsecond=0)
        meter.record(
            billable=("Team", "y"),
            provider="openai",
            model="gpt-4o-mini",
            usage={"input_tokens": 5},
            occurred_at=start_of_year,
        )
        cleanup(rt)
        with rt.store.engine.connect() as conn:
            assert count(conn, usage, usage.c.billable_id == "y") == 1
        assert reconcile(rt) == []


def test_cleanup_command(make_app: AppFactory) -> None:
    app, _, meter = make_app()
    with app.app_context():
        record(meter, 2, days_ago=400)
    runner = app.test_cli_runner()
    dry = runner.invoke(args=["ai-metering", "cleanup", "--dry-run"])
    assert dry.exit_code == 0 and "Would delete 2 usage rows" in dry.output
    done = runner.invoke(args=["ai-metering", "cleanup", "--days", "365", "--yes"])
    assert done.exit_code == 0 and "Deleted 2 usage rows" in done.output


def test_days_shorter_than_the_setting_prunes_ended_periods(make_app: AppFactory) -> None:
    app, _, meter = make_app(AI_METERING_PRUNE_AFTER_DAYS=365)
    with app.app_context():
        rt = meter.runtime()
        record(meter, 4, days_ago=70)
        record(meter, 2, days_ago=1)
        assert cleanup(rt, days=40)["usage rows"] == 4
        # the pruned periods are no longer whole: reconcile skips them, and checks the rest
        assert reconcile(rt) == []
        with rt.store.engine.connect() as conn:
            assert count(conn, usage, sa.true()) == 2
