"""Nothing spent goes unrecorded: real faults between the provider's answer and the commit.

Each test makes the provider answer, then breaks the database the way it breaks
in production (backends terminated on PostgreSQL, connections killed on MariaDB,
a full disk on SQLite), and checks that the caller still gets its response, that
the usage reaches the ledger (at once, or through ``expire-reservations``), and
that ``reconcile`` stays clean.
"""

from __future__ import annotations

import datetime as dt
import json
import typing as t
from decimal import Decimal

import pytest
import sqlalchemy as sa

from flask_ai_metering import InvalidUsage
from flask_ai_metering.models import Reservation
from flask_ai_metering.models import Usage
from flask_ai_metering.ops.reconcile import reconcile
from tests.conftest import add_plan

TEAM = ("Team", "7")
LATER = dt.timedelta(hours=1)


def ledger(meter: t.Any) -> list[t.Any]:
    with meter.runtime().store.engine.connect() as conn:
        return list(conn.execute(sa.select(Usage.__table__).order_by(Usage.__table__.c.id)))


def statuses(meter: t.Any) -> list[str]:
    with meter.runtime().store.engine.connect() as conn:
        return list(conn.execute(sa.select(Reservation.__table__.c.status)).scalars())


def kill_other_connections(url: str) -> int:
    """Kill every connection to the test database but this one, from outside the app's pool."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "postgresql":
                return len(
                    conn.execute(
                        sa.text(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                        )
                    ).all()
                )
            ids = conn.execute(
                sa.text("SELECT id FROM information_schema.processlist WHERE db = DATABASE() AND id <> CONNECTION_ID()")
            ).scalars()
            killed = 0
            for pid in list(ids):
                conn.execute(sa.text(f"KILL {int(pid)}"))
                killed += 1
            return killed
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", ["postgresql", "mysql"])
def test_connections_killed_during_the_call_still_record_the_usage(make_app, backend, db_url):
    app, db, meter = make_app()
    with app.app_context():
        add_plan(db, slug="p", token_limit=10_000)
        meter.subscribe(TEAM, "p")
        meter.check(TEAM)  # the pool holds idle connections, as a busy app's does

        def provider_call() -> str:
            assert kill_other_connections(db_url) >= 1
            return "the answer"

        result = meter.call(
            provider_call,
            billable=TEAM,
            provider="manual",
            model="m",
            usage={"input_tokens": 900, "output_tokens": 100},
        )
        assert result.response == "the answer"
        assert result.usage.total_tokens == 1000
        rows = ledger(meter)
        assert [(r.input_tokens, r.output_tokens) for r in rows] == [(900, 100)]
        assert result.usage_id == rows[0].id
        assert statuses(meter) == ["committed"]
        assert meter.check(TEAM).used_tokens == 1000
        assert reconcile(meter.runtime()) == []


def test_a_full_disk_keeps_the_usage_and_expire_reservations_commits_it(make_app, tmp_path):
    journal = tmp_path / "journal.jsonl"
    app, db, meter = make_app(AI_METERING_JOURNAL_PATH=str(journal))
    with app.app_context():
        add_plan(db, slug="p", token_limit=10_000)
        meter.subscribe(TEAM, "p")
        engine = meter.runtime().store.engine
        full = {"on": False}

        @sa.event.listens_for(engine, "checkout")
        def disk_limit(dbapi_conn: t.Any, record: t.Any, proxy: t.Any) -> None:
            cursor = dbapi_conn.cursor()
            if full["on"]:
                pages = cursor.execute("PRAGMA page_count").fetchone()[0]
                cursor.execute(f"PRAGMA max_page_count = {pages}")
            else:
                cursor.execute("PRAGMA max_page_count = 1073741823")
            cursor.close()

        def provider_call() -> str:
            full["on"] = True
            return "the answer"

        # The commit needs new pages (a ledger row with a large meta) that the full disk refuses.
        result = meter.call(
            provider_call,
            billable=TEAM,
            provider="manual",
            model="m",
            usage={"input_tokens": 400, "output_tokens": 100},
            meta={"note": "x" * 6000},
        )
        assert result.response == "the answer"  # the caller is served whatever the database did
        assert result.usage.total_tokens == 500
        assert result.usage_id is None
        assert ledger(meter) == []
        kept = journal.read_text() if journal.exists() else ""
        with engine.connect() as conn:
            payload = conn.execute(sa.select(Reservation.__table__.c.payload)).scalar()
        assert kept or payload, "the spent usage was kept neither in the reservation nor in the journal"
        full["on"] = False  # reconcile reads; it sees what is owed but not yet in the ledger
        assert any("spent usage" in problem for problem in reconcile(meter.runtime()))

        full["on"] = False  # the disk has room again
        assert meter.expire_reservations(now=dt.datetime.now(dt.timezone.utc) + LATER) <= 1
        rows = ledger(meter)
        assert [(r.input_tokens, r.output_tokens) for r in rows] == [(400, 100)]
        assert statuses(meter) == ["committed"]
        assert meter.check(TEAM).used_tokens == 500
        assert not journal.exists() or journal.read_text() == ""
        assert reconcile(meter.runtime()) == []
        # A second sweep finds nothing left to commit.
        assert meter.expire_reservations(now=dt.datetime.now(dt.timezone.utc) + LATER) == 0
        assert len(ledger(meter)) == 1


def test_a_journaled_row_is_committed_once_even_if_replayed_twice(make_app, tmp_path):
    journal = tmp_path / "journal.jsonl"
    app, db, meter = make_app(AI_METERING_JOURNAL_PATH=str(journal))
    with app.app_context():
        add_plan(db, slug="p", token_limit=10_000)
        meter.subscribe(TEAM, "p")
        engine = meter.runtime().store.engine
        broken = {"on": False}

        @sa.event.listens_for(engine, "before_cursor_execute")
        def refuse(conn: t.Any, cursor: t.Any, statement: str, *args: t.Any) -> None:
            if broken["on"]:
                raise sa.exc.OperationalError(statement, {}, Exception("database unreachable"))

        def provider_call() -> str:
            broken["on"] = True
            return "ok"

        result = meter.call(provider_call, billable=TEAM, provider="manual", model="m", usage={"input_tokens": 30})
        assert result.response == "ok" and result.usage_id is None
        line = journal.read_text()
        assert json.loads(line)["values"]["input_tokens"] == 30
        broken["on"] = False
        journal.write_text(line + line)  # the same row twice: a replay after a crash mid-rewrite
        meter.expire_reservations(now=dt.datetime.now(dt.timezone.utc) + LATER)
        assert [r.input_tokens for r in ledger(meter)] == [30]
        assert meter.check(TEAM).used_tokens == 30
        assert reconcile(meter.runtime()) == []


def test_provider_values_the_database_cannot_store_are_normalised_and_flagged(make_app, backend, fake_llm):
    openai = pytest.importorskip("openai")
    app, db, meter = make_app(AI_METERING_MAX_REPORTED_TOKENS=1_000_000)
    hostile = "gpt-4o-mini" + "\x00" + "x" * 300
    with app.app_context(), openai.OpenAI(base_url=f"{fake_llm.url}/v1", api_key="t", max_retries=0) as client:
        fake_llm.next_usage(prompt_tokens=10**15, completion_tokens=5)
        result = meter.call(
            lambda: client.chat.completions.create(model=hostile, messages=[{"role": "user", "content": "hi"}]),
            billable=TEAM,
            provider="openai",
        )
        assert result.response.choices[0].message.content
        (row,) = ledger(meter)
        assert "\x00" not in row.model and len(row.model) == 150
        assert row.input_tokens == 1_000_000 and row.estimated
        assert row.meta["ai_metering_clamped"] == {"input_tokens": 10**15}
        assert reconcile(meter.runtime()) == []


def test_an_abandoned_stream_is_charged_its_prompt_and_the_output_seen(make_app, fake_llm):
    openai = pytest.importorskip("openai")
    app, db, meter = make_app()
    with app.app_context(), openai.OpenAI(base_url=f"{fake_llm.url}/v1", api_key="t", max_retries=0) as client:
        result = meter.call(
            lambda: client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
                stream_options={"include_usage": True},
            ),
            billable=TEAM,
            provider="openai",
            model="gpt-4o-mini",
            max_tokens=3000,
            prompt_tokens_estimate=2500,
        )
        for chunk in result.response:
            if chunk.choices and chunk.choices[0].delta.content:
                break
        result.response.close()  # the end user went away before the usage chunk
        (row,) = ledger(meter)
        assert row.estimated
        assert row.input_tokens == 2500
        assert row.output_tokens >= 1
        assert reconcile(meter.runtime()) == []


def test_a_never_read_stream_without_an_estimate_is_charged_its_hold(make_app, fake_llm):
    openai = pytest.importorskip("openai")
    app, db, meter = make_app()
    with app.app_context(), openai.OpenAI(base_url=f"{fake_llm.url}/v1", api_key="t", max_retries=0) as client:
        result = meter.call(
            lambda: client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
            ),
            billable=TEAM,
            provider="openai",
            model="gpt-4o-mini",
            max_tokens=800,
        )
        result.response.close()
        (row,) = ledger(meter)
        assert row.estimated and row.input_tokens + row.output_tokens == 800
        assert row.total_cost > Decimal(0)


def test_a_response_without_usage_is_estimated_from_its_text_never_zero(make_app):
    class Answer:
        usage = None
        output_text = "forty characters of generated text here"

    app, db, meter = make_app()
    with app.app_context():
        result = meter.call(lambda: Answer(), billable=TEAM, provider="openai", model="gpt-4o-mini", max_tokens=100)
        (row,) = ledger(meter)
        assert row.estimated
        assert row.output_tokens == 10  # 40 characters at 4 a token
        assert row.input_tokens == 90  # the rest of the hold: the prompt was at most that
        assert result.usage.total_tokens == 100


def test_record_batch_is_all_or_nothing_and_names_the_row(make_app):
    app, db, meter = make_app()
    now = dt.datetime.now(dt.timezone.utc)
    rows = [{"billable": TEAM, "provider": "manual", "usage": {"input_tokens": 1}, "occurred_at": now}] * 150
    rows = [dict(r, idempotency_key=f"k{i}") for i, r in enumerate(rows)]
    rows[120] = dict(rows[120], occurred_at=dt.datetime(9999, 12, 31, 23, tzinfo=dt.timezone.utc))
    with app.app_context():
        with pytest.raises(InvalidUsage, match=r"rows\[120\]"):
            meter.record_batch(rows)
        assert ledger(meter) == []
        rows[120] = dict(rows[120], occurred_at=now)
        assert len(meter.record_batch(rows)) == 150
        assert len(ledger(meter)) == 150
        assert reconcile(meter.runtime()) == []
