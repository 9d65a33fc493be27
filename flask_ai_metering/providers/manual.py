"""The provider for calls whose responses carry no usage: counts come from ``usage=``."""

from __future__ import annotations

import typing as t

from ..metering.usage import Extracted


class _NoUsage:
    output_chars = 0

    def feed(self, chunk: t.Any) -> None:
        return None

    def result(self) -> Extracted | None:
        return None


class ManualProvider:
    """Reads nothing from the response: the caller passes ``usage={...}``."""

    name = "manual"

    def extract(self, response: t.Any) -> Extracted | None:
        return None

    def is_stream(self, response: t.Any) -> bool:
        return False

    def accumulator(self) -> _NoUsage:
        return _NoUsage()
