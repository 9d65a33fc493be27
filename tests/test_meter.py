"""meter.call / acall / record against the real OpenAI and Anthropic SDKs and a real database."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import typing as t
from decimal import Decimal

import pytest
import sqlalchemy as sa

from flask_ai_metering import IdempotencyConflict
from flask_ai_metering import InvalidUsage
from flask_ai_metering import signals
from flask_ai_metering.models import Counter
from flask_ai_metering.models import Reservation
from flask_ai_metering.models import Usage
from flask_ai_metering.ops.reconcile import reconcile

TEAM = ("Team", "42")
CHAT = [{"role": "user", "content": "hi"}]


def rows(db: t.Any, model: t.Any) -> list[t.Any]:
    with db.engine.connect() as conn:
        return list(conn.execute(sa.select(model.__table__).order_by(model.__table__.c.id)))


def chat(client: t.Any, **kw: t.Any) -> t.Callable[[], t.Any]:
    return lambda: client.chat.completions.create(model="gpt-4o-mini", messages=CHAT, **kw)


def test_openai_chat_is_recorded_with_exact_cost(meter, db, fake_llm, openai_client):
    fake_llm.model_map["gpt-4o-mini"] = "gpt-4o-mini-2024-07-18"
    fake_llm.next_usage(prompt_tokens=10_000, cached_tokens=4_000, completion_tokens=500)
    result = meter.call(chat(openai_client), billable=TEAM, user=("User", 7), feature="chat", meta={"ticket": 7})

    assert type(result.response).__name__ == "ChatCompletion"
    assert result.response.usage.prompt_tokens == 10_000
    assert result.usage.input_tokens == 10_000
    assert result.usage.cached_input_tokens == 4_000
    assert result.usage.output_tokens == 500
    assert result.usage.total_cost == Decimal("0.0015")
    assert result.usage.model == "gpt-4o-mini-2024-07-18"
    [row] = rows(db, Usage)
    assert (row.billable_type, row.billable_id, row.user_id) == ("Team", "42", "7")
    assert row.total_cost == Decimal("0.0015") and isinstance(row.total_cost, Decimal)
    assert row.meta == {"ticket": 7}
    assert row.occurred_at.tzinfo is dt.timezone.utc
    assert result.limit.remaining_tokens is None  # no subscription: unlimited
    assert reconcile(meter.runtime()) == []


def test_anthropic_message_counts_cache_tokens_into_input(meter, fake_llm, anthropic_client):
    fake_llm.next_anthropic_usage(
        input_tokens=50, cache_creation_input_tokens=2_000, cache_read_input_tokens=30_000, output_tokens=120
    )
    result = meter.call(
        lambda: anthropic_client.messages.create(model="claude-sonnet-4-6", max_tokens=200, messages=CHAT),
        billable=TEAM,
        provider="anthropic",
        max_tokens=200,
    )
    usage = result.usage
    assert (usage.input_tokens, usage.cached_input_tokens, usage.cache_write_tokens) == (32_050, 30_000, 2_000)
    # $3/M input, $3.75/M cache write, $0.30/M cache read, $15/M output
    assert usage.total_cost == Decimal("0.00015") + Decimal("0.0075") + Decimal("0.009") + Decimal("0.0018")


def test_responses_and_embeddings(meter, fake_llm, openai_client):
    fake_llm.next_usage(prompt_tokens=100, completion_tokens=40, reasoning_tokens=10)
    result = meter.call(lambda: openai_client.responses.create(model="gpt-4o-mini", input="hi"), billable=TEAM)
    assert (result.usage.input_tokens, result.usage.output_tokens, result.usage.reasoning_tokens) == (100, 40, 10)
    fake_llm.next_usage(prompt_tokens=8)
    emb = meter.call(lambda: openai_client.embeddings.create(model="text-embedding-3-small", input="hi"), billable=TEAM)
    assert (emb.usage.input_tokens, emb.usage.output_tokens) == (8, 0)
    assert emb.usage.unpriced is False


def test_stream_commits_when_it_ends_and_not_before(meter, db, fake_llm, openai_client):
    fake_llm.next_usage(prompt_tokens=30, completion_tokens=12)
    result = meter.call(chat(openai_client, stream=True, stream_options={"include_usage": True}), billable=TEAM)
    assert result.usage is None
    assert rows(db, Usage) == []
    [pending] = rows(db, Reservation)
    assert pending.status == "pending"
    chunks = list(result.response)
    assert len(chunks) == fake_llm.stream_chunks + 3  # role, deltas, finish, usage
    assert result.usage.total_tokens == 42
    assert [r.status for r in rows(db, Reservation)] == ["committed"]
    assert reconcile(meter.runtime()) == []


def test_stream_abandoned_early_commits_what_it_saw_and_releases_the_rest(meter, db, fake_llm, anthropic_client):
    fake_llm.next_anthropic_usage(input_tokens=500, output_tokens=80)
    result = meter.call(
        lambda: anthropic_client.messages.create(model="claude-sonnet-4-6", max_tokens=300, messages=CHAT, stream=True),
        billable=TEAM,
        provider="anthropic",
        max_tokens=300,
    )
    stream = iter(result.response)
    for _ in range(3):
        next(stream)
    result.response.close()
    assert result.usage.input_tokens == 500  # message_start reported the prompt
    assert result.usage.output_tokens >= 1
    [counter] = rows(db, Counter)
    assert counter.reserved_tokens == 0
    assert counter.used_tokens == result.usage.total_tokens
    assert reconcile(meter.runtime()) == []


def test_stream_without_usage_records_an_estimate_never_a_silent_zero(meter, db, fake_llm, openai_client):
    result = meter.call(chat(openai_client, stream=True), billable=TEAM)
    text = "".join(c.choices[0].delta.content or "" for c in result.response if c.choices)
    [row] = rows(db, Usage)
    assert row.estimated is True
    assert row.output_tokens == -(-len(text) // 4) > 0


def test_provider_error_propagates_unchanged_records_nothing_and_frees_the_key(meter, db, fake_llm, openai_client):
    import openai

    failures: list[dict[str, t.Any]] = []
    signals.provider_call_failed.connect(lambda sender, **kw: failures.append(kw), weak=False)
    fake_llm.fail_next(429)
    with pytest.raises(openai.RateLimitError):
        meter.call(chat(openai_client), billable=TEAM, idempotency_key="req-1", max_tokens=100)
    assert rows(db, Usage) == []
    [reservation] = rows(db, Reservation)
    assert (reservation.status, reservation.idempotency_key) == ("released", None)
    assert rows(db, Counter)[0].reserved_tokens == 0
    assert failures and failures[-1]["billable"] == TEAM
    retry = meter.call(chat(openai_client), billable=TEAM, idempotency_key="req-1", max_tokens=100)
    assert retry.replayed is False and len(rows(db, Usage)) == 1


def test_replay_returns_first_usage_without_calling_the_provider(meter, db, fake_llm, openai_client):
    fake_llm.next_usage(prompt_tokens=11, completion_tokens=3)
    first = meter.call(chat(openai_client), billable=TEAM, idempotency_key="req-123")
    calls = len(fake_llm.requests_to("/v1/chat/completions"))
    again = meter.call(chat(openai_client), billable=TEAM, idempotency_key="req-123")
    assert again.replayed is True and again.response is None
    assert again.usage == first.usage
    assert len(fake_llm.requests_to("/v1/chat/completions")) == calls
    assert len(rows(db, Usage)) == 1
    other = meter.call(chat(openai_client), billable=("Team", "43"), idempotency_key="req-123")
    assert other.replayed is False  # keys are scoped per billable


def test_replay_while_first_is_in_flight_raises_conflict(meter, app, db):
    started, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def slow() -> None:
        with app.app_context():
            try:
                meter.call(
                    lambda: (started.set(), release.wait(10)),
                    billable=TEAM,
                    provider="manual",
                    usage={"input_tokens": 1, "output_tokens": 1},
                    idempotency_key="k",
                )
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

    worker = threading.Thread(target=slow)
    worker.start()
    assert started.wait(10)
    with pytest.raises(IdempotencyConflict):
        meter.call(lambda: None, billable=TEAM, provider="manual", usage={"input_tokens": 1}, idempotency_key="k")
    release.set()
    worker.join(10)
    assert errors == [] and len(rows(db, Usage)) == 1


def test_acall_with_async_client(meter, db, fake_llm):
    openai = pytest.importorskip("openai")

    async def main() -> t.Any:
        client = openai.AsyncOpenAI(base_url=f"{fake_llm.url}/v1", api_key="test", max_retries=0)
        fake_llm.next_usage(prompt_tokens=5, completion_tokens=6)
        result = await meter.acall(
            lambda: client.chat.completions.create(model="gpt-4o-mini", messages=CHAT), billable=TEAM
        )
        fake_llm.next_usage(prompt_tokens=7, completion_tokens=8)
        streamed = await meter.acall(
            lambda: client.chat.completions.create(
                model="gpt-4o-mini", messages=CHAT, stream=True, stream_options={"include_usage": True}
            ),
            billable=TEAM,
        )
        async for _ in streamed.response:
            pass
        await client.close()
        return result, streamed

    result, streamed = asyncio.run(main())
    assert result.usage.total_tokens == 11
    assert streamed.usage.total_tokens == 15
    assert len(rows(db, Usage)) == 2


def test_cancelled_acall_releases_its_hold(meter, db):
    async def main() -> None:
        task = asyncio.ensure_future(
            meter.acall(lambda: asyncio.sleep(30), billable=TEAM, provider="manual", max_tokens=50)
        )
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert [r.status for r in rows(db, Reservation)] == ["released"]
    assert rows(db, Counter)[0].reserved_tokens == 0


def test_manual_and_fluent_forms(meter, db):
    result = (
        meter.for_user(("User", 1))
        .billable(TEAM)
        .for_tenant(("Tenant", "acme"))
        .using_provider("manual", "custom-model")
        .feature("summary")
        .with_meta({"a": 1})
        .with_manual_usage(input_tokens=450, output_tokens=900)
        .call(lambda: "done")
    )
    assert result.response == "done"
    assert result.usage.total_tokens == 1350 and result.usage.unpriced is True
    [row] = rows(db, Usage)
    assert (row.user_id, row.tenant_id, row.feature, row.model) == ("1", "acme", "summary", "custom-model")
    # a fresh builder carries nothing over from the last one
    second = meter.billable(TEAM).using_provider("manual").call(lambda: None)
    assert second.usage.estimated is True and rows(db, Usage)[1].meta is None


def test_record_and_record_batch(meter, db):
    when = dt.datetime(2026, 10, 15, 12, tzinfo=dt.timezone.utc)
    first = meter.record(
        billable=TEAM,
        provider="openai",
        model="gpt-4o-mini",
        feature="import",
        usage={"input_tokens": 10, "output_tokens": 5},
        occurred_at=when,
        idempotency_key="evt-1",
    )
    again = meter.record(
        billable=TEAM,
        provider="openai",
        model="gpt-4o-mini",
        usage={"input_tokens": 10, "output_tokens": 5},
        occurred_at=when,
        idempotency_key="evt-1",
    )
    assert not first.replayed and again.replayed and again.usage == first.usage
    results = meter.record_batch(
        [
            {
                "billable": TEAM,
                "provider": "openai",
                "model": "gpt-4o-mini",
                "usage": {"input_tokens": 1},
                "occurred_at": when,
                "idempotency_key": "evt-1",
            },
            {
                "billable": TEAM,
                "provider": "openai",
                "model": "gpt-4o-mini",
                "input_tokens": 2,
                "output_tokens": 2,
                "occurred_at": when,
            },
        ]
    )
    assert [r.replayed for r in results] == [True, False]
    assert len(rows(db, Usage)) == 2
    with pytest.raises(InvalidUsage, match=r"rows\[1\]"):
        meter.record_batch(
            [{"billable": TEAM, "usage": {"input_tokens": 1}}, {"billable": TEAM, "usage": {"input_tokens": -1}}]
        )
    assert len(rows(db, Usage)) == 2
    counter = next(c for c in rows(db, Counter) if c.period_start.month == 10)
    assert counter.used_tokens == 15 + 4
    assert reconcile(meter.runtime()) == []


def test_metering_never_touches_the_apps_session(meter, db, fake_llm, openai_client):
    from flask_ai_metering.models import Plan

    pending = Plan(name="Draft", slug="draft")
    db.session.add(pending)
    meter.call(chat(openai_client), billable=TEAM)
    meter.record(billable=TEAM, usage={"input_tokens": 1})
    assert pending in db.session.new  # not flushed by us
    db.session.rollback()
    with db.engine.connect() as conn:
        assert conn.execute(sa.text("select count(*) from ai_metering_plans")).scalar() == 0
    assert len(rows(db, Usage)) == 2


def test_usage_recorded_signal_and_disabled_switch(make_app, fake_llm):
    app, db, meter = make_app(AI_METERING_ENABLED=False)
    with app.app_context():
        assert meter.call(lambda: 1, billable=TEAM).usage is None
        assert rows(db, Usage) == []
    app2, db2, meter2 = make_app()
    seen: list[dict[str, t.Any]] = []
    signals.usage_recorded.connect(lambda sender, **kw: seen.append({"sender": sender, **kw}), weak=False)
    with app2.app_context():
        meter2.call(lambda: None, billable=TEAM, provider="manual", usage={"input_tokens": 3})
    assert seen[-1]["sender"] is app2 and seen[-1]["billable"] == TEAM and seen[-1]["usage"].input_tokens == 3


def test_streams_commit_outside_the_app_context(meter, db, fake_llm, openai_client, app):
    fake_llm.next_usage(prompt_tokens=3, completion_tokens=4)
    result = meter.call(chat(openai_client, stream=True, stream_options={"include_usage": True}), billable=TEAM)
    done = threading.Event()
    threading.Thread(target=lambda: (list(result.response), done.set())).start()
    assert done.wait(10)
    assert result.usage.total_tokens == 7


class EchoProvider:
    """A custom provider: its responses are dicts with a ``tokens`` field."""

    name = "echo"

    def extract(self, response):
        from flask_ai_metering.metering.usage import Extracted
        from flask_ai_metering.metering.usage import TokenCounts

        return Extracted(TokenCounts(input_tokens=response["tokens"], output_tokens=1), model="echo-1")

    def is_stream(self, response):
        return False

    def accumulator(self):
        raise NotImplementedError


def test_custom_provider_registered_from_config(make_app):
    app, db, meter = make_app(
        AI_METERING_PROVIDERS={
            "echo": {
                "class": "tests.test_meter:EchoProvider",
                "models": {"echo-1": {"input_price_per_1k": "0.002", "output_price_per_1k": "0.004"}},
            }
        }
    )
    with app.app_context():
        result = meter.call(lambda: {"tokens": 1000}, billable=TEAM, provider="echo")
    assert result.usage.model == "echo-1"
    assert result.usage.total_cost == Decimal("0.002004")


@pytest.mark.parametrize("backend", ["postgresql"])
def test_connections_return_to_the_pool_transactional(make_app, backend):
    """PostgreSQL's phases autocommit on the driver; every pooled connection must come back without it,
    after a call and after a statement that failed in autocommit."""
    app, db, meter = make_app()
    with app.app_context():
        meter.call(lambda: None, billable=TEAM, provider="manual", usage={"output_tokens": 1}, idempotency_key="k")
        store = meter.runtime().store
        with pytest.raises(sa.exc.DBAPIError):
            store.run(lambda conn: conn.execute(sa.text("select 1/0")), autocommit=True)
        held = [db.engine.connect() for _ in range(db.engine.pool.size())]  # every pooled connection
        try:
            assert [c.connection.driver_connection.autocommit for c in held] == [False] * len(held)
        finally:
            for conn in held:
                conn.close()
