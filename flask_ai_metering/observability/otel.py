"""OpenTelemetry spans and metrics after the GenAI semantic conventions (extra ``otel``).

Only ``opentelemetry-api`` is used; the app brings the SDK and its exporters. While
the app has set no tracer provider (the API's proxy or no-op provider answers),
no span is made; while it has set no meter provider, no metric is recorded.

Each call that ran becomes one ``CLIENT`` span named ``"{operation} {model}"``,
from the provider call's start to its end (a stream's: to its last chunk),
parented on the current span. When the current span is itself a recording
``CLIENT`` span (the app wrapped the call in its own), that span is enriched
instead. The span carries the convention's attributes (``gen_ai.operation.name``,
``gen_ai.provider.name``, ``gen_ai.request.model``, ``gen_ai.response.model``,
``gen_ai.usage.*``, ``gen_ai.response.finish_reasons``, ``error.type``) and ours
under ``ai_metering.*``: the cost, the billable, the user, tenant and feature.

Metrics: the convention's ``gen_ai.client.token.usage`` and
``gen_ai.client.operation.duration`` histograms, plus ``ai_metering.cost`` and
``ai_metering.refusals`` counters. Metric attributes never include the
billable, the user or the tenant (unbounded cardinality): those go on spans only.
"""

from __future__ import annotations

import threading
import typing as t

try:
    from opentelemetry import metrics
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind
    from opentelemetry.trace import Status
    from opentelemetry.trace import StatusCode
except ImportError:  # the ``otel`` extra is not installed
    metrics = None  # type: ignore[assignment]
    trace = None  # type: ignore[assignment]

if t.TYPE_CHECKING:
    from . import CallEvent

#: The instrumentation scope our spans and metrics are reported under.
SCOPE = "flask_ai_metering"

#: The GenAI convention's advised bucket boundaries.
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)


def otel_available() -> bool:
    """True when ``opentelemetry-api`` is installed."""
    return trace is not None


def _configured(provider: object) -> bool:
    """False for the API's own placeholder providers: nothing was set up, so nothing is exported."""
    module = type(provider).__module__
    return not (module.startswith("opentelemetry.trace") or module.startswith("opentelemetry.metrics"))


class _Instruments:
    def __init__(self, meter: t.Any) -> None:
        self.tokens = meter.create_histogram(
            "gen_ai.client.token.usage",
            unit="{token}",
            description="Number of input and output tokens used.",
            explicit_bucket_boundaries_advisory=TOKEN_BUCKETS,
        )
        self.duration = meter.create_histogram(
            "gen_ai.client.operation.duration",
            unit="s",
            description="GenAI operation duration.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.cost = meter.create_counter(
            "ai_metering.cost",
            unit="{currency}",
            description="Cost of metered calls, in the currency named by ai_metering.currency.",
        )
        self.refusals = meter.create_counter(
            "ai_metering.refusals", unit="{call}", description="Calls refused by a limit before they ran."
        )


class OtelObserver:
    """Exports each event as a GenAI client span and metrics, once the app configured the SDK."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tracer_for: object = None
        self._tracer: t.Any = None
        self._meter_for: object = None
        self._instruments: _Instruments | None = None

    def observe(self, event: CallEvent) -> None:
        if event.outcome != "refusal":
            tracer = self._current_tracer()
            if tracer is not None:
                self._span(tracer, event)
        instruments = self._current_instruments()
        if instruments is not None:
            self._record(instruments, event)

    # -- providers, looked up per event: the app may configure the SDK after init_app -------

    def _current_tracer(self) -> t.Any:
        provider = trace.get_tracer_provider()
        if provider is not self._tracer_for:
            with self._lock:
                self._tracer = provider.get_tracer(SCOPE) if _configured(provider) else None
                self._tracer_for = provider
        return self._tracer

    def _current_instruments(self) -> _Instruments | None:
        provider = metrics.get_meter_provider()
        if provider is not self._meter_for:
            with self._lock:
                self._instruments = _Instruments(provider.get_meter(SCOPE)) if _configured(provider) else None
                self._meter_for = provider
        return self._instruments

    # -- spans ----------------------------------------------------------------------------------

    def _span(self, tracer: t.Any, event: CallEvent) -> None:
        attributes = span_attributes(event)
        current = trace.get_current_span()
        if current.is_recording() and getattr(current, "kind", None) is SpanKind.CLIENT:
            current.set_attributes(attributes)
            if event.outcome == "failure":
                current.set_status(Status(StatusCode.ERROR))
            return
        name = " ".join(p for p in (event.operation, event.request_model or event.response_model) if p)
        span = tracer.start_span(name, kind=SpanKind.CLIENT, start_time=event.started_at_ns, attributes=attributes)
        if event.outcome == "failure":
            span.set_status(Status(StatusCode.ERROR))
        span.end(end_time=event.ended_at_ns)

    # -- metrics --------------------------------------------------------------------------------

    def _record(self, instruments: _Instruments, event: CallEvent) -> None:
        labels = metric_attributes(event)
        if event.outcome == "refusal":
            instruments.refusals.add(1, {**labels, "ai_metering.refusal.reason": event.refusal_reason or "limit"})
            return
        if event.duration is not None:
            instruments.duration.record(event.duration, labels)
        if event.outcome == "success":
            instruments.tokens.record(event.input_tokens, {**labels, "gen_ai.token.type": "input"})
            instruments.tokens.record(event.output_tokens, {**labels, "gen_ai.token.type": "output"})
            if event.cost is not None:
                instruments.cost.add(float(event.cost), {**labels, "ai_metering.currency": event.currency or ""})


def _common(event: CallEvent) -> dict[str, t.Any]:
    """The convention's attributes every span and metric of a call carries."""
    attributes: dict[str, t.Any] = {
        "gen_ai.operation.name": event.operation,
        "gen_ai.provider.name": event.provider,
    }
    if event.request_model:
        attributes["gen_ai.request.model"] = event.request_model
    if event.response_model:
        attributes["gen_ai.response.model"] = event.response_model
    if event.error_type:
        attributes["error.type"] = event.error_type
    return attributes


def metric_attributes(event: CallEvent) -> dict[str, t.Any]:
    """Bounded attributes only: never the billable, the user or the tenant."""
    attributes = _common(event)
    if event.feature:
        attributes["ai_metering.feature"] = event.feature
    return attributes


def span_attributes(event: CallEvent) -> dict[str, t.Any]:
    """The span's attributes: the convention's, then ours (cost, billable, attribution)."""
    attributes = _common(event)
    if event.http_status is not None:
        attributes["http.response.status_code"] = event.http_status
    if event.outcome == "success":
        attributes["gen_ai.usage.input_tokens"] = event.input_tokens
        attributes["gen_ai.usage.output_tokens"] = event.output_tokens
        if event.cached_input_tokens:
            attributes["gen_ai.usage.cache_read.input_tokens"] = event.cached_input_tokens
        if event.cache_write_tokens:
            attributes["gen_ai.usage.cache_creation.input_tokens"] = event.cache_write_tokens
        if event.reasoning_tokens:
            attributes["gen_ai.usage.reasoning.output_tokens"] = event.reasoning_tokens
        if event.finish_reasons:
            attributes["gen_ai.response.finish_reasons"] = list(event.finish_reasons)
        if event.cost is not None:
            # The exact decimal string: a span is read by people, and money is never a float here.
            attributes["ai_metering.cost"] = format(event.cost, "f")
            attributes["ai_metering.currency"] = event.currency or ""
        attributes["ai_metering.estimated"] = event.estimated
        attributes["ai_metering.unpriced"] = event.unpriced
        attributes["ai_metering.stream"] = event.stream
    attributes["ai_metering.billable"] = f"{event.billable[0]}:{event.billable[1]}"
    for key, value in (
        ("ai_metering.user_id", event.user_id),
        ("ai_metering.tenant_id", event.tenant_id),
        ("ai_metering.feature", event.feature),
    ):
        if value is not None:
            attributes[key] = value
    return attributes
