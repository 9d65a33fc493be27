"""Usage from the OpenAI SDK: chat completions, the Responses API and embeddings.

Objects are read by field name, so the SDK's pydantic models and their
``model_dump()`` dicts both work, and so does any OpenAI-compatible client
returning the same JSON shapes. The ``openai`` package is an optional extra and
is never imported here.
"""

from __future__ import annotations

import sys
import typing as t

from ..metering.usage import Extracted
from ..metering.usage import TokenCounts
from .base import TextTally
from .base import count
from .base import field
from .base import model_of
from .base import text_of

#: Responses API stream events whose ``delta`` is generated text (or tool arguments),
#: counted for an estimate when a stream ends without usage.
_RESPONSES_TEXT_EVENTS = frozenset(
    {
        "response.output_text.delta",
        "response.refusal.delta",
        "response.function_call_arguments.delta",
    }
)
#: Responses API events that carry the whole response (``usage`` is set on the final ones).
_RESPONSES_SNAPSHOT_EVENTS = frozenset(
    {
        "response.created",
        "response.in_progress",
        "response.completed",
        "response.incomplete",
        "response.failed",
    }
)


def tokens_from_usage(usage: t.Any) -> TokenCounts | None:
    """Counts from an OpenAI ``usage`` object or dict, in either of its two shapes.

    Chat completions and embeddings report ``prompt_tokens``/``completion_tokens``;
    the Responses API reports ``input_tokens``/``output_tokens``. Both count cached
    prompt tokens inside the prompt total and reasoning inside the output total,
    which is already :class:`~flask_ai_metering.metering.usage.TokenCounts`' convention.
    """
    if usage is None:
        return None
    if field(usage, "prompt_tokens") is not None:
        prompt_details = field(usage, "prompt_tokens_details")
        return TokenCounts(
            input_tokens=count(field(usage, "prompt_tokens")),
            # Embeddings have no completion side at all.
            output_tokens=count(field(usage, "completion_tokens")),
            cached_input_tokens=count(field(prompt_details, "cached_tokens")),
            cache_write_tokens=count(field(prompt_details, "cache_write_tokens")),
            reasoning_tokens=count(field(field(usage, "completion_tokens_details"), "reasoning_tokens")),
        )
    if field(usage, "input_tokens") is not None:
        input_details = field(usage, "input_tokens_details")
        return TokenCounts(
            input_tokens=count(field(usage, "input_tokens")),
            output_tokens=count(field(usage, "output_tokens")),
            cached_input_tokens=count(field(input_details, "cached_tokens")),
            cache_write_tokens=count(field(input_details, "cache_write_tokens")),
            reasoning_tokens=count(field(field(usage, "output_tokens_details"), "reasoning_tokens")),
        )
    return None


def finish_reasons(response: t.Any) -> tuple[str, ...]:
    """Each choice's ``finish_reason`` (chat); the Responses API's incomplete reason, else its status."""
    choices = field(response, "choices")
    reasons: list[str | None] = []
    if choices:
        reasons = [text_of(choice, "finish_reason") for choice in choices]
    elif field(response, "object") == "response":
        reasons = [text_of(field(response, "incomplete_details"), "reason") or text_of(response, "status")]
    return tuple(dict.fromkeys(r for r in reasons if r is not None))


def operation_of(response: t.Any) -> str:
    """The GenAI operation a response answers: an embeddings list, else a chat."""
    return "embeddings" if field(response, "object") == "list" else "chat"


class OpenAIStreamAccumulator(TextTally):
    """Follows one OpenAI stream: chat completion chunks or Responses API events.

    A chat stream reports usage only in a last chunk with ``choices=[]``, and only
    when the request asked for ``stream_options={"include_usage": True}``; without
    it :meth:`result` stays ``None`` and :attr:`output_chars` is all there is.
    A Responses stream reports usage on its ``response.completed`` event.
    """

    def __init__(self) -> None:
        super().__init__()
        self._tokens: TokenCounts | None = None

    def feed(self, chunk: t.Any) -> None:
        kind = field(chunk, "type")
        if isinstance(kind, str):
            self._feed_responses_event(kind, chunk)
        else:
            self._feed_chat_chunk(chunk)

    def result(self) -> Extracted | None:
        if self._tokens is None:
            return None
        return Extracted(
            tokens=self._tokens, model=self._model, finish_reasons=tuple(self._finish_reasons), operation="chat"
        )

    def _feed_chat_chunk(self, chunk: t.Any) -> None:
        self._model = model_of(chunk) or self._model
        for choice in field(chunk, "choices") or ():
            self._finished(text_of(choice, "finish_reason"))
            delta = field(choice, "delta")
            for text in (field(delta, "content"), field(delta, "refusal")):
                if isinstance(text, str):
                    self._output_chars += len(text)
            for call in field(delta, "tool_calls") or ():
                arguments = field(field(call, "function"), "arguments")
                if isinstance(arguments, str):
                    self._output_chars += len(arguments)
        tokens = tokens_from_usage(field(chunk, "usage"))
        if tokens is not None:
            self._tokens = tokens

    def _feed_responses_event(self, kind: str, event: t.Any) -> None:
        if kind in _RESPONSES_TEXT_EVENTS:
            delta = field(event, "delta")
            if isinstance(delta, str):
                self._output_chars += len(delta)
        elif kind in _RESPONSES_SNAPSHOT_EVENTS:
            response = field(event, "response")
            self._model = model_of(response) or self._model
            if kind != "response.created" and kind != "response.in_progress":
                self._finished(next(iter(finish_reasons(response)), None))
            tokens = tokens_from_usage(field(response, "usage"))
            if tokens is not None:
                self._tokens = tokens


class OpenAIProvider:
    """Reads usage from OpenAI chat completions, Responses API responses and embeddings."""

    name = "openai"

    def extract(self, response: t.Any) -> Extracted | None:
        tokens = tokens_from_usage(field(response, "usage"))
        if tokens is None:
            return None
        return Extracted(
            tokens=tokens,
            model=model_of(response),
            finish_reasons=finish_reasons(response),
            operation=operation_of(response),
        )

    def is_stream(self, response: t.Any) -> bool:
        """True for the ``stream=True`` results, ``openai.Stream`` and ``openai.AsyncStream``.

        Looked up in ``sys.modules`` rather than imported: if the SDK was never
        imported, nothing can be one of its streams, and the extra stays optional.
        """
        sdk = sys.modules.get("openai")
        if sdk is None:
            return False
        return isinstance(response, (sdk.Stream, sdk.AsyncStream))

    def accumulator(self) -> OpenAIStreamAccumulator:
        return OpenAIStreamAccumulator()
