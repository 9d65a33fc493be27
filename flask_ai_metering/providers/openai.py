"""Usage from the OpenAI SDK: chat completions, the Responses API and embeddings.

Objects are read by field name, so the SDK's pydantic models and their
``model_dump()`` dicts both work, and so does any OpenAI-compatible client
returning the same JSON shapes. The ``openai`` package is an optional extra and
is never imported here.
"""

from __future__ import annotations

import sys
import typing as t

from ..usage import Extracted
from ..usage import TokenCounts

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


def _field(obj: t.Any, name: str) -> t.Any:
    """``obj[name]`` for a mapping, ``obj.name`` otherwise; ``None`` when absent."""
    if obj is None:
        return None
    if isinstance(obj, t.Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def _count(value: t.Any) -> t.Any:
    """An absent count is 0; anything else goes to ``TokenCounts`` to be validated, not coerced."""
    return 0 if value is None else value


def _model(obj: t.Any) -> str | None:
    model = _field(obj, "model")
    return model if isinstance(model, str) and model else None


def tokens_from_usage(usage: t.Any) -> TokenCounts | None:
    """Counts from an OpenAI ``usage`` object or dict, in either of its two shapes.

    Chat completions and embeddings report ``prompt_tokens``/``completion_tokens``;
    the Responses API reports ``input_tokens``/``output_tokens``. Both count cached
    prompt tokens inside the prompt total and reasoning inside the output total,
    which is already :class:`~flask_ai_metering.usage.TokenCounts`' convention.
    """
    if usage is None:
        return None
    if _field(usage, "prompt_tokens") is not None:
        prompt_details = _field(usage, "prompt_tokens_details")
        return TokenCounts(
            input_tokens=_count(_field(usage, "prompt_tokens")),
            # Embeddings have no completion side at all.
            output_tokens=_count(_field(usage, "completion_tokens")),
            cached_input_tokens=_count(_field(prompt_details, "cached_tokens")),
            cache_write_tokens=_count(_field(prompt_details, "cache_write_tokens")),
            reasoning_tokens=_count(_field(_field(usage, "completion_tokens_details"), "reasoning_tokens")),
        )
    if _field(usage, "input_tokens") is not None:
        input_details = _field(usage, "input_tokens_details")
        return TokenCounts(
            input_tokens=_count(_field(usage, "input_tokens")),
            output_tokens=_count(_field(usage, "output_tokens")),
            cached_input_tokens=_count(_field(input_details, "cached_tokens")),
            cache_write_tokens=_count(_field(input_details, "cache_write_tokens")),
            reasoning_tokens=_count(_field(_field(usage, "output_tokens_details"), "reasoning_tokens")),
        )
    return None


class OpenAIStreamAccumulator:
    """Follows one OpenAI stream: chat completion chunks or Responses API events.

    A chat stream reports usage only in a last chunk with ``choices=[]``, and only
    when the request asked for ``stream_options={"include_usage": True}``; without
    it :meth:`result` stays ``None`` and :attr:`output_chars` is all there is.
    A Responses stream reports usage on its ``response.completed`` event.
    """

    def __init__(self) -> None:
        self._tokens: TokenCounts | None = None
        self._model: str | None = None
        self._output_chars = 0

    @property
    def output_chars(self) -> int:
        return self._output_chars

    def feed(self, chunk: t.Any) -> None:
        kind = _field(chunk, "type")
        if isinstance(kind, str):
            self._feed_responses_event(kind, chunk)
        else:
            self._feed_chat_chunk(chunk)

    def result(self) -> Extracted | None:
        if self._tokens is None:
            return None
        return Extracted(tokens=self._tokens, model=self._model)

    def _feed_chat_chunk(self, chunk: t.Any) -> None:
        self._model = _model(chunk) or self._model
        for choice in _field(chunk, "choices") or ():
            delta = _field(choice, "delta")
            for text in (_field(delta, "content"), _field(delta, "refusal")):
                if isinstance(text, str):
                    self._output_chars += len(text)
            for call in _field(delta, "tool_calls") or ():
                arguments = _field(_field(call, "function"), "arguments")
                if isinstance(arguments, str):
                    self._output_chars += len(arguments)
        tokens = tokens_from_usage(_field(chunk, "usage"))
        if tokens is not None:
            self._tokens = tokens

    def _feed_responses_event(self, kind: str, event: t.Any) -> None:
        if kind in _RESPONSES_TEXT_EVENTS:
            delta = _field(event, "delta")
            if isinstance(delta, str):
                self._output_chars += len(delta)
        elif kind in _RESPONSES_SNAPSHOT_EVENTS:
            response = _field(event, "response")
            self._model = _model(response) or self._model
            tokens = tokens_from_usage(_field(response, "usage"))
            if tokens is not None:
                self._tokens = tokens


class OpenAIProvider:
    """Reads usage from OpenAI chat completions, Responses API responses and embeddings."""

    name = "openai"

    def extract(self, response: t.Any) -> Extracted | None:
        tokens = tokens_from_usage(_field(response, "usage"))
        if tokens is None:
            return None
        return Extracted(tokens=tokens, model=_model(response))

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
