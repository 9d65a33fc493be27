"""Prometheus counters of metered calls (extra ``prometheus``, on ``prometheus-client``).

Registered on ``AI_METERING_PROMETHEUS_REGISTRY`` (default: the client's default
registry), once per registry: several apps in one process share the metrics.

* ``ai_metering_calls_total{provider,model,feature}``: calls that ran (recorded or failed)
* ``ai_metering_tokens_total{provider,model,feature,type}``: ``type`` is ``input``,
  ``output``, ``cached_input``, ``cache_write`` or ``reasoning`` (the last three are parts of the first two)
* ``ai_metering_cost_total{provider,model,feature,currency}``
* ``ai_metering_refusals_total{provider,model,feature,reason}``: ``reason`` is ``tokens``,
  ``cost``, ``expired``, ``credits``, ``feature`` or ``limit``
* ``ai_metering_failures_total{provider,model,feature,error_type}``
* ``ai_metering_overhead_seconds{provider}``: time metering spent around a call
  (reserve, and commit or release), a histogram

Label cardinality is bounded: no billable, user or tenant label ever, and at most
``AI_METERING_PROMETHEUS_MAX_MODELS`` distinct model values per registry (models
seen after the cap is reached are counted as ``other``).
"""

from __future__ import annotations

import threading
import typing as t
import weakref

from ..config import ConfigVars
from ..config import import_string
from ..errors import ConfigurationError

try:
    import prometheus_client
except ImportError:  # the ``prometheus`` extra is not installed
    prometheus_client = None  # type: ignore[assignment]

if t.TYPE_CHECKING:
    from ..config import Settings
    from . import CallEvent

#: The label value of models past the cap.
OTHER = "other"
LABELS = ("provider", "model", "feature")
#: Seconds; metering's own work is a few milliseconds.
OVERHEAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _Metrics:
    """The metric families on one registry, and the model labels handed out there."""

    def __init__(self, registry: t.Any) -> None:
        client = prometheus_client
        self.calls = client.Counter("ai_metering_calls", "Metered provider calls that ran.", LABELS, registry=registry)
        self.tokens = client.Counter(
            "ai_metering_tokens", "Tokens of metered calls, by token type.", (*LABELS, "type"), registry=registry
        )
        self.cost = client.Counter(
            "ai_metering_cost", "Cost of metered calls.", (*LABELS, "currency"), registry=registry
        )
        self.refusals = client.Counter(
            "ai_metering_refusals", "Calls refused before they ran, by reason.", (*LABELS, "reason"), registry=registry
        )
        self.failures = client.Counter(
            "ai_metering_failures", "Provider calls that raised.", (*LABELS, "error_type"), registry=registry
        )
        self.overhead = client.Histogram(
            "ai_metering_overhead_seconds",
            "Time metering spent around a call (reserve, then commit or release).",
            ("provider",),
            buckets=OVERHEAD_BUCKETS,
            registry=registry,
        )
        self.models: set[str] = set()
        self.lock = threading.Lock()

    def model_label(self, model: str | None, cap: int) -> str:
        if not model:
            return ""
        if model in self.models:
            return model
        with self.lock:
            if model in self.models:
                return model
            if len(self.models) >= cap:
                return OTHER
            self.models.add(model)
            return model


_registries: weakref.WeakKeyDictionary[t.Any, _Metrics] = weakref.WeakKeyDictionary()
_registries_lock = threading.Lock()


def _metrics_on(registry: t.Any) -> _Metrics:
    with _registries_lock:
        found = _registries.get(registry)
        if found is None:
            found = _registries[registry] = _Metrics(registry)
        return found


class PrometheusObserver:
    """Counts each event on the configured registry."""

    def __init__(self, registry: t.Any, max_models: int) -> None:
        self.registry = registry
        self.max_models = max_models
        self.metrics = _metrics_on(registry)

    @classmethod
    def from_settings(cls, settings: Settings) -> PrometheusObserver:
        """:raises ConfigurationError: ``prometheus-client`` is missing or the registry is not one."""
        if prometheus_client is None:
            raise ConfigurationError(
                f"{ConfigVars.PROMETHEUS_ENABLED} is on but prometheus-client is not installed:"
                " pip install 'flask-ai-metering[prometheus]'"
            )
        registry = settings.prometheus_registry
        if registry is None:
            registry = prometheus_client.REGISTRY
        else:
            registry = import_string(registry, ConfigVars.PROMETHEUS_REGISTRY)
        if not callable(getattr(registry, "register", None)):
            raise ConfigurationError(
                f"{ConfigVars.PROMETHEUS_REGISTRY} must be a prometheus_client CollectorRegistry, got {registry!r}"
            )
        return cls(registry, settings.prometheus_max_models)

    def observe(self, event: CallEvent) -> None:
        m = self.metrics
        labels = (event.provider, m.model_label(event.model, self.max_models), event.feature or "")
        if event.outcome == "refusal":
            m.refusals.labels(*labels, event.refusal_reason or "limit").inc()
            return
        m.calls.labels(*labels).inc()
        if event.overhead is not None:
            m.overhead.labels(event.provider).observe(event.overhead)
        if event.outcome == "failure":
            m.failures.labels(*labels, event.error_type or "").inc()
            return
        for kind, count in (
            ("input", event.input_tokens),
            ("output", event.output_tokens),
            ("cached_input", event.cached_input_tokens),
            ("cache_write", event.cache_write_tokens),
            ("reasoning", event.reasoning_tokens),
        ):
            if count:
                m.tokens.labels(*labels, kind).inc(count)
        if event.cost is not None:
            m.cost.labels(*labels, event.currency or "").inc(float(event.cost))
