"""Provider calls that raised land in the failures table: never in the ledger, never with a message."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import typing as t

import pytest
import sqlalchemy as sa

from flask_ai_metering.metering import failures as failures_module
from flask_ai_metering.models import Failure
from flask_ai_metering.models import Usage
from flask_ai_metering.ops import privacy
from flask_ai_metering.ops.maintenance import cleanup
from tests.conftest import AppFactory

TEAM = ("Team", "42")
CHAT = [{"role": "user", "content": "a secret prompt"}]
SECRET = "sk-leaked-in-the-error-message"


def rows(db: t.Any, model: t.Any) -> list[t.Any]:
    with db.engine.connect() as conn:
        return list(conn.execute(sa.select(model.__table__).order_by(model.__table__.c.id)))


def chat(client: t.Any) -> t.Callable[[], t.Any]:
    return lambda: client.chat.completions.create(model="gpt-4o-mini", messages=CHAT)


def test_failed_openai_call_is_a_failure_row_not_a_usage_row(backend, make_app: AppFactory, fake_llm, openai_client):
    openai = pytest.importorskip("openai")
    app, db, meter = make_app()
    with app.app_context():
        fake_llm.fail_next(429, message=SECRET)
        with pytest.raises(openai.RateLimitError):
            meter.call(
                chat(openai_client), billable=TEAM, user=("User", 7), tenant=("Org", 3), feature="chat", max_tokens=50
            )
        assert rows(db, Usage) == []
        [row] = rows(db, Failure)
        assert (row.billable_type, row.billable_id, row.user_id, row.tenant_id) == ("Team", "42", "7", "3")
        assert (row.provider, row.model, row.feature) == ("openai", None, "chat")
        assert (row.error_type, row.http_status) == ("RateLimitError", 429)
        assert row.duration_ms is not None and row.duration_ms >= 0
        assert row.occurred_at.tzinfo is not None
        # Neither the error's message nor the prompt is kept anywhere in the row.
        assert not any(SECRET in str(v) or "secret prompt" in str(v) for v in row)


def test_failed_anthropic_call_records_its_status(meter, db, fake_llm, anthropic_client):
    anthropic = pytest.importorskip("anthropic")
    fake_llm.fail_next(500)
    with pytest.raises(anthropic.InternalServerError):
        meter.call(
            lambda: anthropic_client.messages.create(model="claude-sonnet-4-6", max_tokens=10, messages=CHAT),
            billable=TEAM,
            provider="anthropic",
            model="claude-sonnet-4-6",
            max_tokens=50,
        )
    [row] = rows(db, Failure)
    assert (row.provider, row.model, row.error_type, row.http_status) == (
        "anthropic",
        "claude-sonnet-4-6",
        "InternalServerError",
        500,
    )
    assert rows(db, Usage) == []


def test_async_failure_and_an_error_without_status(meter, db):
    async def broken() -> t.Any:
        raise ConnectionResetError("peer went away")

    with pytest.raises(ConnectionResetError):
        asyncio.run(meter.acall(broken, billable=TEAM, provider="manual", max_tokens=5))
    [row] = rows(db, Failure)
    assert (row.provider, row.error_type, row.http_status) == ("manual", "ConnectionResetError", None)


def test_a_failure_row_that_cannot_be_written_never_fails_the_caller(meter, db, monkeypatch, caplog):
    def broken_insert(values: t.Any, conn: sa.Connection) -> None:
        raise sa.exc.OperationalError("INSERT", {}, Exception("disk full"))

    monkeypatch.setattr(failures_module, "_insert", broken_insert)

    def provider() -> t.Any:
        raise TimeoutError

    with caplog.at_level(logging.ERROR, logger="flask_ai_metering"), pytest.raises(TimeoutError):
        meter.call(provider, billable=TEAM, provider="manual", max_tokens=5)
    assert "could not record the failed manual call" in caplog.text
    assert rows(db, Failure) == []


def test_cleanup_prunes_old_failures_and_forget_erases_them(meter, db):
    now = dt.datetime.now(dt.timezone.utc)
    table = Failure.__table__
    with db.engine.begin() as conn:
        for days, billable in ((400, "42"), (1, "42"), (1, "43")):
            conn.execute(
                sa.insert(table).values(
                    billable_type="Team",
                    billable_id=billable,
                    provider="openai",
                    error_type="APIError",
                    occurred_at=now - dt.timedelta(days=days),
                )
            )
    rt = meter.runtime()
    assert cleanup(rt, dry_run=True)["failure rows"] == 1
    assert cleanup(rt)["failure rows"] == 1
    assert [r.billable_id for r in rows(db, Failure)] == ["42", "43"]
    assert privacy.forget(rt, TEAM)["failure rows"] == 1
    assert [r.billable_id for r in rows(db, Failure)] == ["43"]


def test_http_status_is_read_defensively():
    class Exploding(Exception):
        @property
        def status_code(self) -> int:
            raise RuntimeError("not set")

        status = 503

    assert failures_module.http_status(Exploding()) == 503
    assert failures_module.http_status(ValueError()) is None
