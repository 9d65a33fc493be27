"""Placeholder until the delivery branch lands."""

from __future__ import annotations

import typing as t

if t.TYPE_CHECKING:
    from ..runtime import Runtime


def wake(rt: Runtime) -> None:
    return None
