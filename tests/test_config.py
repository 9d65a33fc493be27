"""Configuration: defaults, environment, and errors that name the key."""

from __future__ import annotations

import pytest
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_ai_metering import AiMetering
from flask_ai_metering import ConfigurationError


def build(**config):
    app = Flask("cfg")
    app.config.update(SQLALCHEMY_DATABASE_URI="sqlite://", **config)
    db = SQLAlchemy()
    db.init_app(app)
    return app, AiMetering(app, db=db)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("AI_METERING_OVERAGE_BEHAVIOR", "explode"),
        ("AI_METERING_PERIOD_TYPE", "fortnightly"),
        ("AI_METERING_PERIOD_ALIGNMENT", "lunar"),
        ("AI_METERING_TIMEZONE", "Mars/Olympus"),
        ("AI_METERING_RESERVATION_TTL", 0),
        ("AI_METERING_MAX_META_BYTES", "big"),
        ("AI_METERING_WARNING_THRESHOLD", 150),
        ("AI_METERING_PROVIDERS", {"openai": {"models": {"gpt-4o-mini": {"input_price_per_1k": 0.1}}}}),
        ("AI_METERING_TENANT_RESOLVER", "no.such.module:fn"),
    ],
)
def test_bad_values_name_the_key(key, value):
    with pytest.raises(ConfigurationError, match=key):
        build(**{key: value})


def test_defaults_and_environment(monkeypatch):
    monkeypatch.setenv("AI_METERING_RESERVATION_TTL", "90")
    monkeypatch.setenv("AI_METERING_CREDIT_OVERDRAFT", "true")
    monkeypatch.setenv("AI_METERING_DASHBOARD_ENABLED", "false")
    app, meter = build()
    with app.app_context():
        settings = meter.settings()
    assert settings.reservation_ttl == 90 and settings.credit_overdraft is True
    assert settings.currency == "usd" and settings.dashboard_prefix == "/ai-metering"
    assert app.extensions["ai_metering"] is meter


def test_registering_twice_is_refused():
    app, meter = build()
    with pytest.raises(RuntimeError, match="already registered"):
        meter.init_app(app)


def test_environment_typos_are_refused(monkeypatch):
    monkeypatch.setenv("AI_METERING_BATCH_SIZE", "lots")
    with pytest.raises(ConfigurationError, match="AI_METERING_BATCH_SIZE"):
        build()


def test_the_currency_key_is_deprecated_and_only_says_usd(monkeypatch):
    """Every amount is USD and nothing converts (issue 12): the key can no longer claim otherwise."""
    with pytest.warns(DeprecationWarning, match="AI_METERING_CURRENCY is deprecated"):
        app, meter = build(AI_METERING_CURRENCY="USD")
    with app.app_context():
        assert meter.settings().currency == "usd"
    with pytest.warns(DeprecationWarning), pytest.raises(ConfigurationError, match="'EUR' is not supported"):
        build(AI_METERING_CURRENCY="EUR")
    monkeypatch.setenv("AI_METERING_CURRENCY", "gbp")
    with pytest.warns(DeprecationWarning), pytest.raises(ConfigurationError, match="AI_METERING_CURRENCY"):
        build()
