"""The fluent form of ``meter.call``, as in the reference README.

Each method returns a new builder: nothing is shared between calls, so a key,
metadata or manual usage set for one call can never leak into the next.
"""

from __future__ import annotations

import dataclasses
import typing as t

if t.TYPE_CHECKING:
    from .extension import AiMetering
    from .results import MeterResult


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

    def with_manual_usage(self, usage: t.Mapping[str, int] | None = None, **counts: int) -> MeterCall:
        """Usage for providers that report none: a dict, or ``input_tokens=…, output_tokens=…``."""
        return self._with(usage={**(usage or {}), **counts})

    def call(self, fn: t.Callable[[], t.Any]) -> MeterResult:
        return self.meter.call(fn, **self.options)

    async def acall(self, fn: t.Callable[[], t.Awaitable[t.Any]]) -> MeterResult:
        return await self.meter.acall(fn, **self.options)
