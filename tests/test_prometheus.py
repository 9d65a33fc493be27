"""Prometheus: counters of calls, tokens, cost, refusals and failures, scraped through the client's own exposition."""

from __future__ import annotations

import typing as t

import pytest

prometheus_client = pytest.importorskip("prometheus_client")

from prometheus_client import CollectorRegistry  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from flask_ai_metering import AiLimitExceeded  # noqa: E402
from flask_ai_metering.errors import ConfigurationError  # noqa: E402
from flask_ai_metering.errors import FeatureNotAllowed  # noqa: E402
from tests.conftest import AppFactory  # noqa: E402
from tests.conftest import add_plan  # noqa: E402

TEAM = ("Team", "42")
CHAT = [{"role": "user", "content": "hi"}]
#: A registry importable by dotted path, for the string form of the setting.
NAMED_REGISTRY = CollectorRegistry()
ALLOWED_LABELS = {"provider", "model", "feature", "type", "currency", "reason", "error_type", "le"}


def scrape(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the exposition text, keyed by name and sorted labels."""
    text = prometheus_client.generate_latest(registry).decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            assert set(sample.labels) <= ALLOWED_LABELS, sample  # never a billable, user or tenant label
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[t.Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def prom_app(make_app: AppFactory, registry: CollectorRegistry) -> t.Any:
    app, db, meter = make_app(AI_METERING_PROMETHEUS_ENABLED=True, AI_METERING_PROMETHEUS_REGISTRY=registry)
    with app.app_context():
        yield app, db, meter


def test_counters_move_with_a_call(prom_app, registry, fake_llm, openai_client):
    _, _, meter = prom_app
    fake_llm.model_map["gpt-4o-mini"] = "gpt-4o-mini-2024-07-18"
    fake_llm.next_usage(prompt_tokens=1200, completion_tokens=300, cached_tokens=1024, reasoning_tokens=128)
    result = meter.call(
        lambda: openai_client.chat.completions.create(model="gpt-4o-mini", messages=CHAT),
        billable=TEAM,
        user=("User", 7),
        feature="chat",
    )
    samples = scrape(registry)
    labels = {"provider": "openai", "model": "gpt-4o-mini-2024-07-18", "feature": "chat"}
    assert value(samples, "ai_metering_calls_total", **labels) == 1
    for kind, count in (("input", 1200), ("output", 300), ("cached_input", 1024), ("reasoning", 128)):
        assert value(samples, "ai_metering_tokens_total", type=kind, **labels) == count
    assert value(samples, "ai_metering_cost_total", currency="usd", **labels) == pytest.approx(
        float(result.usage.total_cost)
    )
    assert value(samples, "ai_metering_overhead_seconds_count", provider="openai") == 1

    fake_llm.next_usage(prompt_tokens=10, completion_tokens=5)
    meter.call(
        lambda: openai_client.chat.completions.create(model="gpt-4o-mini", messages=CHAT),
        billable=TEAM,
        feature="chat",
    )
    samples = scrape(registry)
    assert value(samples, "ai_metering_calls_total", **labels) == 2
    assert value(samples, "ai_metering_tokens_total", type="input", **labels) == 1210


def test_a_refused_call_is_a_refusal_not_a_call(prom_app, registry):
    _, db, meter = prom_app
    meter.subscribe(TEAM, add_plan(db, slug="tiny", token_limit=10, features=["chat"]))
    with pytest.raises(AiLimitExceeded):
        meter.call(lambda: None, billable=TEAM, provider="manual", model="m1", max_tokens=100, feature="chat")
    with pytest.raises(FeatureNotAllowed):
        meter.call(lambda: None, billable=TEAM, provider="manual", max_tokens=1, feature="summary")
    samples = scrape(registry)
    assert (
        value(samples, "ai_metering_refusals_total", provider="manual", model="m1", feature="chat", reason="tokens")
        == 1
    )
    assert (
        value(samples, "ai_metering_refusals_total", provider="manual", model="", feature="summary", reason="feature")
        == 1
    )
    assert not [k for k in samples if k[0] == "ai_metering_calls_total"]


def test_a_failed_call_is_counted_as_a_failure(prom_app, registry, fake_llm, openai_client):
    openai = pytest.importorskip("openai")
    _, _, meter = prom_app
    fake_llm.fail_next(500)
    with pytest.raises(openai.InternalServerError):
        meter.call(
            lambda: openai_client.chat.completions.create(model="gpt-4o-mini", messages=CHAT),
            billable=TEAM,
            model="gpt-4o-mini",
        )
    samples = scrape(registry)
    labels = {"provider": "openai", "model": "gpt-4o-mini", "feature": ""}
    assert value(samples, "ai_metering_calls_total", **labels) == 1
    assert value(samples, "ai_metering_failures_total", error_type="InternalServerError", **labels) == 1
    assert not [k for k in samples if k[0] == "ai_metering_tokens_total"]


def test_models_past_the_cap_are_other(make_app: AppFactory, registry):
    app, _, meter = make_app(
        AI_METERING_PROMETHEUS_ENABLED=True,
        AI_METERING_PROMETHEUS_REGISTRY=registry,
        AI_METERING_PROMETHEUS_MAX_MODELS=2,
    )
    with app.app_context():
        for model in ("m1", "m2", "m3", "m4", "m1"):
            meter.call(lambda: None, billable=TEAM, provider="manual", model=model, usage={"input_tokens": 1})
    samples = scrape(registry)
    calls = {dict(k[1])["model"]: v for k, v in samples.items() if k[0] == "ai_metering_calls_total"}
    assert calls == {"m1": 2, "m2": 1, "other": 2}


def test_off_by_default_and_registry_by_dotted_path(make_app: AppFactory, registry):
    app, _, meter = make_app(AI_METERING_PROMETHEUS_REGISTRY=registry)
    with app.app_context():
        meter.call(lambda: None, billable=TEAM, provider="manual", usage={"input_tokens": 1})
    assert scrape(registry) == {}

    app, _, meter = make_app(
        AI_METERING_PROMETHEUS_ENABLED=True, AI_METERING_PROMETHEUS_REGISTRY="tests.test_prometheus:NAMED_REGISTRY"
    )
    with app.app_context():
        meter.call(lambda: None, billable=TEAM, provider="manual", usage={"input_tokens": 1})
    assert (
        value(scrape(NAMED_REGISTRY), "ai_metering_tokens_total", provider="manual", model="", feature="", type="input")
        >= 1
    )


def test_apps_share_the_default_registry(make_app: AppFactory):
    for _ in range(2):  # a second registration on the same registry must not collide
        app, _, meter = make_app(AI_METERING_PROMETHEUS_ENABLED=True)
        with app.app_context():
            meter.call(lambda: None, billable=TEAM, provider="manual", usage={"input_tokens": 1})
    assert (
        prometheus_client.REGISTRY.get_sample_value(
            "ai_metering_calls_total", {"provider": "manual", "model": "", "feature": ""}
        )
        >= 2
    )


def test_a_bad_registry_is_a_configuration_error(make_app: AppFactory):
    with pytest.raises(ConfigurationError, match="AI_METERING_PROMETHEUS_REGISTRY"):
        make_app(AI_METERING_PROMETHEUS_ENABLED=True, AI_METERING_PROMETHEUS_REGISTRY=object())
