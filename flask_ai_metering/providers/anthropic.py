"""Usage from the Anthropic SDK: ``messages.create``, plain or streamed.

Anthropic reports the uncached prompt, cache writes and cache reads as three
separate counts; :class:`~flask_ai_metering.metering.usage.TokenCounts` wants the whole
prompt in ``input_tokens`` with the cache counts as parts of it, so they are
added up here. Objects are read by field name, so ``model_dump()`` dicts work too.
The ``anthropic`` package is an optional extra and is never imported here.

Streams: the raw ``messages.create(..., stream=True)`` result is supported, and
so is the ``MessageStream`` the ``messages.stream()`` helper gives inside its
``with`` block (its events are the raw ones plus extras that are ignored).
"""

from __future__ import annotations

import sys
import typing as t

from ..metering.usage import Extracted
from ..metering.usage import TokenCounts
from ..metering.usage import check_token_count
from .base import TextTally
from .base import count
from .base import field
from .base import model_of
from .base import text_of

#: The usage fields a stream may report, each a running total that overwrites.
_STREAM_COUNTS = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)
#: ``content_block_delta`` kinds and the field holding their generated text: thinking
#: and tool arguments are billed as output too, so they count toward an estimate.
_DELTA_TEXT_FIELDS = {
    "text_delta": "text",
    "thinking_delta": "thinking",
    "input_json_delta": "partial_json",
}


def _thinking_tokens(usage: t.Any) -> t.Any:
    return field(field(usage, "output_tokens_details"), "thinking_tokens")


def _tokens(counts: t.Mapping[str, t.Any], thinking_tokens: t.Any) -> TokenCounts:
    # Checked before they are added up, so a bad value is reported under its own name.
    uncached, cache_write, cache_read = (
        check_token_count(count(counts.get(name)), f"usage.{name}")
        for name in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
    )
    return TokenCounts(
        input_tokens=uncached + cache_write + cache_read,
        output_tokens=count(counts.get("output_tokens")),
        cached_input_tokens=cache_read,
        cache_write_tokens=cache_write,
        reasoning_tokens=count(thinking_tokens),
    )


class AnthropicStreamAccumulator(TextTally):
    """Follows one Messages stream.

    ``message_start`` carries the model and the input and cache counts (with
    ``output_tokens`` about 1); each ``message_delta`` carries running totals, so
    every count it gives overwrites the one held, and one it leaves out or sets
    to ``None`` keeps its earlier value. A stream cut off after ``message_start``
    therefore still reports its whole prompt.
    """

    def __init__(self) -> None:
        super().__init__()
        self._counts: dict[str, t.Any] = {}
        self._thinking_tokens: t.Any = None

    def feed(self, chunk: t.Any) -> None:
        kind = field(chunk, "type")
        if kind == "message_start":
            message = field(chunk, "message")
            self._model = model_of(message) or self._model
            self._merge(field(message, "usage"))
        elif kind == "message_delta":
            self._merge(field(chunk, "usage"))
            self._finished(text_of(field(chunk, "delta"), "stop_reason"))
        elif kind == "content_block_delta":
            delta = field(chunk, "delta")
            text = field(delta, _DELTA_TEXT_FIELDS.get(field(delta, "type"), ""))
            if isinstance(text, str):
                self._output_chars += len(text)

    def result(self) -> Extracted | None:
        if not self._counts:
            return None
        return Extracted(
            tokens=_tokens(self._counts, self._thinking_tokens),
            model=self._model,
            finish_reasons=tuple(self._finish_reasons),
            operation="chat",
        )

    def _merge(self, usage: t.Any) -> None:
        for name in _STREAM_COUNTS:
            value = field(usage, name)
            if value is not None:
                self._counts[name] = value
        thinking_tokens = _thinking_tokens(usage)
        if thinking_tokens is not None:
            self._thinking_tokens = thinking_tokens


class AnthropicProvider:
    """Reads usage from Anthropic ``Message`` objects and Messages streams."""

    name = "anthropic"

    def extract(self, response: t.Any) -> Extracted | None:
        usage = field(response, "usage")
        counts = {name: field(usage, name) for name in _STREAM_COUNTS}
        if counts["input_tokens"] is None and counts["output_tokens"] is None:
            # Not an Anthropic usage shape: better no reading than a fake zero.
            return None
        reason = text_of(response, "stop_reason")
        return Extracted(
            tokens=_tokens(counts, _thinking_tokens(usage)),
            model=model_of(response),
            finish_reasons=() if reason is None else (reason,),
            operation="chat",
        )

    def is_stream(self, response: t.Any) -> bool:
        """True for ``anthropic.Stream``/``AsyncStream`` and the ``MessageStream`` helpers.

        Looked up in ``sys.modules`` rather than imported: if the SDK was never
        imported, nothing can be one of its streams, and the extra stays optional.
        """
        sdk = sys.modules.get("anthropic")
        if sdk is None:
            return False
        kinds = (sdk.Stream, sdk.AsyncStream, sdk.MessageStream, sdk.AsyncMessageStream)
        return isinstance(response, kinds)

    def accumulator(self) -> AnthropicStreamAccumulator:
        return AnthropicStreamAccumulator()
