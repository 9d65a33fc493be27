"""Usage extractors: one small module per provider wire format.

A provider turns a response object into :class:`~flask_ai_metering.metering.usage.Extracted`
token counts, and a stream into an accumulator fed chunk by chunk. Users add their
own through ``AI_METERING_PROVIDERS = {"mycorp": {"class": "pkg.module:MyProvider"}}``:
any class with the methods of :class:`Provider`.
"""

from __future__ import annotations

import typing as t

from ..errors import ConfigurationError
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


class TextTally:
    """What every built-in stream accumulator keeps: the model, and the characters of output seen."""

    def __init__(self) -> None:
        self._model: str | None = None
        self._output_chars = 0

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


def load_provider(name: str, spec: t.Any) -> Provider:
    """Instantiate a custom provider from ``"package.module:Class"`` (or a class/instance)."""
    from ..config import import_string

    obj = import_string(spec, f"AI_METERING_PROVIDERS[{name!r}]['class']") if isinstance(spec, str) else spec
    instance = obj() if isinstance(obj, type) else obj
    for method in ("extract", "is_stream", "accumulator"):
        if not callable(getattr(instance, method, None)):
            raise ConfigurationError(
                f"AI_METERING_PROVIDERS[{name!r}]['class'] must define {method}();"
                " see flask_ai_metering.providers.Provider"
            )
    if not getattr(instance, "name", None):
        instance.name = name
    return t.cast(Provider, instance)


def builtin_providers() -> dict[str, Provider]:
    """The providers shipped with the library, keyed by name."""
    from .anthropic import AnthropicProvider
    from .manual import ManualProvider
    from .openai import OpenAIProvider

    providers: list[Provider] = [OpenAIProvider(), AnthropicProvider(), ManualProvider()]
    return {p.name: p for p in providers}
