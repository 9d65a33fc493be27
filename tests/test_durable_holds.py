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
