"""Observers of metered calls: OpenTelemetry (GenAI conventions) and Prometheus, both optional.

The pipeline tells the observers about each call once it is over (a response,
a stream's end, or an error), and the reserve tells them about each refusal, as
one :class:`CallEvent`. Observers are built once per app from the settings and
are off unless their package is importable and configured:

* OpenTelemetry (extra ``otel``, on ``opentelemetry-api``): ``AI_METERING_OTEL_ENABLED``
  (default on), and only while the app has set a tracer or meter provider (the
  API's own no-op and proxy providers mean "not configured").
* Prometheus (extra ``prometheus``, on ``prometheus-client``): ``AI_METERING_PROMETHEUS_ENABLED``.

An observer never fails a call and never slows one down with I/O: what it does
is in-process (a span handed to the SDK's processor, a counter incremented), and
any error it raises is logged.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import typing as t
from decimal import Decimal

from ..errors import AiLimitExceeded
from ..errors import CreditsInsufficient
from ..errors import FeatureNotAllowed
from .otel import OtelObserver
from .otel import otel_available
from .prometheus import PrometheusObserver

if t.TYPE_CHECKING:
    from ..config import Settings
    from ..metering.failures import FailedCall
    from ..metering.spec import CallSpec
    from ..metering.spec import Hold
    from ..metering.spec import Recorded
    from ..metering.usage import Extracted
    from ..runtime import Runtime

log = logging.getLogger("flask_ai_metering")

#: What became of a call: it ran and was recorded, it raised, or a limit refused it before it ran.
Outcome = t.Literal["success", "failure", "refusal"]


@dataclasses.dataclass(frozen=True)
class CallEvent:
    """One metered call, over: what observers export. Never a prompt, a response or an error message."""

    outcome: Outcome
    provider: str
    billable: tuple[str, str]
    #: The model the call asked for (``model=``), if it named one.
    request_model: str | None = None
    #: The model the provider says it ran (often a dated name).
    response_model: str | None = None
    feature: str | None = None
    user_id: str | None = None
    tenant_id: str | None = None
    #: The GenAI operation: ``chat`` or ``embeddings``.
    operation: str = "chat"
    stream: bool = False
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    estimated: bool = False
    cost: Decimal | None = None
    currency: str | None = None
    unpriced: bool = False
    finish_reasons: tuple[str, ...] = ()
    #: The exception's class name, for a failure (or the refusal's).
    error_type: str | None = None
    http_status: int | None = None
    #: A short, bounded reason for a refusal: ``tokens``, ``cost``, ``expired``, ``credits``, ``feature``.
    refusal_reason: str | None = None
    #: Seconds of the provider call (a stream: until it ended); None for a refusal.
    duration: float | None = None
    #: Seconds metering spent around the call (reserve, and commit or release).
    overhead: float | None = None
    #: Wall-clock nanoseconds when the call ended (the event was made).
    ended_at_ns: int = dataclasses.field(default_factory=time.time_ns)

    @property
    def model(self) -> str | None:
        """The model to label the call with: the one that ran, else the one asked for."""
        return self.response_model or self.request_model

    @property
    def started_at_ns(self) -> int:
        """Wall-clock nanoseconds when the provider call started."""
        return self.ended_at_ns - int((self.duration or 0.0) * 1e9)


class Observer(t.Protocol):
    """Anything that exports finished calls (the built-in OpenTelemetry and Prometheus observers)."""

    def observe(self, event: CallEvent) -> None: ...


def build_observers(settings: Settings) -> tuple[Observer, ...]:
    """The observers the settings and installed packages allow, built once per app.

    :raises ConfigurationError: Prometheus is enabled but ``prometheus-client`` is not installed,
        or its registry setting is not a registry.
    """
    observers: list[Observer] = []
    if settings.otel_enabled and otel_available():
        observers.append(OtelObserver())
    if settings.prometheus_enabled:
        observers.append(PrometheusObserver.from_settings(settings))
    return tuple(observers)


def notify(rt: Runtime, event: CallEvent) -> None:
    """Hand ``event`` to every observer; an observer's error is logged, never raised."""
    for observer in rt.observers:
        try:
            observer.observe(event)
        except Exception:
            log.exception("observer %s failed on a %s event", type(observer).__name__, event.outcome)


def _base(spec: CallSpec) -> dict[str, t.Any]:
    return {
        "provider": spec.provider,
        "billable": spec.billable,
        "request_model": spec.model,
        "feature": spec.feature,
        "user_id": spec.user_id,
        "tenant_id": spec.tenant_id,
    }


def call_ended(
    rt: Runtime,
    spec: CallSpec,
    hold: Hold,
    extracted: Extracted,
    recorded: Recorded,
    *,
    started: float,
    ended: float,
    stream: bool,
) -> None:
    """A call (or a stream) ended and was recorded; ``started``/``ended`` are ``perf_counter`` readings."""
    if not rt.observers:
        return
    usage = recorded.usage
    event = CallEvent(
        outcome="success",
        **_base(spec),
        response_model=extracted.model,
        operation=extracted.operation or "chat",
        stream=stream,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cached_input_tokens=usage.cached_input_tokens,
        cache_write_tokens=usage.cache_write_tokens,
        reasoning_tokens=usage.reasoning_tokens,
        estimated=usage.estimated,
        cost=usage.total_cost,
        currency=usage.currency,
        unpriced=usage.unpriced,
        finish_reasons=extracted.finish_reasons,
        duration=ended - started,
        overhead=hold.reserved_in + (time.perf_counter() - ended),
    )
    notify(rt, event)


def call_failed(rt: Runtime, spec: CallSpec, hold: Hold, failed: FailedCall) -> None:
    """The provider call raised (its hold is released and its failure row written)."""
    if not rt.observers:
        return
    event = CallEvent(
        outcome="failure",
        **_base(spec),
        error_type=failed.error_type,
        http_status=failed.http_status,
        duration=failed.duration,
        overhead=hold.reserved_in + (time.perf_counter() - failed.ended),
    )
    notify(rt, event)


def call_refused(rt: Runtime, spec: CallSpec, error: Exception) -> None:
    """A limit, the wallet or the plan's features refused the call before it ran."""
    if not rt.observers:
        return
    event = CallEvent(
        outcome="refusal",
        **_base(spec),
        error_type=type(error).__name__,
        refusal_reason=refusal_reason(error),
    )
    notify(rt, event)


def refusal_reason(error: Exception) -> str:
    """A bounded label for why a call was refused (fit for a metric label)."""
    if isinstance(error, CreditsInsufficient):
        return "credits"
    if isinstance(error, FeatureNotAllowed):
        return "feature"
    if isinstance(error, AiLimitExceeded):
        message = error.message
        if message.startswith("The subscription has expired"):
            return "expired"
        if message.startswith("Token limit"):
            return "tokens"
        if message.startswith("Cost limit"):
            return "cost"
    return "limit"


__all__ = [
    "CallEvent",
    "Observer",
    "OtelObserver",
    "PrometheusObserver",
    "build_observers",
    "call_ended",
    "call_failed",
    "call_refused",
    "notify",
    "refusal_reason",
]
