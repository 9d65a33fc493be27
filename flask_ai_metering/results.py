"""What ``meter.call`` returns: the provider's response, the usage and the limits."""

from __future__ import annotations

import typing as t
from decimal import Decimal

if t.TYPE_CHECKING:
    from .quota import LimitCheck
    from .usage import Usage


class MeterResult:
    """The outcome of one metered call.

    ``response`` is the provider's own object, untouched (for a stream, an
    iterator yielding its chunks). ``usage`` and ``limit`` are ``None`` for a
    stream until it has ended; a replayed idempotency key has ``replayed=True``,
    ``response=None`` and the first call's usage.
    """

    __slots__ = ("response", "usage", "limit", "replayed", "usage_id")

    def __init__(
        self,
        response: t.Any,
        usage: Usage | None,
        limit: LimitCheck | None,
        *,
        replayed: bool = False,
        usage_id: int | None = None,
    ) -> None:
        self.response = response
        self.usage = usage
        self.limit = limit
        self.replayed = replayed
        #: Primary key of the ``Usage`` row written (or replayed).
        self.usage_id = usage_id

    @property
    def remaining_tokens(self) -> int | None:
        return None if self.limit is None else self.limit.remaining_tokens

    @property
    def remaining_cost(self) -> Decimal | None:
        return None if self.limit is None else self.limit.remaining_cost

    @property
    def is_approaching_limit(self) -> bool:
        return bool(self.limit and self.limit.approaching)

    @property
    def is_limit_reached(self) -> bool:
        return bool(self.limit and self.limit.hard_limit_reached)

    def __repr__(self) -> str:
        return f"<MeterResult usage={self.usage!r} replayed={self.replayed}>"
