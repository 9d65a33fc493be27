"""PostgreSQL's one-statement hold commits without waiting for the WAL flush, unless configured durable.

The hold sets ``synchronous_commit`` for its own implicit transaction only (``set_config``
with ``is_local``); the commit of usage and money, and every other statement on the
pooled connection, stay synchronous.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from flask_ai_metering.quota import postgres

from .conftest import add_plan

TEAM = ("Team", "wal")


def _metered(meter) -> None:
    meter.call(lambda: None, billable=TEAM, provider="manual", max_tokens=10, usage={"output_tokens": 5})


@pytest.mark.parametrize("backend", ["postgresql"])
@pytest.mark.parametrize(("durable", "expected"), [(False, "off"), (True, "on")])
def test_the_hold_statement_sets_its_own_commit(make_app, backend, monkeypatch, durable, expected):
    app, db, meter = make_app(AI_METERING_DURABLE_HOLDS=durable)
    seen: list[str] = []
    original = postgres.reserve_pinned

    def spy(*args, **kwargs):
        row = original(*args, **kwargs)
        if row is not None:
            seen.append(row.sc)
        return row

    monkeypatch.setattr(postgres, "reserve_pinned", spy)
    with app.app_context():
        add_plan(db, slug="basic", token_limit=10_000)
        meter.subscribe(TEAM, "basic")
        for _ in range(3):  # the first creates the period's counter (portable); then one statement each
            _metered(meter)
        assert seen and set(seen) == {expected}
        assert meter.check(TEAM).remaining_tokens == 10_000 - 15
        # Local to the hold's transaction: the pooled connections are as synchronous as before.
        with db.engine.connect() as conn:
            assert conn.execute(sa.text("SHOW synchronous_commit")).scalar() == "on"
            conn.rollback()


@pytest.mark.parametrize("backend", ["postgresql"])
def test_a_hold_lost_in_a_crash_only_frees_its_quota_early(make_app, backend):
    """What a crash can undo of an asynchronous hold: its reservation row and the quota it held.

    The call's commit then finds no hold to settle and records the usage all the same, the
    idempotency key moved to the row's meta (a retry may hold it now), as for a commit the
    sweeper beat.
    """
    from flask_ai_metering.models import Counter
    from flask_ai_metering.models import Reservation
    from flask_ai_metering.models import Usage

    app, db, meter = make_app()
    with app.app_context():
        add_plan(db, slug="basic", token_limit=10_000)
        meter.subscribe(TEAM, "basic")
        _metered(meter)  # the period's counter exists: the next hold is the one-statement one

        def crashed_away() -> None:
            # Undo the hold's transaction, as a crash before its WAL reached the disk would.
            with db.engine.begin() as conn:
                held = conn.execute(
                    sa.select(Reservation.id, Reservation.counter_id).where(Reservation.status == "pending")
                ).one()
                conn.execute(sa.delete(Reservation).where(Reservation.id == held.id))
                conn.execute(
                    sa.update(Counter)
                    .where(Counter.id == held.counter_id)
                    .values(reserved_tokens=Counter.reserved_tokens - 100)
                )

        meter.call(
            crashed_away,
            billable=TEAM,
            provider="manual",
            max_tokens=100,
            usage={"output_tokens": 7},
            idempotency_key="k-1",
        )
        counter = db.session.scalars(sa.select(Counter)).one()
        assert (counter.used_tokens, counter.reserved_tokens) == (5 + 7, 0)
        row = db.session.scalars(sa.select(Usage).order_by(Usage.id.desc())).first()
        assert row.total_tokens == 7
        assert row.idempotency_key is None and row.meta["released_idempotency_key"] == "k-1"
