"""OpenTelemetry: GenAI-convention spans and metrics of metered calls, read back through the SDK's in-memory exporters.

The SDK's providers are global and can be set once per process, so this module sets
them once (the first test that needs them) and reads metrics with delta temporality.
"""

from __future__ import annotations

import typing as t

import pytest

otel_sdk = pytest.importorskip("opentelemetry.sdk")

from opentelemetry import metrics  # noqa: E402
from opentelemetry import trace  # noqa: E402
from opentelemetry.sdk.metrics import Counter  # noqa: E402
from opentelemetry.sdk.metrics import Histogram  # noqa: E402
from opentelemetry.sdk.metrics import MeterProvider  # noqa: E402
from opentelemetry.sdk.metrics.export import AggregationTemporality  # noqa: E402
from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import SpanKind  # noqa: E402
from opentelemetry.trace import StatusCode  # noqa: E402

from flask_ai_metering.observability import otel as otel_module  # noqa: E402
from tests.conftest import add_plan  # noqa: E402

TEAM = ("Team", "42")
CHAT = [{"role": "user", "content": "hi"}]
CLAUDE = "claude-sonnet-4-6"


class Telemetry:
    def __init__(self) -> None:
        self.spans = InMemorySpanExporter()
        self.reader = InMemoryMetricReader(
            preferred_temporality={Counter: AggregationTemporality.DELTA, Histogram: AggregationTemporality.DELTA}
        )
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        trace.set_tracer_provider(tracer_provider)
        metrics.set_meter_provider(MeterProvider(metric_readers=[self.reader]))

    def reset(self) -> None:
        self.spans.clear()
        self.reader.get_metrics_data()  # delta temporality: collecting drains what came before

    def points(self) -> dict[str, list[t.Any]]:
        """Data points per metric name since the last call."""
        found: dict[str, list[t.Any]] = {}
        data = self.reader.get_metrics_data()
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                if scope.scope.name != otel_module.SCOPE:
                    continue
                for metric in scope.metrics:
                    found.setdefault(metric.name, []).extend(metric.data.data_points)
        return found


_telemetry: list[Telemetry] = []


@pytest.fixture
def telemetry() -> Telemetry:
    if not _telemetry:
        _telemetry.append(Telemetry())
    _telemetry[0].reset()
    return _telemetry[0]


def only_span(telemetry: Telemetry) -> t.Any:
    spans = [s for s in telemetry.spans.get_finished_spans() if s.instrumentation_scope.name == otel_module.SCOPE]
    assert len(spans) == 1, spans
    return spans[0]


def by_type(points: list[t.Any]) -> dict[str, t.Any]:
    return {p.attributes["gen_ai.token.type"]: p for p in points}


def assert_no_unbounded_labels(points: dict[str, list[t.Any]]) -> None:
    for name, data in points.items():
        for point in data:
            for key in point.attributes:
                assert "billable" not in key and "user" not in key and "tenant" not in key, (name, key)


def test_openai_chat_span_and_metrics(telemetry, meter, fake_llm, openai_client):
    fake_llm.model_map["gpt-4o-mini"] = "gpt-4o-mini-2024-07-18"
    fake_llm.next_usage(prompt_tokens=1200, completion_tokens=300, cached_tokens=1024, reasoning_tokens=128)
    result = meter.call(
        lambda: openai_client.chat.completions.create(model="gpt-4o-mini", messages=CHAT),
        billable=TEAM,
        user=("User", 7),
        tenant=("Org", 3),
        model="gpt-4o-mini",
        feature="chat",
    )

    span = only_span(telemetry)
    assert span.name == "chat gpt-4o-mini"
    assert span.kind is SpanKind.CLIENT
    assert span.status.status_code is StatusCode.UNSET
    attributes = dict(span.attributes)
    assert attributes == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.response.model": "gpt-4o-mini-2024-07-18",
        "gen_ai.usage.input_tokens": 1200,
        "gen_ai.usage.output_tokens": 300,
        "gen_ai.usage.cache_read.input_tokens": 1024,
        "gen_ai.usage.reasoning.output_tokens": 128,
        "gen_ai.response.finish_reasons": ("stop",),
        "ai_metering.cost": format(result.usage.total_cost, "f"),
        "ai_metering.currency": "usd",
        "ai_metering.estimated": False,
        "ai_metering.unpriced": False,
        "ai_metering.stream": False,
        "ai_metering.billable": "Team:42",
        "ai_metering.user_id": "7",
        "ai_metering.tenant_id": "3",
        "ai_metering.feature": "chat",
    }
    assert span.end_time > span.start_time

    points = telemetry.points()
    tokens = by_type(points["gen_ai.client.token.usage"])
    assert (tokens["input"].sum, tokens["input"].count) == (1200, 1)
    assert (tokens["output"].sum, tokens["output"].count) == (300, 1)
    assert tokens["input"].attributes["gen_ai.response.model"] == "gpt-4o-mini-2024-07-18"
    [duration] = points["gen_ai.client.operation.duration"]
    assert duration.count == 1 and duration.attributes["gen_ai.provider.name"] == "openai"
    [cost] = points["ai_metering.cost"]
    assert cost.value == pytest.approx(float(result.usage.total_cost))
    assert_no_unbounded_labels(points)


def test_openai_chat_stream_span_has_exact_tokens(telemetry, meter, fake_llm, openai_client):
    fake_llm.next_usage(prompt_tokens=1200, completion_tokens=300, cached_tokens=1024, reasoning_tokens=128)
    result = meter.call(
        lambda: openai_client.chat.completions.create(
            model="gpt-4o-mini", messages=CHAT, stream=True, stream_options={"include_usage": True}
        ),
        billable=TEAM,
    )
    assert telemetry.spans.get_finished_spans() == ()  # the span ends with the stream
    for _ in result.response:
        pass

    span = only_span(telemetry)
    assert span.attributes["gen_ai.usage.input_tokens"] == 1200
    assert span.attributes["gen_ai.usage.output_tokens"] == 300
    assert span.attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert span.attributes["ai_metering.stream"] is True
    assert span.name == "chat gpt-4o-mini"  # no model= given: named after the model that answered
    tokens = by_type(telemetry.points()["gen_ai.client.token.usage"])
    assert (tokens["input"].sum, tokens["output"].sum) == (1200, 300)


def test_openai_responses_stream_and_embeddings(telemetry, meter, fake_llm, openai_client):
    fake_llm.next_usage(prompt_tokens=40, completion_tokens=9)
    result = meter.call(
        lambda: openai_client.responses.create(model="gpt-5-mini", input="Hi", stream=True), billable=TEAM
    )
    for _ in result.response:
        pass
    span = only_span(telemetry)
    assert (span.attributes["gen_ai.usage.input_tokens"], span.attributes["gen_ai.usage.output_tokens"]) == (40, 9)
    assert span.attributes["gen_ai.response.finish_reasons"] == ("completed",)

    telemetry.reset()
    fake_llm.next_usage(prompt_tokens=8)
    meter.call(lambda: openai_client.embeddings.create(model="text-embedding-3-small", input=["a"]), billable=TEAM)
    span = only_span(telemetry)
    assert span.name == "embeddings text-embedding-3-small"
    assert span.attributes["gen_ai.operation.name"] == "embeddings"
    assert (span.attributes["gen_ai.usage.input_tokens"], span.attributes["gen_ai.usage.output_tokens"]) == (8, 0)


def test_anthropic_message_and_stream(telemetry, meter, fake_llm, anthropic_client):
    usage = {"input_tokens": 50, "cache_creation_input_tokens": 2000, "cache_read_input_tokens": 30000}
    fake_llm.next_anthropic_usage(output_tokens=120, **usage)
    meter.call(
        lambda: anthropic_client.messages.create(model=CLAUDE, max_tokens=1024, messages=CHAT),
        billable=TEAM,
        provider="anthropic",
        model=CLAUDE,
    )
    span = only_span(telemetry)
    assert span.name == f"chat {CLAUDE}"
    assert span.attributes["gen_ai.provider.name"] == "anthropic"
    assert span.attributes["gen_ai.usage.input_tokens"] == 32050
    assert span.attributes["gen_ai.usage.output_tokens"] == 120
    assert span.attributes["gen_ai.usage.cache_read.input_tokens"] == 30000
    assert span.attributes["gen_ai.usage.cache_creation.input_tokens"] == 2000
    assert span.attributes["gen_ai.response.finish_reasons"] == ("end_turn",)
    tokens = by_type(telemetry.points()["gen_ai.client.token.usage"])
    assert (tokens["input"].sum, tokens["output"].sum) == (32050, 120)

    telemetry.reset()
    fake_llm.next_anthropic_usage(output_tokens=120, **usage)
    result = meter.call(
        lambda: anthropic_client.messages.create(model=CLAUDE, max_tokens=1024, messages=CHAT, stream=True),
        billable=TEAM,
        provider="anthropic",
    )
    for _ in result.response:
        pass
    span = only_span(telemetry)
    assert span.attributes["ai_metering.stream"] is True
    assert (span.attributes["gen_ai.usage.input_tokens"], span.attributes["gen_ai.usage.output_tokens"]) == (32050, 120)
    assert span.attributes["gen_ai.response.finish_reasons"] == ("end_turn",)
    tokens = by_type(telemetry.points()["gen_ai.client.token.usage"])
    assert (tokens["input"].sum, tokens["output"].sum) == (32050, 120)


def test_failed_call_is_an_error_span(telemetry, meter, fake_llm, openai_client):
    openai = pytest.importorskip("openai")
    fake_llm.fail_next(429)
    with pytest.raises(openai.RateLimitError):
        meter.call(
            lambda: openai_client.chat.completions.create(model="gpt-4o-mini", messages=CHAT),
            billable=TEAM,
            model="gpt-4o-mini",
        )
    span = only_span(telemetry)
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == "RateLimitError"
    assert span.attributes["http.response.status_code"] == 429
    assert "gen_ai.usage.input_tokens" not in span.attributes
    points = telemetry.points()
    [duration] = points["gen_ai.client.operation.duration"]
    assert duration.attributes["error.type"] == "RateLimitError"
    assert "gen_ai.client.token.usage" not in points


def test_the_current_client_span_is_enriched(telemetry, meter):
    tracer = trace.get_tracer("app")
    with tracer.start_as_current_span("my llm call", kind=SpanKind.CLIENT):
        meter.call(lambda: None, billable=TEAM, provider="manual", usage={"input_tokens": 3, "output_tokens": 4})
    [span] = telemetry.spans.get_finished_spans()
    assert span.name == "my llm call"
    assert (span.attributes["gen_ai.usage.input_tokens"], span.attributes["gen_ai.usage.output_tokens"]) == (3, 4)
    assert span.attributes["ai_metering.billable"] == "Team:42"


def test_span_is_a_child_of_the_current_span(telemetry, meter):
    tracer = trace.get_tracer("app")
    with tracer.start_as_current_span("POST /ai/chat", kind=SpanKind.SERVER) as parent:
        meter.call(lambda: None, billable=TEAM, provider="manual", usage={"input_tokens": 1, "output_tokens": 1})
    ours = only_span(telemetry)
    assert ours.parent is not None and ours.parent.span_id == parent.get_span_context().span_id


def test_refusal_is_counted_without_a_span(telemetry, meter, db):
    from flask_ai_metering import AiLimitExceeded

    plan = add_plan(db, slug="tiny", token_limit=10)
    meter.subscribe(TEAM, plan)
    with pytest.raises(AiLimitExceeded):
        meter.call(lambda: None, billable=TEAM, provider="manual", max_tokens=100, feature="chat")
    assert telemetry.spans.get_finished_spans() == ()
    [refusal] = telemetry.points()["ai_metering.refusals"]
    assert refusal.value == 1
    assert refusal.attributes["ai_metering.refusal.reason"] == "tokens"
    assert refusal.attributes["ai_metering.feature"] == "chat"


def test_nothing_is_exported_without_a_configured_provider(telemetry, meter, monkeypatch):
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: trace.NoOpTracerProvider())
    monkeypatch.setattr(metrics, "get_meter_provider", lambda: metrics.NoOpMeterProvider())
    meter.call(lambda: None, billable=TEAM, provider="manual", usage={"input_tokens": 1, "output_tokens": 1})
    monkeypatch.undo()
    assert telemetry.spans.get_finished_spans() == ()
    assert telemetry.points() == {}


def test_otel_can_be_switched_off(telemetry, make_app):
    app, _, meter = make_app(AI_METERING_OTEL_ENABLED=False)
    with app.app_context():
        meter.call(lambda: None, billable=TEAM, provider="manual", usage={"input_tokens": 1, "output_tokens": 1})
    assert telemetry.spans.get_finished_spans() == ()
