"""The hot path's statements sent straight to the driver (``flask_ai_metering.prepared``).

Each must give what ``conn.execute`` gives for the same statement (SQLAlchemy's bind
and result conversions), raise SQLAlchemy's exceptions, and stay visible to anyone
listening to SQLAlchemy's cursor events.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from flask_ai_metering.models import UTCDateTime
from flask_ai_metering.money import MoneyType
from flask_ai_metering.prepared import Prepared
from flask_ai_metering.quota import engine as quota

WHEN = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.timezone(dt.timedelta(hours=2)))


def test_rows_convert_like_sqlalchemy(db, backend):
    statement = sa.select(
        sa.literal_column("1500000000000", MoneyType()).label("amount"),
        sa.bindparam("when", type_=UTCDateTime()).label("at"),
        sa.bindparam("name", type_=sa.String).label("name"),
        sa.bindparam("n", type_=sa.BigInteger).label("n"),
    )
    params = {"when": WHEN, "name": "x", "n": 10**15}
    with db.engine.connect() as conn:
        [row] = Prepared(statement).execute(conn, params)
        [expected] = conn.execute(statement, params).all()
        conn.rollback()
    assert tuple(row) == tuple(expected)
    assert (row.amount, row.name, row.n) == (Decimal("1.5"), "x", 10**15)
    # Bound as naive UTC (as UTCDateTime stores it) and read back as an aware UTC time.
    assert row.at == dt.datetime(2026, 11, 30, 10, 0, tzinfo=dt.timezone.utc) == WHEN
    assert row[0] == row.amount  # by position too, as SQLAlchemy's rows


def test_dml_counts_rows_and_returns_what_it_wrote(db, meter, backend):
    from flask_ai_metering.models import Counter

    at = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)
    db.session.add(Counter(billable_type="Team", billable_id="p", period_start=at, period_end=at, plan_version=0))
    db.session.commit()
    counter_id = db.session.scalar(sa.select(Counter.id))
    db.session.rollback()  # no snapshot of the test's own (MariaDB: REPEATABLE READ)
    bump = sa.update(quota.counters).where(quota.counters.c.id == sa.bindparam("cid"))
    with meter.runtime().store.begin() as conn:
        assert Prepared(bump.values(calls=quota.counters.c.calls + 1)).rowcount(conn, {"cid": counter_id}) == 1
        assert Prepared(bump.values(calls=0)).rowcount(conn, {"cid": counter_id + 1}) == 0
        if conn.dialect.update_returning:  # not MariaDB
            returning = bump.values(used_tokens=quota.counters.c.used_tokens + 7).returning(*quota.USED_COLUMNS)
            [row] = Prepared(returning).execute(conn, {"cid": counter_id})
            assert quota.CounterState.of(row) == quota.CounterState(used_tokens=7)
    # Committed: the transaction was begun as ``conn.execute`` would have begun it.
    assert db.session.scalar(sa.select(Counter.calls)) == 1


def test_driver_errors_are_sqlalchemys(db, backend):
    from flask_ai_metering.models import Plan

    now = dt.datetime.now(dt.timezone.utc)
    insert = sa.insert(Plan.__table__).values(
        name=sa.bindparam("slug"), slug=sa.bindparam("slug"), is_active=True, created_at=now, updated_at=now
    )
    with db.engine.connect() as conn:
        Prepared(insert).execute(conn, {"slug": "dup"})
        with pytest.raises(sa_exc.IntegrityError):
            Prepared(insert).execute(conn, {"slug": "dup"})
        conn.rollback()


def test_python_side_defaults_are_filled_in(db, backend):
    """An INSERT that leaves columns to their Python defaults (``created_at``…) gets them, as with SQLAlchemy."""
    from flask_ai_metering.models import Plan

    insert = sa.insert(Plan.__table__).values(name=sa.bindparam("slug"), slug=sa.bindparam("slug"))
    with db.engine.connect() as conn:
        Prepared(insert).execute(conn, {"slug": "defaults"})
        conn.commit()
    plan = db.session.scalars(sa.select(Plan)).one()
    assert plan.is_active is True and plan.created_at is not None


def test_cursor_event_listeners_see_the_statement(db, backend):
    seen: list[str] = []
    sa.event.listen(db.engine, "before_cursor_execute", lambda *args: seen.append(args[2]))
    with db.engine.connect() as conn:
        [row] = Prepared(sa.select(sa.literal(41, sa.Integer) + 1)).execute(conn, {})
        conn.rollback()
    assert row[0] == 42
    assert len(seen) == 1 and seen[0].startswith("SELECT")
