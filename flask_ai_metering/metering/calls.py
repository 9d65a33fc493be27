"""What ``meter.call`` returns (:class:`MeterResult`), and its fluent form (:class:`MeterCall`).

Each fluent method returns a new builder: nothing is shared between calls, so a key,
metadata or manual usage set for one call can never leak into the next.
"""

from __future__ import annotations

import dataclasses
import typing as t
from decimal import Decimal

if t.TYPE_CHECKING:
    from ..extension import AiMetering
    from ..quota.engine import LimitCheck
    from .usage import PricedUsage


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
        usage: PricedUsage | None,
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


@dataclasses.dataclass(frozen=True)
class MeterCall:
    """``meter.for_user(u).billable(team).using_provider("openai", "gpt-4o-mini").call(fn)``."""

    meter: AiMetering
    options: t.Mapping[str, t.Any] = dataclasses.field(default_factory=dict)

    def _with(self, **options: t.Any) -> MeterCall:
        return dataclasses.replace(self, options={**self.options, **options})

    def for_user(self, user: t.Any) -> MeterCall:
        return self._with(user=user)

    def billable(self, billable: t.Any) -> MeterCall:
        return self._with(billable=billable)

    def for_tenant(self, tenant: t.Any) -> MeterCall:
        return self._with(tenant=tenant)

    def using_provider(self, provider: str, model: str | None = None) -> MeterCall:
        return self._with(provider=provider, model=model)

    def feature(self, feature: str) -> MeterCall:
        return self._with(feature=feature)

    def with_meta(self, meta: dict[str, t.Any]) -> MeterCall:
        return self._with(meta={**(self.options.get("meta") or {}), **meta})

    def with_idempotency_key(self, key: str) -> MeterCall:
        return self._with(idempotency_key=key)

    def billing_mode(self, mode: str) -> MeterCall:
        return self._with(billing_mode=mode)

    def with_max_tokens(self, max_tokens: int) -> MeterCall:
        return self._with(max_tokens=max_tokens)

    def with_max_cost(self, max_cost: Decimal | int | str) -> MeterCall:
        """Refuse the call (``CostCapExceeded``) when its worst-case cost is above ``max_cost``."""
        return self._with(max_cost=max_cost)

    def with_manual_usage(self, usage: t.Mapping[str, int] | None = None, **counts: int) -> MeterCall:
        """Usage for providers that report none: a dict, or ``input_tokens=…, output_tokens=…``."""
        return self._with(usage={**(usage or {}), **counts})

    def call(self, fn: t.Callable[[], t.Any]) -> MeterResult:
        return self.meter.call(fn, **self.options)

    async def acall(self, fn: t.Callable[[], t.Awaitable[t.Any]]) -> MeterResult:
        return await self.meter.acall(fn, **self.options)
