"""What every provider shares: the protocols, and helpers for reading SDK objects and dicts alike."""

from __future__ import annotations

import typing as t

if t.TYPE_CHECKING:
    from ..metering.usage import Extracted


def field(obj: t.Any, name: str) -> t.Any:
    """``obj[name]`` for a mapping, ``obj.name`` otherwise; ``None`` when absent."""
    if obj is None:
        return None
    if isinstance(obj, t.Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def count(value: t.Any) -> t.Any:
    """An absent count is 0; anything else goes to ``TokenCounts`` to be validated, not coerced."""
    return 0 if value is None else value


def model_of(obj: t.Any) -> str | None:
    model = field(obj, "model")
    return model if isinstance(model, str) and model else None


def response_text(response: t.Any) -> str:
    """The generated text of a complete response, in any of the SDKs' shapes ('' if none).

    Used to estimate the output of a response that reported no usage: OpenAI chat
    ``choices[].message.content``, Responses ``output_text``, Anthropic ``content[].text``.
    """
    if response is None:
        return ""
    text = field(response, "output_text")
    if isinstance(text, str):
        return text
    parts: list[str] = []
    for choice in field(response, "choices") or ():
        content = field(field(choice, "message"), "content")
        if isinstance(content, str):
            parts.append(content)
    content = field(response, "content")
    if isinstance(content, str):
        parts.append(content)
    elif isinstance(content, (list, tuple)):
        parts.extend(part for part in (field(block, "text") for block in content) if isinstance(part, str))
    return "".join(parts)


def text_of(obj: t.Any, name: str) -> str | None:
    """``field(obj, name)`` when it is a non-empty string (a finish reason, a status), else None."""
    value = field(obj, name)
    return value if isinstance(value, str) and value else None


class TextTally:
    """What every built-in stream accumulator keeps: the model, and the characters of output seen."""

    def __init__(self) -> None:
        self._model: str | None = None
        self._output_chars = 0
        #: Finish reasons seen so far, in order, without repeats.
        self._finish_reasons: list[str] = []

    def _finished(self, reason: str | None) -> None:
        if reason is not None and reason not in self._finish_reasons:
            self._finish_reasons.append(reason)

    @property
    def output_chars(self) -> int:
        return self._output_chars


class StreamAccumulator(t.Protocol):
    """Collects usage from a stream's chunks as they pass through."""

    def feed(self, chunk: t.Any) -> None:
        """Look at one chunk (or event) the stream yielded."""

    def result(self) -> Extracted | None:
        """The usage the stream reported so far, or ``None`` if it reported none."""

    @property
    def output_chars(self) -> int:
        """Characters of generated text seen so far, for an estimate when no usage came."""


class Provider(t.Protocol):
    """The interface a provider (built in or custom) implements."""

    #: The name used in ``provider=`` and stored in ``Usage.provider``.
    name: str

    def extract(self, response: t.Any) -> Extracted | None:
        """Read usage off a complete response, or ``None`` if it carries none."""

    def is_stream(self, response: t.Any) -> bool:
        """True when ``response`` is a (sync or async) stream of this provider's SDK."""

    def accumulator(self) -> StreamAccumulator:
        """A fresh accumulator for one stream."""
