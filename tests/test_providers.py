"""The OpenAI and Anthropic extractors, fed by the real SDKs talking to ``FakeLLMServer``.

Response objects are parsed by the SDKs themselves, so a change in their shapes
shows up here rather than in production.
"""

from __future__ import annotations

import asyncio
import sys
import time
import typing as t

import anthropic
import httpx2
import openai
import pytest

from flask_ai_metering.errors import InvalidUsage
from flask_ai_metering.metering.usage import Extracted
from flask_ai_metering.metering.usage import TokenCounts
from flask_ai_metering.providers.anthropic import AnthropicProvider
from flask_ai_metering.providers.openai import OpenAIProvider
from tests.fake_llm import FakeLLMServer
from tests.fake_llm import OpenAIUsage

#: A current model id: anthropic warns (an error under filterwarnings) on deprecated ones.
CLAUDE = "claude-sonnet-4-6"
MESSAGES: list[t.Any] = [{"role": "user", "content": "Hi"}]
#: What the fake streams by default: 5 deltas of "hello ".
STREAM_CHARS = 30

OPENAI_TOKENS = TokenCounts(input_tokens=1200, output_tokens=300, cached_input_tokens=1024, reasoning_tokens=128)
ANTHROPIC_TOKENS = TokenCounts(
    input_tokens=32050, output_tokens=120, cached_input_tokens=30000, cache_write_tokens=2000
)


@pytest.fixture(scope="module")
def server() -> t.Iterator[FakeLLMServer]:
    with FakeLLMServer() as fake:
        yield fake


@pytest.fixture(autouse=True)
def fresh_server(server: FakeLLMServer) -> None:
    server.reset()


@pytest.fixture
def oai(server: FakeLLMServer) -> t.Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="test", max_retries=0) as client:
        yield client


@pytest.fixture
def claude(server: FakeLLMServer) -> t.Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=server.url, api_key="test", max_retries=0) as client:
        yield client


def queue_openai(server: FakeLLMServer) -> None:
    server.next_usage(prompt_tokens=1200, completion_tokens=300, cached_tokens=1024, reasoning_tokens=128)


def queue_anthropic(server: FakeLLMServer) -> None:
    server.next_anthropic_usage(
        input_tokens=50,
        cache_creation_input_tokens=2000,
        cache_read_input_tokens=30000,
        output_tokens=120,
    )


# --- OpenAI -------------------------------------------------------------------------------


def test_chat_completion(server: FakeLLMServer, oai: openai.OpenAI) -> None:
    server.model_map["gpt-4o-mini"] = "gpt-4o-mini-2024-07-18"
    queue_openai(server)
    response = oai.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)

    extracted = OpenAIProvider().extract(response)

    assert extracted == Extracted(tokens=OPENAI_TOKENS, model="gpt-4o-mini-2024-07-18")
    assert OpenAIProvider().extract(response.model_dump()) == extracted
    assert OpenAIProvider().extract(response.model_dump(mode="json")) == extracted
    assert not OpenAIProvider().is_stream(response)
    assert [r.body["model"] for r in server.requests_to("/v1/chat/completions")] == ["gpt-4o-mini"]


def test_chat_completion_cache_writes(server: FakeLLMServer, oai: openai.OpenAI) -> None:
    server.next_usage(prompt_tokens=3000, completion_tokens=10, cached_tokens=1000, cache_write_tokens=1500)
    response = oai.chat.completions.create(model="gpt-5", messages=MESSAGES)

    extracted = OpenAIProvider().extract(response)

    assert extracted is not None
    assert extracted.tokens == TokenCounts(
        input_tokens=3000, output_tokens=10, cached_input_tokens=1000, cache_write_tokens=1500
    )


def test_responses_api(server: FakeLLMServer, oai: openai.OpenAI) -> None:
    queue_openai(server)
    response = oai.responses.create(model="gpt-5-mini", input="Hi")

    extracted = OpenAIProvider().extract(response)

    assert extracted == Extracted(tokens=OPENAI_TOKENS, model="gpt-5-mini")
    assert OpenAIProvider().extract(response.model_dump()) == extracted


@pytest.mark.parametrize("encoding_format", [None, "float"])
def test_embeddings(server: FakeLLMServer, oai: openai.OpenAI, encoding_format: t.Literal["float"] | None) -> None:
    server.next_usage(prompt_tokens=8)
    options: dict[str, t.Any] = {"encoding_format": encoding_format} if encoding_format else {}
    response = oai.embeddings.create(model="text-embedding-3-small", input=["a", "b"], **options)

    extracted = OpenAIProvider().extract(response)

    assert extracted == Extracted(tokens=TokenCounts(input_tokens=8), model="text-embedding-3-small")
    assert [d.embedding for d in response.data] == [[0.25, -0.5, 1.0]] * 2
    sent = server.requests_to("/v1/embeddings")[0].body
    assert sent["encoding_format"] == (encoding_format or "base64")


def test_chat_stream_with_usage(server: FakeLLMServer, oai: openai.OpenAI) -> None:
    server.model_map["gpt-4o-mini"] = "gpt-4o-mini-2024-07-18"
    queue_openai(server)
    provider = OpenAIProvider()
    accumulator = provider.accumulator()
    with oai.chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    ) as stream:
        assert provider.is_stream(stream)
        for chunk in stream:
            accumulator.feed(chunk)

    assert accumulator.result() == Extracted(tokens=OPENAI_TOKENS, model="gpt-4o-mini-2024-07-18")
    assert accumulator.output_chars == STREAM_CHARS


def test_chat_stream_without_usage_reports_none(server: FakeLLMServer, oai: openai.OpenAI) -> None:
    accumulator = OpenAIProvider().accumulator()
    with oai.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True) as stream:
        for chunk in stream:
            accumulator.feed(chunk)

    assert accumulator.result() is None
    assert accumulator.output_chars == STREAM_CHARS


def test_responses_stream(server: FakeLLMServer, oai: openai.OpenAI) -> None:
    queue_openai(server)
    provider = OpenAIProvider()
    accumulator = provider.accumulator()
    with oai.responses.create(model="gpt-5-mini", input="Hi", stream=True) as stream:
        assert provider.is_stream(stream)
        for event in stream:
            accumulator.feed(event)

    assert accumulator.result() == Extracted(tokens=OPENAI_TOKENS, model="gpt-5-mini")
    assert accumulator.output_chars == STREAM_CHARS


@pytest.mark.parametrize("route", ["chat", "responses"])
def test_openai_stream_abandoned_early(server: FakeLLMServer, oai: openai.OpenAI, route: str) -> None:
    """OpenAI reports usage only at the end: an abandoned stream has characters, no usage."""
    accumulator = OpenAIProvider().accumulator()
    stream: t.Any
    if route == "chat":
        stream = oai.chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
    else:
        stream = oai.responses.create(model="gpt-5-mini", input="Hi", stream=True)
    with stream:
        for index, item in enumerate(stream):
            accumulator.feed(item)
            if index == 2:
                break

    assert accumulator.result() is None
    assert 0 < accumulator.output_chars < STREAM_CHARS


def test_openai_stream_cut_by_the_server(server: FakeLLMServer, oai: openai.OpenAI) -> None:
    server.drop_next_stream(after_events=3)
    accumulator = OpenAIProvider().accumulator()
    stream = oai.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    with stream, pytest.raises(openai.APIConnectionError):
        for chunk in stream:
            accumulator.feed(chunk)

    assert accumulator.result() is None
    assert accumulator.output_chars == 2 * len(server.chunk_text)


@pytest.mark.parametrize(
    ("status", "error"),
    [(429, openai.RateLimitError), (500, openai.InternalServerError)],
)
def test_openai_errors_are_typed(
    server: FakeLLMServer, oai: openai.OpenAI, status: int, error: type[openai.APIStatusError]
) -> None:
    server.fail_next(status, message="slow down")

    with pytest.raises(error) as info:
        oai.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)

    assert info.value.status_code == status
    assert "slow down" in str(info.value)
    assert info.value.request_id is not None
    assert len(server.requests) == 1
    # The failure is used up: the next call succeeds.
    assert OpenAIProvider().extract(oai.embeddings.create(model="e", input="x")) is not None


def test_async_openai(server: FakeLLMServer) -> None:
    provider = OpenAIProvider()

    async def run() -> tuple[Extracted | None, Extracted | None, Extracted | None, int]:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="test", max_retries=0) as client:
            queue_openai(server)
            chat = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            queue_openai(server)
            response = await client.responses.create(model="gpt-5-mini", input="Hi")
            queue_openai(server)
            accumulator = provider.accumulator()
            stream = await client.chat.completions.create(
                model="gpt-4o-mini",
                messages=MESSAGES,
                stream=True,
                stream_options={"include_usage": True},
            )
            assert provider.is_stream(stream)
            async with stream:
                async for chunk in stream:
                    accumulator.feed(chunk)
            server.fail_next(429)
            with pytest.raises(openai.RateLimitError):
                await client.embeddings.create(model="e", input="x")
            return (
                provider.extract(chat),
                provider.extract(response),
                accumulator.result(),
                accumulator.output_chars,
            )

    chat, response, streamed, chars = asyncio.run(run())

    assert chat == Extracted(tokens=OPENAI_TOKENS, model="gpt-4o-mini")
    assert response == Extracted(tokens=OPENAI_TOKENS, model="gpt-5-mini")
    assert streamed == Extracted(tokens=OPENAI_TOKENS, model="gpt-4o-mini")
    assert chars == STREAM_CHARS


@pytest.mark.parametrize(
    "response",
    [None, {}, {"usage": None}, {"usage": {"total_tokens": 5}}, object()],
)
def test_openai_no_usage_is_none(response: t.Any) -> None:
    assert OpenAIProvider().extract(response) is None


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": 10.0, "completion_tokens": 1},
        {"prompt_tokens": "10", "completion_tokens": 1},
        {"prompt_tokens": 10, "completion_tokens": -1},
        {"prompt_tokens": 10, "prompt_tokens_details": {"cached_tokens": 11}},
        {"input_tokens": 1, "output_tokens": 1, "output_tokens_details": {"reasoning_tokens": 2}},
    ],
)
def test_openai_bad_counts_are_refused(usage: dict[str, t.Any]) -> None:
    with pytest.raises(InvalidUsage):
        OpenAIProvider().extract({"model": "gpt-4o", "usage": usage})


def test_is_stream_without_the_sdks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Never imports an SDK: without it loaded, nothing can be one of its streams."""
    monkeypatch.delitem(sys.modules, "openai")
    monkeypatch.delitem(sys.modules, "anthropic")

    assert not OpenAIProvider().is_stream(iter([]))
    assert not AnthropicProvider().is_stream(iter([]))
    assert "openai" not in sys.modules and "anthropic" not in sys.modules


# --- Anthropic ----------------------------------------------------------------------------


def test_message(server: FakeLLMServer, claude: anthropic.Anthropic) -> None:
    queue_anthropic(server)
    message = claude.messages.create(model=CLAUDE, max_tokens=1024, messages=MESSAGES)

    extracted = AnthropicProvider().extract(message)

    assert extracted == Extracted(tokens=ANTHROPIC_TOKENS, model=CLAUDE)
    assert AnthropicProvider().extract(message.model_dump()) == extracted
    assert not AnthropicProvider().is_stream(message)


def test_message_thinking_tokens(server: FakeLLMServer, claude: anthropic.Anthropic) -> None:
    server.model_map[CLAUDE] = "claude-sonnet-4-6-20260101"
    server.next_anthropic_usage(input_tokens=10, output_tokens=500, thinking_tokens=400)
    message = claude.messages.create(model=CLAUDE, max_tokens=1024, messages=MESSAGES)

    assert AnthropicProvider().extract(message) == Extracted(
        tokens=TokenCounts(input_tokens=10, output_tokens=500, reasoning_tokens=400),
        model="claude-sonnet-4-6-20260101",
    )


def test_message_cache_counts_none_are_zero() -> None:
    usage = {
        "input_tokens": 7,
        "output_tokens": 3,
        "cache_creation_input_tokens": None,
        "cache_read_input_tokens": None,
    }

    extracted = AnthropicProvider().extract({"model": CLAUDE, "usage": usage})

    assert extracted == Extracted(tokens=TokenCounts(input_tokens=7, output_tokens=3), model=CLAUDE)


def test_message_stream(server: FakeLLMServer, claude: anthropic.Anthropic) -> None:
    queue_anthropic(server)
    provider = AnthropicProvider()
    accumulator = provider.accumulator()
    with claude.messages.create(model=CLAUDE, max_tokens=1024, messages=MESSAGES, stream=True) as stream:
        assert provider.is_stream(stream)
        for event in stream:
            accumulator.feed(event)

    # message_start said output_tokens=1; message_delta's 120 replaced it, not added to it.
    assert accumulator.result() == Extracted(tokens=ANTHROPIC_TOKENS, model=CLAUDE)
    assert accumulator.output_chars == STREAM_CHARS


def test_message_stream_abandoned_early_keeps_the_prompt(server: FakeLLMServer, claude: anthropic.Anthropic) -> None:
    queue_anthropic(server)
    accumulator = AnthropicProvider().accumulator()
    with claude.messages.create(model=CLAUDE, max_tokens=1024, messages=MESSAGES, stream=True) as stream:
        for event in stream:
            accumulator.feed(event)
            if event.type == "content_block_delta":
                break

    assert accumulator.result() == Extracted(
        tokens=TokenCounts(input_tokens=32050, output_tokens=1, cached_input_tokens=30000, cache_write_tokens=2000),
        model=CLAUDE,
    )
    assert accumulator.output_chars == len(server.chunk_text)


def test_message_stream_cut_by_the_server(server: FakeLLMServer, claude: anthropic.Anthropic) -> None:
    """anthropic lets the transport's own error through (it does not wrap it)."""
    queue_anthropic(server)
    server.drop_next_stream(after_events=4)
    accumulator = AnthropicProvider().accumulator()
    stream = claude.messages.create(model=CLAUDE, max_tokens=1024, messages=MESSAGES, stream=True)
    with stream, pytest.raises(httpx2.RemoteProtocolError):
        for event in stream:
            accumulator.feed(event)

    result = accumulator.result()
    assert result is not None
    assert (result.tokens.input_tokens, result.tokens.output_tokens) == (32050, 1)


def test_message_stream_helper(server: FakeLLMServer, claude: anthropic.Anthropic) -> None:
    queue_anthropic(server)
    provider = AnthropicProvider()
    accumulator = provider.accumulator()
    with claude.messages.stream(model=CLAUDE, max_tokens=1024, messages=MESSAGES) as stream:
        assert provider.is_stream(stream)
        for event in stream:
            accumulator.feed(event)
        final = stream.get_final_message()

    assert accumulator.result() == Extracted(tokens=ANTHROPIC_TOKENS, model=CLAUDE)
    assert provider.extract(final) == accumulator.result()
    assert accumulator.output_chars == STREAM_CHARS


def test_message_delta_overwrites_only_what_it_reports() -> None:
    accumulator = AnthropicProvider().accumulator()
    start_usage = {
        "input_tokens": 50,
        "cache_creation_input_tokens": 2000,
        "cache_read_input_tokens": 30000,
        "output_tokens": 1,
    }
    accumulator.feed({"type": "message_start", "message": {"model": CLAUDE, "usage": start_usage}})
    delta_usage = {"output_tokens": 60, "input_tokens": None, "cache_read_input_tokens": None}
    accumulator.feed({"type": "message_delta", "delta": {}, "usage": delta_usage})
    accumulator.feed({"type": "message_delta", "delta": {}, "usage": {"output_tokens": 120}})
    accumulator.feed({"type": "content_block_delta", "delta": {"type": "thinking_delta", "thinking": "hmm"}})
    accumulator.feed({"type": "content_block_delta", "delta": {"type": "input_json_delta", "partial_json": "{}"}})

    assert accumulator.result() == Extracted(tokens=ANTHROPIC_TOKENS, model=CLAUDE)
    assert accumulator.output_chars == 5


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (429, anthropic.RateLimitError),
        (500, anthropic.InternalServerError),
        (529, anthropic.OverloadedError),
    ],
)
def test_anthropic_errors_are_typed(
    server: FakeLLMServer,
    claude: anthropic.Anthropic,
    status: int,
    error: type[anthropic.APIStatusError],
) -> None:
    server.fail_next(status, times=2)

    for _ in range(2):
        with pytest.raises(error) as info:
            claude.messages.create(model=CLAUDE, max_tokens=1024, messages=MESSAGES)
        assert info.value.status_code == status

    assert len(server.requests_to("/v1/messages")) == 2


def test_async_anthropic(server: FakeLLMServer) -> None:
    provider = AnthropicProvider()

    async def run() -> tuple[Extracted | None, Extracted | None, Extracted | None]:
        async with anthropic.AsyncAnthropic(base_url=server.url, api_key="test", max_retries=0) as client:
            queue_anthropic(server)
            message = await client.messages.create(model=CLAUDE, max_tokens=1024, messages=MESSAGES)
            queue_anthropic(server)
            raw = provider.accumulator()
            stream = await client.messages.create(model=CLAUDE, max_tokens=1024, messages=MESSAGES, stream=True)
            assert provider.is_stream(stream)
            async with stream:
                async for event in stream:
                    raw.feed(event)
            queue_anthropic(server)
            helper = provider.accumulator()
            async with client.messages.stream(model=CLAUDE, max_tokens=1024, messages=MESSAGES) as message_stream:
                assert provider.is_stream(message_stream)
                async for helper_event in message_stream:
                    helper.feed(helper_event)
            return provider.extract(message), raw.result(), helper.result()

    expected = Extracted(tokens=ANTHROPIC_TOKENS, model=CLAUDE)
    assert asyncio.run(run()) == (expected, expected, expected)


@pytest.mark.parametrize(
    "response",
    [None, {}, {"usage": None}, {"usage": {"prompt_tokens": 3}}, object()],
)
def test_anthropic_no_usage_is_none(response: t.Any) -> None:
    assert AnthropicProvider().extract(response) is None


def test_anthropic_stream_without_usage_is_none() -> None:
    accumulator = AnthropicProvider().accumulator()
    accumulator.feed({"type": "ping"})

    assert accumulator.result() is None


@pytest.mark.parametrize(
    "usage",
    [
        {"input_tokens": 1, "output_tokens": 1, "cache_read_input_tokens": "5"},
        {"input_tokens": 1.5, "output_tokens": 1},
        {"input_tokens": 1, "output_tokens": 1, "output_tokens_details": {"thinking_tokens": 2}},
    ],
)
def test_anthropic_bad_counts_are_refused(usage: dict[str, t.Any]) -> None:
    with pytest.raises(InvalidUsage):
        AnthropicProvider().extract({"model": CLAUDE, "usage": usage})


# --- The fake itself ----------------------------------------------------------------------


def test_fake_stream_settings(server: FakeLLMServer, oai: openai.OpenAI) -> None:
    server.stream_chunks = 3
    server.chunk_text = "ab"
    server.chunk_delay = 0.05
    accumulator = OpenAIProvider().accumulator()
    started = time.monotonic()
    with oai.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True) as stream:
        for chunk in stream:
            accumulator.feed(chunk)

    # Role chunk, 3 deltas, finish chunk, [DONE]: 5 delays between 6 events.
    assert time.monotonic() - started >= 0.25
    assert accumulator.output_chars == 6


def test_fake_default_usage(server: FakeLLMServer, oai: openai.OpenAI) -> None:
    server.openai_usage = OpenAIUsage(prompt_tokens=40, completion_tokens=2)
    for _ in range(2):
        response = oai.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert OpenAIProvider().extract(response) == Extracted(
            tokens=TokenCounts(input_tokens=40, output_tokens=2), model="gpt-4o-mini"
        )
