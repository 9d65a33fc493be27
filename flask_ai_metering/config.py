"""Configuration keys, their defaults, and the validated ``Settings`` read from them.

This is the only module where ``AI_METERING_*`` strings appear. Each key is read
from ``app.config`` or, when the app does not set it, from the environment variable
of the same name (the reference README's variables), with the same defaults.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import typing as t
import warnings
from decimal import Decimal

from .errors import ConfigurationError
from .errors import InvalidUsage
from .money import parse_money
from .quota.periods import validate_period_settings

if t.TYPE_CHECKING:
    from flask import Flask


class ConfigVars:
    """The config key names, as constants so that none is typed twice."""

    #: Kill switch: when False, ``meter.call`` runs the callable and records nothing.
    ENABLED = "AI_METERING_ENABLED"
    #: Provider used when a call names none.
    DEFAULT_PROVIDER = "AI_METERING_DEFAULT_PROVIDER"
    #: Price overrides and custom provider classes, in the reference README's shape.
    PROVIDERS = "AI_METERING_PROVIDERS"
    #: ``"null"``, ``"stripe"`` or a dotted path to a billing driver class.
    BILLING_DRIVER = "AI_METERING_BILLING_DRIVER"
    #: What happens past a plan's limit: ``block``, ``allow`` or ``charge``.
    OVERAGE_BEHAVIOR = "AI_METERING_OVERAGE_BEHAVIOR"
    #: ``immediate`` or ``batch`` (``flask ai-metering sync-stripe-overages``).
    OVERAGE_SYNC_STRATEGY = "AI_METERING_OVERAGE_SYNC_STRATEGY"
    #: Allow a credit wallet to go below zero.
    CREDIT_OVERDRAFT = "AI_METERING_CREDIT_OVERDRAFT"
    #: Deprecated: every amount is USD (the price database's currency) and nothing converts, so
    #: only ``usd`` is accepted (with a ``DeprecationWarning``); any other value is refused.
    CURRENCY = "AI_METERING_CURRENCY"
    #: Days a subscription stays active after a failed payment.
    PAYMENT_FAILURE_GRACE_PERIOD = "AI_METERING_PAYMENT_FAILURE_GRACE_PERIOD"
    #: A callable (or dotted path) returning the current tenant.
    TENANT_RESOLVER = "AI_METERING_TENANT_RESOLVER"
    #: ``monthly``, ``weekly``, ``daily``, ``yearly`` or ``rolling``.
    PERIOD_TYPE = "AI_METERING_PERIOD_TYPE"
    #: ``calendar`` or ``rolling`` (anchored on the subscription start).
    PERIOD_ALIGNMENT = "AI_METERING_PERIOD_ALIGNMENT"
    #: IANA timezone in which calendar periods start.
    TIMEZONE = "AI_METERING_TIMEZONE"
    #: Days of usage ``cleanup`` keeps.
    PRUNE_AFTER_DAYS = "AI_METERING_PRUNE_AFTER_DAYS"
    #: Flask-SQLAlchemy bind key of the database metering uses (None: the default).
    DB_CONNECTION = "AI_METERING_DB_CONNECTION"
    #: Record usage rows through a Celery task instead of in the request.
    QUEUE_RECORDING = "AI_METERING_QUEUE_RECORDING"
    #: On PostgreSQL, make a hold's commit wait for the WAL flush like every other write (see the
    #: README's "Performance": by default a hold lost in a database crash only frees quota early).
    DURABLE_HOLDS = "AI_METERING_DURABLE_HOLDS"
    #: Rows per transaction in batch CLI work (cleanup, forget, anonymize) and when writing queued rows.
    BATCH_SIZE = "AI_METERING_BATCH_SIZE"
    #: Register the dashboard blueprint.
    DASHBOARD_ENABLED = "AI_METERING_DASHBOARD_ENABLED"
    #: URL prefix of the dashboard.
    DASHBOARD_PREFIX = "AI_METERING_DASHBOARD_PREFIX"
    #: Template every dashboard page extends.
    BASE_TEMPLATE = "AI_METERING_BASE_TEMPLATE"
    #: Refuse feature names outside ``[A-Za-z0-9_.-]{1,100}``.
    VALIDATE_FEATURES = "AI_METERING_VALIDATE_FEATURES"
    #: Drop metadata keys that look like secrets or prompts.
    SANITIZE_METADATA = "AI_METERING_SANITIZE_METADATA"
    #: Largest metadata, in bytes of JSON.
    MAX_META_BYTES = "AI_METERING_MAX_META_BYTES"
    #: Log metering activity.
    LOGGING_ENABLED = "AI_METERING_LOGGING_ENABLED"
    #: Level of the ``flask_ai_metering`` logger.
    LOG_LEVEL = "AI_METERING_LOG_LEVEL"
    #: Log provider call failures.
    LOG_FAILURES = "AI_METERING_LOG_FAILURES"
    #: Serve the dashboard and reports from the daily rollup tables.
    AGGREGATION_TABLES = "AI_METERING_AGGREGATION_TABLES"
    #: Seconds before an uncommitted reservation expires.
    RESERVATION_TTL = "AI_METERING_RESERVATION_TTL"
    #: Tokens reserved for a call that gives neither ``max_tokens`` nor ``usage``.
    DEFAULT_MAX_TOKENS = "AI_METERING_DEFAULT_MAX_TOKENS"
    #: Default cost cap of each call whose model is known before it runs (None: no cap).
    MAX_COST_PER_CALL = "AI_METERING_MAX_COST_PER_CALL"
    #: What a plan change mid-period does to the allowance: ``carry``, ``prorate`` or ``reset``.
    PLAN_CHANGE = "AI_METERING_PLAN_CHANGE"
    #: Slug of the plan whose limits hold billables without a subscription (None: unlimited).
    DEFAULT_PLAN = "AI_METERING_DEFAULT_PLAN"
    #: Extra spellings of billable types: ``{"org": "Team"}`` stores ``("org", 1)`` as ``("Team", "1")``.
    BILLABLE_ALIASES = "AI_METERING_BILLABLE_ALIASES"
    #: Available credit balance under which ``credits_low`` fires, once per crossing (None: never).
    CREDITS_LOW_THRESHOLD = "AI_METERING_CREDITS_LOW_THRESHOLD"
    #: Days before a trial's end at which ``trial_ending`` fires (0: only ``trial_ended``).
    TRIAL_ENDING_DAYS = "AI_METERING_TRIAL_ENDING_DAYS"
    #: Percentage of a limit at which ``limit_approaching`` fires.
    WARNING_THRESHOLD = "AI_METERING_WARNING_THRESHOLD"
    #: The most tokens of one kind a provider may report for one call; a larger count is
    #: clamped to it and the row flagged ``estimated`` (the reported figure kept in meta).
    MAX_REPORTED_TOKENS = "AI_METERING_MAX_REPORTED_TOKENS"
    #: Append-only file keeping spent usage the database could not take (default:
    #: ``ai_metering_journal.jsonl`` in the app's instance folder); ``expire-reservations``
    #: commits what it holds.
    JOURNAL_PATH = "AI_METERING_JOURNAL_PATH"
    #: Secret key of the Stripe billing driver.
    STRIPE_API_KEY = "AI_METERING_STRIPE_API_KEY"
    #: Base URL of the Stripe API (set only to point at a local Stripe server).
    STRIPE_API_BASE = "AI_METERING_STRIPE_API_BASE"
    #: Stripe webhook signing secret.
    STRIPE_WEBHOOK_SECRET = "AI_METERING_STRIPE_WEBHOOK_SECRET"
    #: Serve ``POST <dashboard prefix>/stripe/webhook`` (CSRF-exempt, no dashboard login).
    STRIPE_WEBHOOK_ROUTE = "AI_METERING_STRIPE_WEBHOOK_ROUTE"
    #: Let a webhook find a subscription by its Stripe customer when no subscription
    #: has the event's subscription id (it then remembers that id); off by default.
    STRIPE_WEBHOOK_MATCH_CUSTOMER = "AI_METERING_STRIPE_WEBHOOK_MATCH_CUSTOMER"
    #: Emit OpenTelemetry GenAI spans and metrics (only when the app configured an SDK provider).
    OTEL_ENABLED = "AI_METERING_OTEL_ENABLED"
    #: Export Prometheus counters and the overhead histogram (needs the ``prometheus`` extra).
    PROMETHEUS_ENABLED = "AI_METERING_PROMETHEUS_ENABLED"
    #: The ``prometheus_client`` registry (or its dotted path); None: the client's default registry.
    PROMETHEUS_REGISTRY = "AI_METERING_PROMETHEUS_REGISTRY"
    #: Distinct model labels kept in Prometheus; later models are counted as ``other``.
    PROMETHEUS_MAX_MODELS = "AI_METERING_PROMETHEUS_MAX_MODELS"
    #: Percentages of a plan's or budget's limit at which ``threshold_crossed`` fires, each once
    #: per period per counter (a budget may set its own).
    ALERT_THRESHOLDS = "AI_METERING_ALERT_THRESHOLDS"
    #: URL that receives each alert as a signed JSON POST (None: alerts are only signals).
    ALERT_WEBHOOK_URL = "AI_METERING_ALERT_WEBHOOK_URL"
    #: Secret of the alerts' HMAC-SHA256 signature (required with a webhook URL).
    ALERT_WEBHOOK_SECRET = "AI_METERING_ALERT_WEBHOOK_SECRET"
    #: ``thread``: a background thread of each app process delivers alerts; ``cli``: only
    #: ``flask ai-metering deliver-alerts`` does (from cron or a worker).
    ALERT_DELIVERY = "AI_METERING_ALERT_DELIVERY"
    #: Delivery attempts of one alert before it is left failed (``deliver-alerts --retry-failed``).
    ALERT_MAX_ATTEMPTS = "AI_METERING_ALERT_MAX_ATTEMPTS"
    #: Seconds the webhook receiver has to answer one delivery.
    ALERT_WEBHOOK_TIMEOUT = "AI_METERING_ALERT_WEBHOOK_TIMEOUT"


#: Every key with its default, applied by ``init_app``.
DEFAULTS: dict[str, t.Any] = {
    ConfigVars.ENABLED: True,
    ConfigVars.DEFAULT_PROVIDER: "openai",
    ConfigVars.PROVIDERS: {},
    ConfigVars.BILLING_DRIVER: "null",
    ConfigVars.OVERAGE_BEHAVIOR: "block",
    ConfigVars.OVERAGE_SYNC_STRATEGY: "batch",
    ConfigVars.CREDIT_OVERDRAFT: False,
    ConfigVars.CURRENCY: "usd",
    ConfigVars.PAYMENT_FAILURE_GRACE_PERIOD: 7,
    ConfigVars.TENANT_RESOLVER: None,
    ConfigVars.PERIOD_TYPE: "monthly",
    ConfigVars.PERIOD_ALIGNMENT: "calendar",
    ConfigVars.TIMEZONE: "UTC",
    ConfigVars.PRUNE_AFTER_DAYS: 365,
    ConfigVars.DB_CONNECTION: None,
    ConfigVars.QUEUE_RECORDING: False,
    ConfigVars.DURABLE_HOLDS: False,
    ConfigVars.BATCH_SIZE: 100,
    ConfigVars.DASHBOARD_ENABLED: True,
    ConfigVars.DASHBOARD_PREFIX: "/ai-metering",
    ConfigVars.BASE_TEMPLATE: "ai_metering/base.html",
    ConfigVars.VALIDATE_FEATURES: True,
    ConfigVars.SANITIZE_METADATA: True,
    ConfigVars.MAX_META_BYTES: 8192,
    ConfigVars.LOGGING_ENABLED: True,
    ConfigVars.LOG_LEVEL: "info",
    ConfigVars.LOG_FAILURES: True,
    ConfigVars.AGGREGATION_TABLES: False,
    ConfigVars.RESERVATION_TTL: 60,
    ConfigVars.DEFAULT_MAX_TOKENS: 4096,
    ConfigVars.MAX_COST_PER_CALL: None,
    ConfigVars.PLAN_CHANGE: "carry",
    ConfigVars.DEFAULT_PLAN: None,
    ConfigVars.TRIAL_ENDING_DAYS: 3,
    ConfigVars.CREDITS_LOW_THRESHOLD: None,
    ConfigVars.BILLABLE_ALIASES: {},
    ConfigVars.WARNING_THRESHOLD: 80,
    ConfigVars.MAX_REPORTED_TOKENS: 100_000_000,
    ConfigVars.JOURNAL_PATH: None,
    ConfigVars.STRIPE_API_KEY: None,
    ConfigVars.STRIPE_API_BASE: None,
    ConfigVars.STRIPE_WEBHOOK_SECRET: None,
    ConfigVars.STRIPE_WEBHOOK_ROUTE: False,
    ConfigVars.STRIPE_WEBHOOK_MATCH_CUSTOMER: False,
    ConfigVars.OTEL_ENABLED: True,
    ConfigVars.PROMETHEUS_ENABLED: False,
    ConfigVars.PROMETHEUS_REGISTRY: None,
    ConfigVars.PROMETHEUS_MAX_MODELS: 50,
    ConfigVars.ALERT_THRESHOLDS: [80, 100],
    ConfigVars.ALERT_WEBHOOK_URL: None,
    ConfigVars.ALERT_WEBHOOK_SECRET: None,
    ConfigVars.ALERT_DELIVERY: "thread",
    ConfigVars.ALERT_MAX_ATTEMPTS: 12,
    ConfigVars.ALERT_WEBHOOK_TIMEOUT: 5,
}

_CHOICES = {
    ConfigVars.OVERAGE_BEHAVIOR: ("block", "allow", "charge"),
    ConfigVars.OVERAGE_SYNC_STRATEGY: ("immediate", "batch"),
    ConfigVars.PLAN_CHANGE: ("carry", "prorate", "reset"),
    ConfigVars.LOG_LEVEL: ("debug", "info", "warning", "error", "critical"),
    ConfigVars.ALERT_DELIVERY: ("thread", "cli"),
}
_POSITIVE_INTS = (
    ConfigVars.PRUNE_AFTER_DAYS,
    ConfigVars.BATCH_SIZE,
    ConfigVars.MAX_META_BYTES,
    ConfigVars.RESERVATION_TTL,
    ConfigVars.DEFAULT_MAX_TOKENS,
    ConfigVars.MAX_REPORTED_TOKENS,
    ConfigVars.PROMETHEUS_MAX_MODELS,
    ConfigVars.ALERT_MAX_ATTEMPTS,
    ConfigVars.ALERT_WEBHOOK_TIMEOUT,
)
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _from_env(key: str, default: t.Any) -> t.Any:
    """Parse an environment string into the type of ``default``."""
    raw = os.environ[key]
    if isinstance(default, bool):
        if raw.strip().lower() in _TRUE:
            return True
        if raw.strip().lower() in _FALSE:
            return False
        raise ConfigurationError(f"{key} must be true or false, got {raw!r}")
    if isinstance(default, int):
        try:
            return int(raw)
        except ValueError:
            raise ConfigurationError(f"{key} must be a whole number, got {raw!r}") from None
    if isinstance(default, (dict, list)):
        try:
            return json.loads(raw, parse_float=Decimal)
        except ValueError as exc:
            raise ConfigurationError(f"{key} must be JSON: {exc}") from None
    return raw or None if default is None else raw


def apply_defaults(app: Flask) -> None:
    """Fill every unset key from the environment, else from :data:`DEFAULTS`."""
    if ConfigVars.CURRENCY in app.config or ConfigVars.CURRENCY in os.environ:
        warnings.warn(
            f"{ConfigVars.CURRENCY} is deprecated: every amount is in USD, the price database's currency,"
            " and nothing converts; remove the setting",
            DeprecationWarning,
            stacklevel=3,
        )
    for key, default in DEFAULTS.items():
        if key in app.config:
            continue
        app.config[key] = _from_env(key, default) if key in os.environ else default


def import_string(path: t.Any, key: str) -> t.Any:
    """Import ``"package.module:attr"`` (or ``package.module.attr``), naming ``key`` on failure."""
    if not isinstance(path, str):
        return path
    module_name, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigurationError(f"{key}: cannot import {path!r} ({exc})") from None


@dataclasses.dataclass(frozen=True)
class Settings:
    """The validated configuration of one app, read once by ``init_app``."""

    enabled: bool
    default_provider: str
    providers: t.Mapping[str, t.Any]
    billing_driver: t.Any
    overage_behavior: str
    overage_sync_strategy: str
    credit_overdraft: bool
    currency: str
    payment_failure_grace_days: int
    tenant_resolver: t.Callable[[], t.Any] | None
    period_type: str
    period_alignment: str
    timezone: str
    prune_after_days: int
    bind_key: str | None
    queue_recording: bool
    batch_size: int
    dashboard_enabled: bool
    dashboard_prefix: str
    base_template: str
    validate_features: bool
    sanitize_metadata: bool
    max_meta_bytes: int
    log_failures: bool
    aggregation_tables: bool
    reservation_ttl: int
    default_max_tokens: int
    max_cost_per_call: Decimal | None
    plan_change: str
    default_plan: str | None
    trial_ending_days: int
    credits_low_threshold: Decimal | None
    billable_aliases: t.Mapping[str, str]
    warning_threshold: int
    max_reported_tokens: int
    journal_path: str | None
    #: Secrets stay out of ``repr()``/``str()`` (tracebacks with locals, Sentry, the debugger).
    stripe_api_key: str | None = dataclasses.field(repr=False)
    stripe_api_base: str | None
    stripe_webhook_secret: str | None = dataclasses.field(repr=False)
    stripe_webhook_route: bool = False
    stripe_webhook_match_customer: bool = False
    otel_enabled: bool = True
    prometheus_enabled: bool = False
    #: A ``CollectorRegistry``, its dotted path, or None for the client's default registry.
    prometheus_registry: t.Any = None
    prometheus_max_models: int = 50
    #: Ascending percentages (1-100) at which ``threshold_crossed`` fires.
    alert_thresholds: tuple[int, ...] = (80, 100)
    alert_webhook_url: str | None = None
    alert_webhook_secret: str | None = dataclasses.field(default=None, repr=False)
    alert_delivery: str = "thread"
    alert_max_attempts: int = 12
    alert_webhook_timeout: int = 5
    durable_holds: bool = False

    def missing_default_plan(self) -> ConfigurationError:
        """The error of a default plan that does not exist (found at first use), naming the key."""
        return ConfigurationError(
            f"{ConfigVars.DEFAULT_PLAN} names plan {self.default_plan!r}, which does not exist;"
            " create it or fix the setting"
        )

    @classmethod
    def from_config(cls, config: t.Mapping[str, t.Any]) -> Settings:
        """Validate ``config`` and raise :class:`ConfigurationError` naming the bad key."""
        non_negative = (
            ConfigVars.PAYMENT_FAILURE_GRACE_PERIOD,
            ConfigVars.WARNING_THRESHOLD,
            ConfigVars.TRIAL_ENDING_DAYS,
        )
        for key in _POSITIVE_INTS + non_negative:
            value = config[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigurationError(f"{key} must be a non-negative int, got {value!r}")
        for key in _POSITIVE_INTS:
            if config[key] == 0:
                raise ConfigurationError(f"{key} must be positive, got 0")
        if not 0 < config[ConfigVars.WARNING_THRESHOLD] <= 100:
            raise ConfigurationError(
                f"{ConfigVars.WARNING_THRESHOLD} must be a percentage from 1 to 100,"
                f" got {config[ConfigVars.WARNING_THRESHOLD]!r}"
            )
        for key, choices in _CHOICES.items():
            value = str(config[key]).lower()
            if value not in choices:
                raise ConfigurationError(f"{key} must be one of {', '.join(choices)}; got {config[key]!r}")
        providers = config[ConfigVars.PROVIDERS] or {}
        if not isinstance(providers, t.Mapping):
            raise ConfigurationError(f"{ConfigVars.PROVIDERS} must be a dict, got {type(providers).__name__}")
        period_type = str(config[ConfigVars.PERIOD_TYPE]).lower()
        alignment = str(config[ConfigVars.PERIOD_ALIGNMENT]).lower()
        validate_period_settings(
            period_type,
            alignment,
            config[ConfigVars.TIMEZONE],
            (ConfigVars.PERIOD_TYPE, ConfigVars.PERIOD_ALIGNMENT, ConfigVars.TIMEZONE),
        )
        resolver = config[ConfigVars.TENANT_RESOLVER]
        if resolver is not None:
            resolver = import_string(resolver, ConfigVars.TENANT_RESOLVER)
            if not callable(resolver):
                raise ConfigurationError(f"{ConfigVars.TENANT_RESOLVER} must be callable")
        prefix = str(config[ConfigVars.DASHBOARD_PREFIX] or "/ai-metering")
        if config[ConfigVars.STRIPE_WEBHOOK_ROUTE] and not config[ConfigVars.STRIPE_WEBHOOK_SECRET]:
            raise ConfigurationError(
                f"{ConfigVars.STRIPE_WEBHOOK_ROUTE} needs {ConfigVars.STRIPE_WEBHOOK_SECRET} to verify the events"
            )
        if config[ConfigVars.ALERT_WEBHOOK_URL] and not config[ConfigVars.ALERT_WEBHOOK_SECRET]:
            raise ConfigurationError(
                f"{ConfigVars.ALERT_WEBHOOK_URL} needs {ConfigVars.ALERT_WEBHOOK_SECRET} to sign the alerts"
            )
        webhook_url = config[ConfigVars.ALERT_WEBHOOK_URL]
        # urllib also opens file:// and ftp:// URLs: only a web receiver may get alerts.
        if webhook_url and (
            not isinstance(webhook_url, str) or not webhook_url.lower().startswith(("http://", "https://"))
        ):
            raise ConfigurationError(
                f"{ConfigVars.ALERT_WEBHOOK_URL} must be an http:// or https:// URL, got {webhook_url!r}"
            )
        return cls(
            enabled=bool(config[ConfigVars.ENABLED]),
            default_provider=str(config[ConfigVars.DEFAULT_PROVIDER]),
            providers=providers,
            billing_driver=config[ConfigVars.BILLING_DRIVER],
            overage_behavior=str(config[ConfigVars.OVERAGE_BEHAVIOR]).lower(),
            overage_sync_strategy=str(config[ConfigVars.OVERAGE_SYNC_STRATEGY]).lower(),
            credit_overdraft=bool(config[ConfigVars.CREDIT_OVERDRAFT]),
            currency=_usd(config[ConfigVars.CURRENCY]),
            payment_failure_grace_days=config[ConfigVars.PAYMENT_FAILURE_GRACE_PERIOD],
            tenant_resolver=resolver,
            period_type=period_type,
            period_alignment=alignment,
            timezone=config[ConfigVars.TIMEZONE],
            prune_after_days=config[ConfigVars.PRUNE_AFTER_DAYS],
            bind_key=config[ConfigVars.DB_CONNECTION] or None,
            queue_recording=bool(config[ConfigVars.QUEUE_RECORDING]),
            durable_holds=bool(config[ConfigVars.DURABLE_HOLDS]),
            batch_size=config[ConfigVars.BATCH_SIZE],
            dashboard_enabled=bool(config[ConfigVars.DASHBOARD_ENABLED]),
            dashboard_prefix="/" + prefix.strip("/"),
            base_template=str(config[ConfigVars.BASE_TEMPLATE]),
            validate_features=bool(config[ConfigVars.VALIDATE_FEATURES]),
            sanitize_metadata=bool(config[ConfigVars.SANITIZE_METADATA]),
            max_meta_bytes=config[ConfigVars.MAX_META_BYTES],
            log_failures=bool(config[ConfigVars.LOG_FAILURES]),
            aggregation_tables=bool(config[ConfigVars.AGGREGATION_TABLES]),
            reservation_ttl=config[ConfigVars.RESERVATION_TTL],
            default_max_tokens=config[ConfigVars.DEFAULT_MAX_TOKENS],
            max_cost_per_call=_positive_money(config[ConfigVars.MAX_COST_PER_CALL], ConfigVars.MAX_COST_PER_CALL),
            plan_change=str(config[ConfigVars.PLAN_CHANGE]).lower(),
            default_plan=_slug(config[ConfigVars.DEFAULT_PLAN], ConfigVars.DEFAULT_PLAN),
            trial_ending_days=config[ConfigVars.TRIAL_ENDING_DAYS],
            credits_low_threshold=_positive_money(
                config[ConfigVars.CREDITS_LOW_THRESHOLD], ConfigVars.CREDITS_LOW_THRESHOLD
            ),
            billable_aliases=_aliases(config[ConfigVars.BILLABLE_ALIASES]),
            warning_threshold=config[ConfigVars.WARNING_THRESHOLD],
            max_reported_tokens=config[ConfigVars.MAX_REPORTED_TOKENS],
            journal_path=config[ConfigVars.JOURNAL_PATH] or None,
            stripe_api_key=config[ConfigVars.STRIPE_API_KEY],
            stripe_api_base=config[ConfigVars.STRIPE_API_BASE],
            stripe_webhook_secret=config[ConfigVars.STRIPE_WEBHOOK_SECRET],
            stripe_webhook_route=bool(config[ConfigVars.STRIPE_WEBHOOK_ROUTE]),
            stripe_webhook_match_customer=bool(config[ConfigVars.STRIPE_WEBHOOK_MATCH_CUSTOMER]),
            otel_enabled=bool(config[ConfigVars.OTEL_ENABLED]),
            prometheus_enabled=bool(config[ConfigVars.PROMETHEUS_ENABLED]),
            prometheus_registry=config[ConfigVars.PROMETHEUS_REGISTRY],
            prometheus_max_models=config[ConfigVars.PROMETHEUS_MAX_MODELS],
            alert_thresholds=thresholds(config[ConfigVars.ALERT_THRESHOLDS], ConfigVars.ALERT_THRESHOLDS),
            alert_webhook_url=config[ConfigVars.ALERT_WEBHOOK_URL] or None,
            alert_webhook_secret=config[ConfigVars.ALERT_WEBHOOK_SECRET] or None,
            alert_delivery=str(config[ConfigVars.ALERT_DELIVERY]).lower(),
            alert_max_attempts=config[ConfigVars.ALERT_MAX_ATTEMPTS],
            alert_webhook_timeout=config[ConfigVars.ALERT_WEBHOOK_TIMEOUT],
        )


#: The currency of every price and amount: the price database's. Nothing converts.
CURRENCY = "usd"


def _usd(value: t.Any) -> str:
    """``AI_METERING_CURRENCY`` may only say what is true: every amount is USD."""
    if value is None or str(value).strip().lower() in ("", CURRENCY):
        return CURRENCY
    raise ConfigurationError(
        f"{ConfigVars.CURRENCY} = {value!r} is not supported: every price and amount is in USD (the price"
        " database's currency) and nothing converts, so a label in another currency would mislabel USD;"
        " remove the setting and convert in your own invoicing if you bill in another currency"
    )


def thresholds(value: t.Any, field: str) -> tuple[int, ...]:
    """Alert thresholds: whole percentages from 1 to 100, sorted, each once (empty: no alerts).

    Raises :class:`ConfigurationError` for a config key and :class:`InvalidUsage` for an
    argument (``field`` without the ``AI_METERING_`` prefix), naming it either way.
    """
    error = ConfigurationError if field.startswith("AI_METERING_") else InvalidUsage
    if isinstance(value, (str, bytes)) or not isinstance(value, t.Iterable):
        raise error(f"{field} must be a list of percentages from 1 to 100, got {value!r}")
    items = list(value)
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int) or not 1 <= item <= 100:
            raise error(f"{field} must hold whole percentages from 1 to 100, got {item!r}")
    return tuple(sorted(set(items)))


def _aliases(value: t.Any) -> dict[str, str]:
    """``{alias: billable type}``; each entry is checked again when the app state is built."""
    if value is None or value == "":
        return {}
    if not isinstance(value, t.Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ConfigurationError(f"{ConfigVars.BILLABLE_ALIASES} must map str to str, got {value!r}")
    return dict(value)


def _slug(value: t.Any, key: str) -> str | None:
    """An optional plan slug; whether the plan exists is checked at first use (it needs the database)."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigurationError(f"{key} must be a plan slug (a str), got {value!r}")
    return value.strip()


def _positive_money(value: t.Any, key: str) -> Decimal | None:
    """An optional positive amount (``Decimal``, ``int`` or decimal string; never a float)."""
    if value is None or value == "":
        return None
    try:
        amount = parse_money(value, key)
    except InvalidUsage as error:
        raise ConfigurationError(str(error)) from None
    if amount <= 0:
        raise ConfigurationError(f"{key} must be positive, got {value!r}")
    return amount


def unknown_keys(config: t.Mapping[str, t.Any]) -> list[str]:
    """``AI_METERING_*`` keys in ``config`` that this library does not know (likely typos)."""
    return sorted(k for k in config if k.startswith("AI_METERING_") and k not in DEFAULTS)
