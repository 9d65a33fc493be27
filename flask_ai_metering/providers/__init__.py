"""Usage extractors: one small module per provider wire format.

A provider turns a response object into :class:`~flask_ai_metering.metering.usage.Extracted`
token counts, and a stream into an accumulator fed chunk by chunk. Users add their
own through ``AI_METERING_PROVIDERS = {"mycorp": {"class": "pkg.module:MyProvider"}}``:
any class with the methods of :class:`Provider`.
"""

from __future__ import annotations

import typing as t

from ..config import import_string
from ..errors import ConfigurationError
from .anthropic import AnthropicProvider
from .base import Provider
from .base import StreamAccumulator
from .base import TextTally
from .base import count
from .base import field
from .base import model_of
from .manual import ManualProvider
from .openai import OpenAIProvider

__all__ = [
    "Provider",
    "StreamAccumulator",
    "TextTally",
    "builtin_providers",
    "count",
    "field",
    "load_provider",
    "model_of",
]


def load_provider(name: str, spec: t.Any) -> Provider:
    """Instantiate a custom provider from ``"package.module:Class"`` (or a class/instance)."""
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
    providers: list[Provider] = [OpenAIProvider(), AnthropicProvider(), ManualProvider()]
    return {p.name: p for p in providers}
