"""Daily rollups: equal to the ledger, incremental, safe to re-run, and blind to no late commit."""

from __future__ import annotations

import datetime as dt
import typing as t

import pytest
import sqlalchemy as sa

from flask_ai_metering.models import Usage
from flask_ai_metering.models import UsageRollup
from flask_ai_metering.models import table
from flask_ai_metering.reporting.rollups import BILLABLES
from flask_ai_metering.reporting.rollups import DETAILED
from flask_ai_metering.reporting.rollups import TOTALS
from flask_ai_metering.reporting.rollups import RollupSpec
from flask_ai_metering.reporting.rollups import aggregate
from flask_ai_metering.reporting.rollups import as_date
from flask_ai_metering.reporting.rollups import last_run
from flask_ai_metering.reporting.rollups import ledger_key
from flask_ai_metering.reporting.rollups import measures
from flask_ai_metering.reporting.rollups import utc_date
from tests.conftest import AppFactory

UTC = dt.timezone.utc
NOW = dt.datetime.now(UTC).replace(microsecond=0)
usage = table(Usage)
rollup = table(UsageRollup)


def record(meter: t.Any, n: int, *, days_ago: int = 0, billable: str = "1", model: str = "gpt-4o-mini") -> None:
    meter.record_batch(
        [
            {
                "billable": ("Team", billable),
                "provider": "openai",
                "model": model,
                "feature": "chat" if i % 2 else None,
                "usage": {"input_tokens": 100 + i, "output_tokens": 7, "cached_input_tokens": 3},
                "occurred_at": NOW - dt.timedelta(days=days_ago, minutes=i),
            }
            for i in range(n)
        ]
    )


def ledger_totals(conn: sa.Connection) -> tuple[int, int, int]:
    cost = sa.func.sum(sa.type_coerce(usage.c.total_cost, sa.BigInteger))
    row = conn.execute(sa.select(sa.func.count(), sa.func.sum(usage.c.total_tokens), cost)).one()
    return int(row[0]), int(row[1] or 0), int(row[2] or 0)


def rollup_totals(conn: sa.Connection) -> tuple[int, int, int]:
    cost = sa.func.sum(sa.type_coerce(rollup.c.total_cost, sa.BigInteger))
    row = conn.execute(sa.select(sa.func.sum(rollup.c.calls), sa.func.sum(rollup.c.total_tokens), cost)).one()
    return int(row[0] or 0), int(row[1] or 0), int(row[2] or 0)


def grouped(conn: sa.Connection, spec: RollupSpec) -> tuple[dict[t.Any, t.Any], dict[t.Any, t.Any]]:
    """``spec``'s table and the ledger, each summed by day (UTC) and the table's key."""
    day = utc_date(usage.c.occurred_at, conn.dialect.name)
    out = []
    for source, keys in (
        (usage, [day, *(ledger_key(k) for k in spec.keys)]),
        (spec.table, [spec.table.c.day, *(spec.table.c[k] for k in spec.keys)]),
    ):
        rows = conn.execute(sa.select(*keys, *measures(source)).group_by(*keys))
        out.append({(as_date(r[0]), *r[1 : len(keys)]): tuple(int(v or 0) for v in r[len(keys) :]) for r in rows})
    return out[0], out[1]


def assert_rollups_match_ledger(engine: sa.Engine) -> None:
    """Every rollup table equals the ledger, key by key (for an app in UTC)."""
    with engine.connect() as conn:
        for spec in (DETAILED, TOTALS, BILLABLES):
            ledger, rolled = grouped(conn, spec)
            assert rolled == ledger, spec.table.name


def test_rollups_equal_the_ledger_and_rerun_is_safe(make_app: AppFactory, backend: str) -> None:
    app, db, meter = make_app()
    with app.app_context():
        record(meter, 10, days_ago=0)
        record(meter, 5, days_ago=3, billable="2")
        rt = meter.runtime()
        assert aggregate(rt) > 0
        with rt.store.engine.connect() as conn:
            first = rollup_totals(conn)
            assert first == ledger_totals(conn) and first[2] > 0
            rows = conn.execute(sa.select(sa.func.count()).select_from(rollup)).scalar_one()
            assert last_run(conn, rt.settings.timezone) is not None
        aggregate(rt, period="month")
        aggregate(rt)
        with rt.store.engine.connect() as conn:
            assert rollup_totals(conn) == first
            assert conn.execute(sa.select(sa.func.count()).select_from(rollup)).scalar() == rows
            # None keys are stored as '' so the unique key holds.
            assert conn.execute(sa.select(sa.func.count()).select_from(rollup).where(rollup.c.feature == "")).scalar()
            sizes = [
                conn.execute(sa.select(sa.func.count()).select_from(s.table)).scalar_one() for s in (TOTALS, BILLABLES)
            ]
            assert 0 < sizes[0] <= rows and 0 < sizes[1] < rows
        assert_rollups_match_ledger(rt.store.engine)


def test_incremental_runs_pick_up_new_and_backfilled_rows(make_app: AppFactory) -> None:
    app, _, meter = make_app()
    with app.app_context():
        rt = meter.runtime()
        record(meter, 4)
        aggregate(rt)
        record(meter, 3, days_ago=20, billable="9")  # backfilled: an old day gets new rows
        record(meter, 2)
        aggregate(rt)
        with rt.store.engine.connect() as conn:
            assert rollup_totals(conn) == ledger_totals(conn)
            assert rollup_totals(conn)[0] == 9
        assert_rollups_match_ledger(rt.store.engine)


def test_a_late_commit_with_a_lower_id_is_not_skipped(make_app: AppFactory, backend: str) -> None:
    app, _, meter = make_app()
    with app.app_context():
        rt = meter.runtime()
        record(meter, 3, days_ago=5)
        with rt.store.engine.begin() as conn:
            late = conn.execute(sa.select(usage).order_by(usage.c.id).limit(1)).one()._mapping
            conn.execute(sa.delete(usage).where(usage.c.id == late["id"]))
        record(meter, 2)
        aggregate(rt)
        # The row "commits" now, with an id below the watermark and an old day.
        with rt.store.engine.begin() as conn:
            conn.execute(sa.insert(usage).values(**late))
        aggregate(rt)
        with rt.store.engine.connect() as conn:
            assert rollup_totals(conn) == ledger_totals(conn)
            assert rollup_totals(conn)[0] == 5
        assert_rollups_match_ledger(rt.store.engine)


def test_days_are_local_to_the_configured_timezone(make_app: AppFactory) -> None:
    app, _, meter = make_app(AI_METERING_TIMEZONE="Asia/Tokyo")
    with app.app_context():
        rt = meter.runtime()
        at = dt.datetime(2026, 1, 10, 20, 0, tzinfo=UTC)  # 05:00 on the 11th in Tokyo
        meter.record(
            billable=("Team", "1"), provider="openai", model="gpt-4o-mini", usage={"input_tokens": 1}, occurred_at=at
        )
        aggregate(rt)
        with rt.store.engine.connect() as conn:
            for spec in (DETAILED, TOTALS, BILLABLES):
                assert as_date(conn.execute(sa.select(spec.table.c.day)).scalar_one()) == dt.date(2026, 1, 11)


def test_aggregate_command(make_app: AppFactory) -> None:
    app, _, meter = make_app()
    with app.app_context():
        record(meter, 3)
    for period in ("day", "week", "month"):
        result = app.test_cli_runner().invoke(args=["ai-metering", "aggregate", "--period", period])
        assert result.exit_code == 0, result.output
        assert "Aggregated" in result.output
    result = app.test_cli_runner().invoke(args=["ai-metering", "aggregate", "--period", "year"])
    assert result.exit_code == 2
    with app.app_context(), pytest.raises(ValueError):
        aggregate(meter.runtime(), period="year")


def test_the_latency_rollup_counts_the_ledger(make_app: AppFactory, backend: str) -> None:
    """Ledger rows per UTC day, provider, model, feature and latency bucket, incremental runs included."""
    from flask_ai_metering.reporting.rollups import LATENCY
    from flask_ai_metering.reporting.rollups import LATENCY_KEYS
    from flask_ai_metering.reporting.rollups import latency_bucket

    app, _, meter = make_app()
    with app.app_context():
        rt = meter.runtime()
        record(meter, 12)
        record(meter, 5, days_ago=3, billable="2", model="gpt-4o")
        with rt.store.engine.begin() as conn:
            for n, usage_id in enumerate(conn.execute(sa.select(usage.c.id)).scalars().all()):
                if n % 4:  # every fourth row keeps no duration
                    conn.execute(sa.update(usage).where(usage.c.id == usage_id).values(duration_ms=37 * n * n))
        aggregate(rt)
        record(meter, 3, days_ago=20, billable="9")  # backfilled
        aggregate(rt)
        day = utc_date(usage.c.occurred_at, rt.store.dialect)
        keys = [day, *(ledger_key(k) for k in LATENCY_KEYS), latency_bucket(usage.c.duration_ms)]
        with rt.store.engine.connect() as conn:
            ledger = {
                (as_date(r[0]), *r[1:-1]): int(r[-1])
                for r in conn.execute(sa.select(*keys, sa.func.count()).group_by(*keys))
            }
            rolled_keys = [LATENCY.c.day, *(LATENCY.c[k] for k in LATENCY_KEYS), LATENCY.c.bucket]
            rolled = {
                (as_date(r[0]), *r[1:-1]): int(r[-1])
                for r in conn.execute(sa.select(*rolled_keys, sa.func.sum(LATENCY.c.entries)).group_by(*rolled_keys))
            }
        assert rolled == ledger
        assert len({key[-1] for key in ledger}) > 3 and sum(ledger.values()) == 20
