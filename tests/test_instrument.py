"""meter.instrument: the real OpenAI and Anthropic SDKs, unchanged call sites, against the fake server."""

from __future__ import annotations

import asyncio
import typing as t
from decimal import Decimal

import pytest
import sqlalchemy as sa

from flask_ai_metering import AiLimitExceeded
from flask_ai_metering import IdempotencyConflict
from flask_ai_metering.metering.instrument import IdempotentReplay
from flask_ai_metering.metering.instrument import estimate_prompt_tokens
from flask_ai_metering.models import Counter
from flask_ai_metering.models import Reservation
from flask_ai_metering.models import Usage
from flask_ai_metering.ops.reconcile import reconcile
from tests.conftest import add_plan

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")

TEAM = ("Team", "42")
CHAT: list[t.Any] = [{"role": "user", "content": "Hi there"}]
GPT = "gpt-4o-mini"
CLAUDE = "claude-sonnet-4-6"
#: gpt-4o-mini: $0.15/M input, $0.60/M output.
GPT_COST = Decimal("0.00015") + Decimal("0.00006")  # 1000 in, 100 out
#: claude-sonnet-4-6: $3/M input, $15/M output, $3.75/M cache write, $0.30/M cache read.
CLAUDE_COST = Decimal("0.00015") + Decimal("0.0075") + Decimal("0.009") + Decimal("0.0018")


def rows(db: t.Any, model: t.Any) -> list[t.Any]:
    with db.engine.connect() as conn:
        return list(conn.execute(sa.select(model.__table__).order_by(model.__table__.c.id)))


def queue_gpt(fake_llm: t.Any) -> None:
    fake_llm.next_usage(prompt_tokens=1000, completion_tokens=100)


def queue_claude(fake_llm: t.Any) -> None:
    fake_llm.next_anthropic_usage(
        input_tokens=50, cache_creation_input_tokens=2000, cache_read_input_tokens=30000, output_tokens=120
    )


def assert_one_row(db: t.Any, meter: t.Any, *, cost: Decimal, feature: str | None = None, **tokens: int) -> t.Any:
    [row] = rows(db, Usage)
    assert row.total_cost == cost and isinstance(row.total_cost, Decimal)
    assert (row.billable_type, row.billable_id) == TEAM
    assert row.estimated is False
    assert row.feature == feature
    for name, value in tokens.items():
        assert getattr(row, name) == value, name
    assert [r.status for r in rows(db, Reservation)] == ["committed"]
    assert all(c.reserved_tokens == 0 for c in rows(db, Counter))
    assert reconcile(meter.runtime()) == []
    return row


@pytest.fixture
def oai(meter: t.Any, openai_client: t.Any) -> t.Any:
    return meter.instrument(openai_client, billable=TEAM)


@pytest.fixture
def claude(meter: t.Any, anthropic_client: t.Any) -> t.Any:
    return meter.instrument(anthropic_client, billable=TEAM)


def aclients(fake_llm: t.Any, meter: t.Any) -> tuple[t.Any, t.Any]:
    """Async clients, instrumented; made inside the event loop that uses them."""
    a_oai = openai.AsyncOpenAI(base_url=f"{fake_llm.url}/v1", api_key="test", max_retries=0)
    a_claude = anthropic.AsyncAnthropic(base_url=fake_llm.url, api_key="test", max_retries=0)
    return meter.instrument(a_oai, billable=TEAM), meter.instrument(a_claude, billable=TEAM)


# -- OpenAI, sync ----------------------------------------------------------------------------


def test_same_client_still_its_class(meter, openai_client, anthropic_client):
    assert meter.instrument(openai_client) is openai_client
    assert isinstance(openai_client, openai.OpenAI)
    assert meter.instrument(anthropic_client) is anthropic_client
    assert isinstance(anthropic_client, anthropic.Anthropic)
    with pytest.raises(TypeError, match="openai.OpenAI"):
        meter.instrument(object())


def test_chat_completion_exact_cost_and_sdk_object(backend, meter, db, fake_llm, oai):
    queue_gpt(fake_llm)
    with meter.scope(feature="chat"):
        response = oai.chat.completions.create(model=GPT, messages=CHAT, max_completion_tokens=64)
    assert type(response) is openai.types.chat.ChatCompletion
    assert response.usage.prompt_tokens == 1000
    assert_one_row(db, meter, cost=GPT_COST, feature="chat", input_tokens=1000, output_tokens=100, model=GPT)


def test_responses_and_embeddings_exact_cost(meter, db, fake_llm, oai):
    fake_llm.next_usage(prompt_tokens=200, completion_tokens=50, cached_tokens=100)
    response = oai.responses.create(model=GPT, input="Hi", max_output_tokens=80)
    assert type(response) is openai.types.responses.Response
    fake_llm.next_usage(prompt_tokens=8)
    embedded = oai.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert [d.embedding for d in embedded.data] == [[0.25, -0.5, 1.0]] * 2

    first, second = rows(db, Usage)
    # 100 uncached at $0.15/M + 100 cached at $0.075/M + 50 out at $0.60/M
    assert first.total_cost == Decimal("0.000015") + Decimal("0.0000075") + Decimal("0.00003")
    assert (first.input_tokens, first.cached_input_tokens, first.output_tokens) == (200, 100, 50)
    assert second.total_cost == Decimal("0.00000016")  # 8 tokens at $0.02/M
    assert (second.model, second.input_tokens, second.output_tokens) == ("text-embedding-3-small", 8, 0)
    assert reconcile(meter.runtime()) == []


def test_stream_without_usage_asked_is_recorded_exactly_and_hides_the_usage_chunk(meter, db, fake_llm, oai):
    queue_gpt(fake_llm)
    stream = oai.chat.completions.create(model=GPT, messages=CHAT, stream=True)
    assert rows(db, Usage) == []
    text = ""
    chunks = 0
    for chunk in stream:
        chunks += 1
        text += chunk.choices[0].delta.content or ""  # would raise IndexError on the usage chunk
    assert chunks == fake_llm.stream_chunks + 2  # role, deltas, finish: no usage chunk
    assert text == "hello " * fake_llm.stream_chunks
    [sent] = fake_llm.requests_to("/v1/chat/completions")
    assert sent.body["stream_options"] == {"include_usage": True}
    assert_one_row(db, meter, cost=GPT_COST, input_tokens=1000, output_tokens=100)


def test_stream_that_asked_for_usage_sees_it(meter, db, fake_llm, oai):
    queue_gpt(fake_llm)
    with oai.chat.completions.create(
        model=GPT, messages=CHAT, stream=True, stream_options={"include_usage": True}
    ) as stream:
        chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 100
    assert stream.response.status_code == 200
    assert_one_row(db, meter, cost=GPT_COST, input_tokens=1000, output_tokens=100)


def test_chat_stream_helper(meter, db, fake_llm, oai):
    queue_gpt(fake_llm)
    with oai.chat.completions.stream(model=GPT, messages=CHAT, max_tokens=50) as stream:
        assert type(stream).__name__ == "ChatCompletionStream"
        completion = stream.get_final_completion()
    assert completion.choices[0].message.content == "hello " * fake_llm.stream_chunks
    assert completion.usage is None  # the caller did not ask for it
    [sent] = fake_llm.requests_to("/v1/chat/completions")
    assert sent.body["stream_options"] == {"include_usage": True}
    assert_one_row(db, meter, cost=GPT_COST, input_tokens=1000, output_tokens=100)


def test_stream_helper_left_early_commits_on_exit(meter, db, fake_llm, oai):
    fake_llm.next_usage(prompt_tokens=1000, completion_tokens=100)
    with oai.chat.completions.stream(model=GPT, messages=CHAT) as stream:
        for index, _event in enumerate(stream):
            if index == 2:
                break
        assert rows(db, Usage) == []
    [row] = rows(db, Usage)
    assert row.estimated is True  # OpenAI reports usage only at the end
    assert [r.status for r in rows(db, Reservation)] == ["committed"]
    assert rows(db, Counter)[0].reserved_tokens == 0


def test_responses_stream_helper_and_stream_true(meter, db, fake_llm, oai):
    fake_llm.responses_item_events = True
    queue_gpt(fake_llm)
    with oai.responses.stream(model=GPT, input="Hi") as stream:
        final = stream.get_final_response()
    assert final.output_text == "hello " * fake_llm.stream_chunks
    queue_gpt(fake_llm)
    events = [e.type for e in oai.responses.create(model=GPT, input="Hi", stream=True)]
    assert events[-1] == "response.completed"
    assert [(r.input_tokens, r.output_tokens, r.total_cost) for r in rows(db, Usage)] == [(1000, 100, GPT_COST)] * 2
    assert reconcile(meter.runtime()) == []


def test_with_raw_response_is_metered(meter, db, fake_llm, oai):
    queue_gpt(fake_llm)
    raw = oai.chat.completions.with_raw_response.create(model=GPT, messages=CHAT)
    assert raw.headers["x-request-id"].startswith("req_fake_")
    assert raw.parse().usage.completion_tokens == 100
    assert_one_row(db, meter, cost=GPT_COST, input_tokens=1000, output_tokens=100)


# -- Anthropic, sync -------------------------------------------------------------------------


def test_anthropic_message_stream_and_helper(meter, db, fake_llm, claude):
    queue_claude(fake_llm)
    message = claude.messages.create(model=CLAUDE, max_tokens=200, messages=CHAT)
    assert type(message) is anthropic.types.Message
    queue_claude(fake_llm)
    events = [e.type for e in claude.messages.create(model=CLAUDE, max_tokens=200, messages=CHAT, stream=True)]
    assert events[0] == "message_start" and events[-1] == "message_stop"
    queue_claude(fake_llm)
    with claude.messages.stream(model=CLAUDE, max_tokens=200, messages=CHAT) as stream:
        assert type(stream) is anthropic.MessageStream
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "hello " * fake_llm.stream_chunks and final.usage.output_tokens == 120

    recorded = rows(db, Usage)
    assert len(recorded) == 3
    for row in recorded:
        assert (row.input_tokens, row.cached_input_tokens, row.cache_write_tokens) == (32050, 30000, 2000)
        assert row.output_tokens == 120 and row.total_cost == CLAUDE_COST and row.estimated is False
    assert [r.status for r in rows(db, Reservation)] == ["committed"] * 3
    assert reconcile(meter.runtime()) == []


def test_anthropic_helper_closed_early_commits_the_prompt_it_saw(meter, db, fake_llm, claude):
    queue_claude(fake_llm)
    with claude.messages.stream(model=CLAUDE, max_tokens=200, messages=CHAT) as stream:
        next(iter(stream))  # message_start: the prompt's counts
    [row] = rows(db, Usage)
    assert row.input_tokens == 32050
    assert rows(db, Counter)[0].reserved_tokens == 0


# -- async -----------------------------------------------------------------------------------


def test_async_clients_all_forms(backend, meter, db, fake_llm):
    fake_llm.responses_item_events = True

    async def main() -> list[str]:
        a_oai, a_claude = aclients(fake_llm, meter)
        assert isinstance(a_oai, openai.AsyncOpenAI) and isinstance(a_claude, anthropic.AsyncAnthropic)
        texts = []
        queue_gpt(fake_llm)
        completion = await a_oai.chat.completions.create(model=GPT, messages=CHAT)
        texts.append(completion.choices[0].message.content)
        queue_gpt(fake_llm)
        stream = await a_oai.chat.completions.create(model=GPT, messages=CHAT, stream=True)
        texts.append("".join([c.choices[0].delta.content or "" async for c in stream]))
        queue_gpt(fake_llm)
        async with a_oai.chat.completions.stream(model=GPT, messages=CHAT) as helper:
            texts.append((await helper.get_final_completion()).choices[0].message.content)
        queue_gpt(fake_llm)
        async with a_oai.responses.stream(model=GPT, input="Hi") as responses:
            texts.append((await responses.get_final_response()).output_text)
        queue_claude(fake_llm)
        message = await a_claude.messages.create(model=CLAUDE, max_tokens=200, messages=CHAT)
        texts.append(message.content[0].text)
        queue_claude(fake_llm)
        raw = await a_claude.messages.create(model=CLAUDE, max_tokens=200, messages=CHAT, stream=True)
        texts.append("".join([e.delta.text async for e in raw if e.type == "content_block_delta"]))
        queue_claude(fake_llm)
        async with a_claude.messages.stream(model=CLAUDE, max_tokens=200, messages=CHAT) as claude_stream:
            texts.append("".join([t async for t in claude_stream.text_stream]))
        await a_oai.close()
        await a_claude.close()
        return texts

    texts = asyncio.run(main())
    assert texts == ["hello " * fake_llm.stream_chunks] * 7
    recorded = rows(db, Usage)
    assert [r.total_cost for r in recorded] == [GPT_COST] * 4 + [CLAUDE_COST] * 3
    assert not any(r.estimated for r in recorded)
    assert [r.status for r in rows(db, Reservation)] == ["committed"] * 7
    assert reconcile(meter.runtime()) == []


# -- quotas, idempotency, repeats ------------------------------------------------------------


def call_refused(form: str, oai: t.Any, claude: t.Any, fake_llm: t.Any, meter: t.Any) -> None:
    if form == "chat":
        oai.chat.completions.create(model=GPT, messages=CHAT, max_tokens=100)
    elif form == "chat-stream":
        oai.chat.completions.create(model=GPT, messages=CHAT, max_tokens=100, stream=True)
    elif form == "chat-helper":
        with oai.chat.completions.stream(model=GPT, messages=CHAT, max_tokens=100):
            pass
    elif form == "embeddings":
        oai.embeddings.create(model="text-embedding-3-small", input="x" * 800)
    elif form == "claude-helper":
        with claude.messages.stream(model=CLAUDE, max_tokens=100, messages=CHAT):
            pass
    elif form.startswith("async"):

        async def main() -> None:
            a_oai, a_claude = aclients(fake_llm, meter)
            try:
                if form == "async-chat":
                    await a_oai.chat.completions.create(model=GPT, messages=CHAT, max_tokens=100)
                elif form == "async-chat-helper":
                    async with a_oai.chat.completions.stream(model=GPT, messages=CHAT, max_tokens=100):
                        pass
                else:
                    async with a_claude.messages.stream(model=CLAUDE, max_tokens=100, messages=CHAT):
                        pass
            finally:
                await a_oai.close()
                await a_claude.close()

        asyncio.run(main())


@pytest.mark.parametrize(
    "form",
    [
        "chat",
        "chat-stream",
        "chat-helper",
        "embeddings",
        "claude-helper",
        "async-chat",
        "async-chat-helper",
        "async-claude",
    ],
)
def test_quota_refusal_before_any_request(backend, meter, db, fake_llm, oai, claude, form):
    add_plan(db, slug="tiny", token_limit=100)  # each request: 100 out + its prompt
    meter.subscribe(TEAM, "tiny")
    with pytest.raises(AiLimitExceeded):
        call_refused(form, oai, claude, fake_llm, meter)
    assert fake_llm.requests == []
    assert rows(db, Usage) == [] and rows(db, Reservation) == []


def test_hold_is_the_request_cap_plus_the_prompt_estimate(meter, db, fake_llm, oai):
    request = {"model": GPT, "messages": CHAT * 3, "max_completion_tokens": 256, "n": 2}
    estimate = estimate_prompt_tokens("chat", request)
    assert estimate == 3 + 3 * (4 + 1 + 2 + 1 + 2)  # per request; per message: overhead, keys and text
    stream = oai.chat.completions.create(stream=True, **request)
    [held] = rows(db, Reservation)
    assert held.tokens == estimate + 2 * 256
    list(stream)


def test_idempotency_key_from_extra_headers(meter, db, fake_llm, oai):
    queue_gpt(fake_llm)
    headers = {"idempotency-key": "req-7"}
    oai.chat.completions.create(model=GPT, messages=CHAT, extra_headers=headers)
    with pytest.raises(IdempotentReplay) as replay:
        oai.chat.completions.create(model=GPT, messages=CHAT, extra_headers={"Idempotency-Key": "req-7"})
    assert isinstance(replay.value, IdempotencyConflict)
    assert replay.value.result.replayed and replay.value.result.usage.total_cost == GPT_COST
    assert len(fake_llm.requests) == 1
    row = assert_one_row(db, meter, cost=GPT_COST)
    assert row.idempotency_key == "req-7"


def test_instrumenting_twice_meters_once_and_uninstrument_restores(meter, db, fake_llm, openai_client):
    sdk_create = openai_client.chat.completions.create
    meter.instrument(openai_client, billable=TEAM, feature="first")
    meter.instrument(openai_client, billable=TEAM, feature="second")
    queue_gpt(fake_llm)
    openai_client.chat.completions.create(model=GPT, messages=CHAT)
    assert len(fake_llm.requests) == 1
    assert_one_row(db, meter, cost=GPT_COST, feature="second")

    meter.uninstrument(openai_client)
    assert openai_client.chat.completions.create == sdk_create
    assert "create" not in vars(openai_client.chat.completions)
    openai_client.chat.completions.create(model=GPT, messages=CHAT)
    assert len(rows(db, Usage)) == 1
    meter.uninstrument(openai_client)  # harmless when not instrumented


def test_billable_comes_from_the_resolver_per_call(meter, db, fake_llm, openai_client):
    who = ["Team", "1"]
    meter.billable_resolver(lambda: tuple(who))
    client = meter.instrument(openai_client, feature="default-feature")
    client.embeddings.create(model="text-embedding-3-small", input="a")
    who[1] = "2"
    with meter.scope(feature="search"):
        client.embeddings.create(model="text-embedding-3-small", input="b")
    assert [(r.billable_id, r.feature) for r in rows(db, Usage)] == [("1", "default-feature"), ("2", "search")]


def test_scope_decorator_and_plain_meter_call(meter, db, fake_llm, openai_client):
    @meter.scope(feature="summaries")
    def summarise() -> t.Any:
        return meter.call(
            lambda: openai_client.embeddings.create(model="text-embedding-3-small", input="a"), billable=TEAM
        )

    @meter.scope(feature="async-view")
    async def view() -> t.Any:
        return meter.call(
            lambda: openai_client.embeddings.create(model="text-embedding-3-small", input="a"),
            billable=TEAM,
            feature="explicit",
        )

    summarise()
    asyncio.run(view())
    meter.call(lambda: openai_client.embeddings.create(model="text-embedding-3-small", input="a"), billable=TEAM)
    assert [r.feature for r in rows(db, Usage)] == ["summaries", "explicit", None]


def test_uninstrument_restores_every_method(meter, fake_llm, anthropic_client):
    meter.instrument(anthropic_client)
    assert {"create", "stream"} <= set(vars(anthropic_client.messages))
    meter.uninstrument(anthropic_client)
    assert not {"create", "stream"} & set(vars(anthropic_client.messages))

    async def main() -> None:
        a_oai, a_claude = aclients(fake_llm, meter)
        meter.instrument(a_oai)  # again: still one layer
        for client in (a_oai, a_claude):
            meter.uninstrument(client)
            await client.close()
        for resource in (a_oai.chat.completions, a_oai.responses, a_oai.embeddings, a_claude.messages):
            assert not {"create", "stream"} & set(vars(resource))

    asyncio.run(main())


def test_helper_replay_raises_before_any_request(meter, db, fake_llm, claude):
    queue_claude(fake_llm)
    key = {"Idempotency-Key": "msg-1"}
    with claude.messages.stream(model=CLAUDE, max_tokens=200, messages=CHAT, extra_headers=key) as stream:
        stream.until_done()
    with pytest.raises(IdempotentReplay, match="msg-1"):
        with claude.messages.stream(model=CLAUDE, max_tokens=200, messages=CHAT, extra_headers=key):
            pass
    assert len(fake_llm.requests) == 1
    assert_one_row(db, meter, cost=CLAUDE_COST)


def test_disabled_metering_passes_calls_through(make_app, fake_llm, openai_client):
    app, db, meter = make_app(AI_METERING_ENABLED=False)
    with app.app_context():
        client = meter.instrument(openai_client, billable=TEAM)
        chunks = list(client.chat.completions.create(model=GPT, messages=CHAT, stream=True))
        assert all(chunk.choices for chunk in chunks)  # the usage chunk is still hidden
        with client.chat.completions.stream(model=GPT, messages=CHAT) as stream:
            assert stream.get_final_completion().choices[0].message.content
        assert rows(db, Usage) == []


def test_async_with_raw_response_is_metered(meter, db, fake_llm):
    async def main() -> tuple[t.Any, t.Any]:
        a_oai, a_claude = aclients(fake_llm, meter)
        queue_gpt(fake_llm)
        raw_gpt = await a_oai.chat.completions.with_raw_response.create(model=GPT, messages=CHAT)
        queue_claude(fake_llm)
        raw_claude = await a_claude.messages.with_raw_response.create(model=CLAUDE, max_tokens=200, messages=CHAT)
        parsed = raw_gpt.parse(), await raw_claude.parse()
        await a_oai.close()
        await a_claude.close()
        return parsed

    completion, message = asyncio.run(main())
    assert (completion.usage.completion_tokens, message.usage.output_tokens) == (100, 120)
    assert [r.total_cost for r in rows(db, Usage)] == [GPT_COST, CLAUDE_COST]
