"""The metering schema: plans, subscriptions, the usage ledger, counters and money.

Models sit on the library's own :class:`Base`, so they import without an app and
their tables never land in the application's own Flask-Migrate history; the
shipped Alembic scripts create them (``flask ai-metering db upgrade``). They work
with the app's ``db.session`` like any model.

Money columns are :class:`~flask_ai_metering.money.MoneyType`: integers of
10^-12 units in the database, ``Decimal`` in Python. Times are UTC and
timezone-aware in Python on every database (:class:`UTCDateTime`).
"""

from __future__ import annotations

import datetime as dt
import typing as t
from decimal import Decimal

import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.orm import Mapped
from sqlalchemy.orm import mapped_column
from sqlalchemy.orm import relationship

from .money import MoneyType

PREFIX = "ai_metering_"

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    # One unique key per table at most, so the table name is enough (and stays
    # under MySQL's 64 and PostgreSQL's 63 character limits).
    "uq": "uq_%(table_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class UTCDateTime(sa.TypeDecorator[dt.datetime]):
    """A naive UTC ``DATETIME`` column that Python sees as an aware UTC datetime.

    Databases disagree on time zones (SQLite and MySQL keep none); storing naive
    UTC everywhere and converting at the edge keeps comparisons and periods exact.
    MySQL/MariaDB get microsecond precision (``DATETIME(6)``).
    """

    impl = sa.DateTime
    cache_ok = True

    def load_dialect_impl(self, dialect: sa.Dialect) -> sa.types.TypeEngine[t.Any]:
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(sa.DateTime())

    def process_bind_param(self, value: t.Any, dialect: sa.Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if not isinstance(value, dt.datetime) or value.tzinfo is None:
            raise TypeError(f"expected a timezone-aware datetime, got {value!r}")
        return value.astimezone(dt.timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: t.Any, dialect: sa.Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if isinstance(value, str):
            value = dt.datetime.fromisoformat(value)
        return t.cast(dt.datetime, value).replace(tzinfo=dt.timezone.utc)


def table(model: type[Base]) -> sa.Table:
    """The Core ``Table`` of a model, typed as one (metering's hot path is Core, not ORM)."""
    return t.cast(sa.Table, model.__table__)


class Base(DeclarativeBase):
    """Declarative base of every metering model, with its own ``MetaData``."""

    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        dt.datetime: UTCDateTime(),
        Decimal: MoneyType(),
        # None is SQL NULL, not the JSON literal null, so "IS NULL" finds it.
        dict[str, t.Any]: sa.JSON(none_as_null=True),
    }


_BILLABLE_TYPE = 100
_ID = 100
_KEY = 255


class Plan(Base):
    """Token and cost limits per period, an overage price, and allowed features."""

    __tablename__ = PREFIX + "plans"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(200))
    slug: Mapped[str] = mapped_column(sa.String(100), unique=True)
    #: Tokens per period; None is unlimited.
    token_limit: Mapped[int | None] = mapped_column(sa.BigInteger)
    #: Cost per period; None is unlimited.
    cost_limit: Mapped[Decimal | None]
    overage_price_per_1k_tokens: Mapped[Decimal | None]
    #: Allowed feature names; None allows every feature.
    features: Mapped[list[str] | None] = mapped_column(sa.JSON(none_as_null=True))
    #: ``daily``/``weekly``/``monthly``/``yearly``/``rolling``; None: AI_METERING_PERIOD_TYPE.
    period: Mapped[str | None] = mapped_column(sa.String(20))
    is_active: Mapped[bool] = mapped_column(default=True, server_default=sa.true())
    trial_days: Mapped[int | None]
    #: Tokens per period during a trial; None: the plan's ``token_limit``.
    trial_token_limit: Mapped[int | None] = mapped_column(sa.BigInteger)
    #: Cost per period during a trial; None: the plan's ``cost_limit``.
    trial_cost_limit: Mapped[Decimal | None]
    meta: Mapped[dict[str, t.Any] | None]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    subscriptions: Mapped[list[Subscription]] = relationship(back_populates="plan", foreign_keys="Subscription.plan_id")

    def has_unlimited_tokens(self) -> bool:
        return self.token_limit is None

    def has_unlimited_cost(self) -> bool:
        return self.cost_limit is None

    def allows_overage(self) -> bool:
        return self.overage_price_per_1k_tokens is not None

    def allows_feature(self, feature: str | None) -> bool:
        return not self.features or feature is None or feature in self.features

    def __repr__(self) -> str:
        return f"<Plan {self.slug!r}>"


class Subscription(Base):
    """A billable's plan: one row per billable, moved to a new plan on a change."""

    __tablename__ = PREFIX + "subscriptions"
    __table_args__ = (
        sa.UniqueConstraint("billable_type", "billable_id"),
        sa.Index(None, "plan_id"),
        sa.Index(None, "stripe_subscription_id"),
        sa.Index(None, "stripe_customer_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    billable_type: Mapped[str] = mapped_column(sa.String(_BILLABLE_TYPE))
    billable_id: Mapped[str] = mapped_column(sa.String(_ID))
    plan_id: Mapped[int] = mapped_column(sa.ForeignKey(Plan.id))
    previous_plan_id: Mapped[int | None] = mapped_column(sa.ForeignKey(Plan.id))
    #: ``plan`` or ``credits``.
    billing_mode: Mapped[str] = mapped_column(sa.String(20), default="plan")
    started_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    renews_at: Mapped[dt.datetime | None]
    ends_at: Mapped[dt.datetime | None]
    trial_ends_at: Mapped[dt.datetime | None]
    grace_period_ends_at: Mapped[dt.datetime | None]
    #: When the current plan took effect; usage before it counted against the previous plan.
    plan_changed_at: Mapped[dt.datetime | None]
    #: Incremented on every plan change.
    plan_version: Mapped[int] = mapped_column(default=0, server_default="0")
    #: The counter segment the subscription counts on (``Counter.plan_version``): a plan change
    #: moves it to a fresh counter only under ``AI_METERING_PLAN_CHANGE = "reset"``.
    counter_segment: Mapped[int] = mapped_column(default=0, server_default="0")
    #: The token limit in force while ``prorated_until`` is in the future (None: unlimited); the
    #: plan's own limit applies after it. Set by a trial (its trial limit, until the trial ends)
    #: and, under ``prorate``, by a plan change (the period's limit after the change).
    prorated_token_limit: Mapped[int | None] = mapped_column(sa.BigInteger)
    #: The same for the cost limit, in pico-units.
    prorated_cost_units: Mapped[int | None] = mapped_column(sa.BigInteger)
    #: Until when the prorated limits are in force: the trial's end, or the end of the period a
    #: proration belongs to (None: neither).
    prorated_until: Mapped[dt.datetime | None]
    #: Set once, by the guarded UPDATE that sends ``trial_ending`` for the current trial.
    trial_ending_sent_at: Mapped[dt.datetime | None]
    #: Set once, by the guarded UPDATE that sends ``trial_ended`` for the current trial.
    trial_ended_sent_at: Mapped[dt.datetime | None]
    stripe_customer_id: Mapped[str | None] = mapped_column(sa.String(_KEY))
    stripe_subscription_id: Mapped[str | None] = mapped_column(sa.String(_KEY))
    #: ``created`` of the last Stripe event applied to this subscription: an older
    #: event delivered later (Stripe retries in any order) is ignored.
    stripe_event_at: Mapped[dt.datetime | None]
    meta: Mapped[dict[str, t.Any] | None]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    plan: Mapped[Plan] = relationship(back_populates="subscriptions", foreign_keys=[plan_id])
    previous_plan: Mapped[Plan | None] = relationship(foreign_keys=[previous_plan_id])

    def is_expired(self, now: dt.datetime | None = None) -> bool:
        """Ended, and past any grace period."""
        now = now or utcnow()
        if self.ends_at is None or self.ends_at > now:
            return False
        return not self.is_in_grace_period(now)

    def is_in_grace_period(self, now: dt.datetime | None = None) -> bool:
        now = now or utcnow()
        return self.grace_period_ends_at is not None and self.grace_period_ends_at > now

    def is_in_trial(self, now: dt.datetime | None = None) -> bool:
        now = now or utcnow()
        return self.trial_ends_at is not None and self.trial_ends_at > now

    def is_active(self, now: dt.datetime | None = None) -> bool:
        """Started, and not expired (a grace period keeps it active, and limits apply)."""
        now = now or utcnow()
        return self.started_at <= now and not self.is_expired(now)

    def __repr__(self) -> str:
        return f"<Subscription {self.billable_type}:{self.billable_id} plan={self.plan_id}>"


class UsageLimitOverride(Base):
    """Replaces a billable's token and/or cost limit while ``period_start <= now < period_end``."""

    __tablename__ = PREFIX + "usage_limit_overrides"
    __table_args__ = (sa.Index("ix_ai_metering_overrides_billable", "billable_type", "billable_id", "period_start"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    billable_type: Mapped[str] = mapped_column(sa.String(_BILLABLE_TYPE))
    billable_id: Mapped[str] = mapped_column(sa.String(_ID))
    period_start: Mapped[dt.datetime]
    period_end: Mapped[dt.datetime]
    #: None keeps the plan's token limit.
    token_limit: Mapped[int | None] = mapped_column(sa.BigInteger)
    #: None keeps the plan's cost limit.
    cost_limit: Mapped[Decimal | None]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Counter(Base):
    """Used and reserved amounts of one billable in one period (and counter segment).

    ``plan_version`` holds the subscription's ``counter_segment``: one counter per
    period unless plan changes reset the allowance (``AI_METERING_PLAN_CHANGE = "reset"``).

    Limit checks read and update this one row by primary key, so they are O(1)
    and atomic; ``reconcile`` checks it against the ledger. The ``*_units`` costs
    are raw pico-units, because SQL arithmetic must not pass through ``MoneyType``.
    """

    __tablename__ = PREFIX + "counters"
    __table_args__ = (
        sa.UniqueConstraint("billable_type", "billable_id", "period_start", "plan_version"),
        sa.Index(None, "period_start"),
        sa.CheckConstraint("used_tokens >= 0", name="used_tokens_nonneg"),
        sa.CheckConstraint("reserved_tokens >= 0", name="reserved_tokens_nonneg"),
        sa.CheckConstraint("reserved_cost_units >= 0", name="reserved_cost_nonneg"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    billable_type: Mapped[str] = mapped_column(sa.String(_BILLABLE_TYPE))
    billable_id: Mapped[str] = mapped_column(sa.String(_ID))
    period_start: Mapped[dt.datetime]
    period_end: Mapped[dt.datetime]
    plan_version: Mapped[int] = mapped_column(default=0, server_default="0")
    used_tokens: Mapped[int] = mapped_column(sa.BigInteger, default=0, server_default="0")
    reserved_tokens: Mapped[int] = mapped_column(sa.BigInteger, default=0, server_default="0")
    used_cost_units: Mapped[int] = mapped_column(sa.BigInteger, default=0, server_default="0")
    reserved_cost_units: Mapped[int] = mapped_column(sa.BigInteger, default=0, server_default="0")
    calls: Mapped[int] = mapped_column(sa.BigInteger, default=0, server_default="0")
    #: Set once when ``limit_approaching`` has fired for this period.
    approaching_notified: Mapped[bool] = mapped_column(default=False, server_default=sa.false())
    #: The highest ``AI_METERING_ALERT_THRESHOLDS`` percentage already announced this period:
    #: raised by a guarded UPDATE, so each threshold fires once however many calls cross it.
    alert_level: Mapped[int] = mapped_column(default=0, server_default="0")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Reservation(Base):
    """Quota held for a call in flight; it is also the call's idempotency claim.

    ``status`` moves once from ``pending`` to ``committed``, ``released`` or
    ``expired`` (a guarded UPDATE decides who wins a late commit against the
    sweeper). A released or expired claim drops its key so the retry can run.
    """

    __tablename__ = PREFIX + "reservations"
    __table_args__ = (
        sa.UniqueConstraint("billable_type", "billable_id", "idempotency_scope", "idempotency_key"),
        sa.Index(None, "status", "expires_at"),
        sa.Index(None, "counter_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    counter_id: Mapped[int] = mapped_column(sa.ForeignKey(Counter.id))
    billable_type: Mapped[str] = mapped_column(sa.String(_BILLABLE_TYPE))
    billable_id: Mapped[str] = mapped_column(sa.String(_ID))
    idempotency_key: Mapped[str | None] = mapped_column(sa.String(_KEY))
    #: The tenant the key was claimed under ('' for none): one tenant can never replay another's key.
    idempotency_scope: Mapped[str] = mapped_column(sa.String(_ID), default="", server_default="")
    status: Mapped[str] = mapped_column(sa.String(16), default="pending")
    tokens: Mapped[int] = mapped_column(sa.BigInteger)
    cost_units: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    #: Credits held on the wallet for a ``credits`` call (pico-units).
    credit_units: Mapped[int] = mapped_column(sa.BigInteger, default=0, server_default="0")
    wallet_id: Mapped[int | None] = mapped_column(sa.ForeignKey(PREFIX + "credit_wallets.id"))
    expires_at: Mapped[dt.datetime]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    settled_at: Mapped[dt.datetime | None]
    #: With queued recording: the committed usage row still to be written (an outbox),
    #: so a lost task or a restarted worker loses nothing.
    payload: Mapped[dict[str, t.Any] | None]
    #: Ids of the :class:`BudgetCounter` rows the call also holds on (None: no budget matched),
    #: so a commit, release or expiry settles every counter the reserve held on.
    budget_counter_ids: Mapped[list[int] | None] = mapped_column(sa.JSON(none_as_null=True))


def budget_scope_items(user_id: str | None, feature: str | None, model: str | None) -> list[tuple[str, str]]:
    """A budget's set scope fields among user, feature and model, in that order."""
    fields = (("user", user_id), ("feature", feature), ("model", model))
    return [(name, value) for name, value in fields if value is not None]


def budget_scope(billable: tuple[str, str], user_id: str | None, feature: str | None, model: str | None) -> str:
    """Who a budget limits, in words: ``Team:1``, ``Team:1 user 7 feature images``."""
    items = budget_scope_items(user_id, feature, model)
    return " ".join([f"{billable[0]}:{billable[1]}", *(f"{name} {value}" for name, value in items)])


class Budget(Base):
    """An extra limit inside a billable's plan: for one user, feature or model, or all its calls.

    A call is held on every budget that matches it (same billable; each of ``user_id``,
    ``feature`` and ``model`` either unset or equal to the call's) together with the plan's
    counter, all or none. Budgets count from their creation; ``removed_at`` retires one and
    keeps its counters for the record.
    """

    __tablename__ = PREFIX + "budgets"
    __table_args__ = (sa.Index(None, "billable_type", "billable_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    billable_type: Mapped[str] = mapped_column(sa.String(_BILLABLE_TYPE))
    billable_id: Mapped[str] = mapped_column(sa.String(_ID))
    user_id: Mapped[str | None] = mapped_column(sa.String(_ID))
    feature: Mapped[str | None] = mapped_column(sa.String(100))
    model: Mapped[str | None] = mapped_column(sa.String(150))
    #: ``minute``, ``hour``, ``day``, ``week``, ``month`` or ``year`` (calendar periods).
    period: Mapped[str] = mapped_column(sa.String(10))
    token_limit: Mapped[int | None] = mapped_column(sa.BigInteger)
    cost_limit: Mapped[Decimal | None]
    request_limit: Mapped[int | None] = mapped_column(sa.BigInteger)
    #: ``hard`` refuses a call that does not fit; ``soft`` only counts and alerts.
    mode: Mapped[str] = mapped_column(sa.String(10), default="hard")
    #: Alert percentages of this budget (None: ``AI_METERING_ALERT_THRESHOLDS``).
    thresholds: Mapped[list[int] | None] = mapped_column(sa.JSON(none_as_null=True))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    removed_at: Mapped[dt.datetime | None]

    @property
    def billable(self) -> tuple[str, str]:
        return (self.billable_type, self.billable_id)

    @property
    def scope(self) -> str:
        """Who the budget limits, in words: ``Team:1``, ``Team:1 user 7 feature images``."""
        return budget_scope(self.billable, self.user_id, self.feature, self.model)

    def scope_items(self) -> list[tuple[str, str]]:
        """The set scope fields among user, feature and model, in that order."""
        return budget_scope_items(self.user_id, self.feature, self.model)

    def __repr__(self) -> str:
        return f"<Budget {self.id} {self.scope} per {self.period}>"


class BudgetCounter(Base):
    """A budget's used and reserved amounts in one period, like :class:`Counter` for a plan.

    It copies the budget's limits when created, so the one-statement hold on PostgreSQL
    judges an existing row against the limits it was created with (a budget's limits
    never change: remove it and add another).
    """

    __tablename__ = PREFIX + "budget_counters"
    __table_args__ = (
        sa.UniqueConstraint("budget_id", "period_start"),
        sa.Index(None, "period_start"),
        sa.CheckConstraint("reserved_tokens >= 0", name="reserved_tokens_nonneg"),
        sa.CheckConstraint("reserved_cost_units >= 0", name="reserved_cost_nonneg"),
        sa.CheckConstraint("reserved_requests >= 0", name="reserved_requests_nonneg"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    budget_id: Mapped[int] = mapped_column(sa.ForeignKey(Budget.id))
    period_start: Mapped[dt.datetime]
    period_end: Mapped[dt.datetime]
    token_limit: Mapped[int | None] = mapped_column(sa.BigInteger)
    #: Pico-units (None: unlimited).
    cost_limit_units: Mapped[int | None] = mapped_column(sa.BigInteger)
    request_limit: Mapped[int | None] = mapped_column(sa.BigInteger)
    #: False for a ``soft`` budget: holds are never refused.
    enforced: Mapped[bool] = mapped_column(default=True, server_default=sa.true())
    used_tokens: Mapped[int] = mapped_column(sa.BigInteger, default=0, server_default="0")
    reserved_tokens: Mapped[int] = mapped_column(sa.BigInteger, default=0, server_default="0")
    used_cost_units: Mapped[int] = mapped_column(sa.BigInteger, default=0, server_default="0")
    reserved_cost_units: Mapped[int] = mapped_column(sa.BigInteger, default=0, server_default="0")
    used_requests: Mapped[int] = mapped_column(sa.BigInteger, default=0, server_default="0")
    reserved_requests: Mapped[int] = mapped_column(sa.BigInteger, default=0, server_default="0")
    #: As :attr:`Counter.alert_level`.
    alert_level: Mapped[int] = mapped_column(default=0, server_default="0")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class AlertEvent(Base):
    """An alert waiting for (or past) delivery to ``AI_METERING_ALERT_WEBHOOK_URL``: an outbox.

    Written in the transaction that crossed the threshold, so an alert exists exactly when
    the crossing does; delivered afterwards, retried with backoff, and sent with its
    ``event_id`` so a receiver that dedups on it sees each crossing once.
    """

    __tablename__ = PREFIX + "alert_events"
    __table_args__ = (sa.UniqueConstraint("event_id"), sa.Index(None, "delivered_at", "next_attempt_at"))

    id: Mapped[int] = mapped_column(primary_key=True)
    event_id: Mapped[str] = mapped_column(sa.String(64))
    #: ``threshold_crossed``.
    kind: Mapped[str] = mapped_column(sa.String(50))
    billable_type: Mapped[str] = mapped_column(sa.String(_BILLABLE_TYPE))
    billable_id: Mapped[str] = mapped_column(sa.String(_ID))
    #: The JSON body delivered (without secrets or prompts).
    payload: Mapped[dict[str, t.Any]]
    attempts: Mapped[int] = mapped_column(default=0, server_default="0")
    next_attempt_at: Mapped[dt.datetime]
    #: A deliverer's claim: others skip the row until then (a crashed one's claim runs out).
    claimed_until: Mapped[dt.datetime | None]
    delivered_at: Mapped[dt.datetime | None]
    #: The last failure's HTTP status or exception class (never a response body).
    last_error: Mapped[str | None] = mapped_column(sa.String(200))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class _CallColumns:
    """Who made a provider call and what it asked for: shared by the ledger and the failures."""

    id: Mapped[int] = mapped_column(sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True)
    billable_type: Mapped[str | None] = mapped_column(sa.String(_BILLABLE_TYPE))
    billable_id: Mapped[str | None] = mapped_column(sa.String(_ID))
    user_id: Mapped[str | None] = mapped_column(sa.String(_ID))
    tenant_id: Mapped[str | None] = mapped_column(sa.String(_ID))
    provider: Mapped[str] = mapped_column(sa.String(50))
    model: Mapped[str | None] = mapped_column(sa.String(150))
    feature: Mapped[str | None] = mapped_column(sa.String(100))


class _TokenColumns:
    """The token counts of the ledger and of every rollup: the one place they are spelled out."""

    input_tokens: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    output_tokens: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    cached_input_tokens: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    cache_write_tokens: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    reasoning_tokens: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    total_tokens: Mapped[int] = mapped_column(sa.BigInteger, default=0)


#: The token columns, in order: ``input_tokens`` … ``total_tokens``.
TOKEN_COLUMNS: tuple[str, ...] = tuple(_TokenColumns.__annotations__)


class Usage(_CallColumns, _TokenColumns, Base):
    """One metered call: the append-only ledger that reports and invoices come from."""

    __tablename__ = PREFIX + "usage"
    __table_args__ = (
        sa.UniqueConstraint("billable_type", "billable_id", "idempotency_scope", "idempotency_key"),
        # A queued write of a reservation's usage may run twice; only one row lands.
        sa.UniqueConstraint("reservation_id", name="uq_ai_metering_usage_reservation"),
        sa.Index(None, "billable_type", "billable_id", "occurred_at"),
        sa.Index(None, "occurred_at"),
        sa.Index(None, "user_id", "occurred_at"),
        sa.Index(None, "tenant_id", "occurred_at"),
        sa.Index(None, "counter_id"),
        sa.Index(None, "model", "occurred_at"),
        sa.Index(None, "adjusts_id"),
    )

    input_cost: Mapped[Decimal] = mapped_column(default=Decimal(0))
    output_cost: Mapped[Decimal] = mapped_column(default=Decimal(0))
    total_cost: Mapped[Decimal] = mapped_column(default=Decimal(0))
    currency: Mapped[str] = mapped_column(sa.String(3), default="usd")
    #: The price database did not know the model: the cost is 0 until it is repriced.
    unpriced: Mapped[bool] = mapped_column(default=False)
    #: The counts are an estimate (a stream that never reported its usage).
    estimated: Mapped[bool] = mapped_column(default=False)
    #: Where the price came from: ``override``, ``genai-prices <version>`` or ``unpriced``
    #: (None: recorded before this was kept). A ``reprice`` adjustment names its new source.
    price_source: Mapped[str | None] = mapped_column(sa.String(100))
    billing_mode: Mapped[str] = mapped_column(sa.String(20), default="plan")
    idempotency_key: Mapped[str | None] = mapped_column(sa.String(_KEY))
    #: The tenant the key was claimed under ('' for none): one tenant can never replay another's key.
    idempotency_scope: Mapped[str] = mapped_column(sa.String(_ID), default="", server_default="")
    meta: Mapped[dict[str, t.Any] | None]
    #: Wall time of the provider call, when metered by ``meter.call``.
    duration_ms: Mapped[int | None]
    counter_id: Mapped[int | None] = mapped_column(sa.ForeignKey(Counter.id))
    reservation_id: Mapped[int | None] = mapped_column(sa.BigInteger)
    #: ``usage`` for a metered call; ``refund`` for an adjustment that gives part of a call
    #: back (negative tokens and cost, so every SUM over the ledger nets it out); ``reprice``
    #: for one that adds the cost a later price gives a call (no tokens).
    kind: Mapped[str] = mapped_column(sa.String(16), default="usage", server_default="usage")
    #: The usage row an adjustment adjusts (None for a call).
    adjusts_id: Mapped[int | None] = mapped_column(sa.BigInteger)
    occurred_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    def __repr__(self) -> str:
        return f"<Usage {self.id} {self.billable_type}:{self.billable_id} {self.model} {self.total_tokens}>"


class Failure(_CallColumns, Base):
    """One provider call that raised: who, what, which error, how long. Never a message or a prompt.

    Kept apart from the usage ledger so money totals never mix with failures;
    ``cleanup`` prunes it on the ledger's retention.
    """

    __tablename__ = PREFIX + "failures"
    __table_args__ = (
        sa.Index(None, "occurred_at"),
        sa.Index(None, "model", "occurred_at"),
        sa.Index(None, "billable_type", "billable_id", "occurred_at"),
    )

    #: The exception's class name (e.g. ``RateLimitError``), never its message.
    error_type: Mapped[str] = mapped_column(sa.String(100))
    #: The HTTP status the provider answered with, when the error carries one.
    http_status: Mapped[int | None]
    #: Wall time from the call's start to the error.
    duration_ms: Mapped[int | None]
    occurred_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    def __repr__(self) -> str:
        return f"<Failure {self.id} {self.provider}/{self.model} {self.error_type}>"


class CreditWallet(Base):
    """A billable's prepaid balance; ``balance`` always equals the sum of its transactions."""

    __tablename__ = PREFIX + "credit_wallets"
    __table_args__ = (sa.UniqueConstraint("billable_type", "billable_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    billable_type: Mapped[str] = mapped_column(sa.String(_BILLABLE_TYPE))
    billable_id: Mapped[str] = mapped_column(sa.String(_ID))
    balance: Mapped[Decimal] = mapped_column(default=Decimal(0), server_default="0")
    #: Credits held by calls in flight (part of ``balance``, not spendable twice).
    held: Mapped[Decimal] = mapped_column(default=Decimal(0), server_default="0")
    #: ``credits_low`` has fired since the available balance last went below the threshold
    #: (set by the guarded UPDATE that fires it; cleared when credits bring it back above).
    low_notified: Mapped[bool] = mapped_column(default=False, server_default=sa.false())
    currency: Mapped[str] = mapped_column(sa.String(3), default="usd")
    meta: Mapped[dict[str, t.Any] | None]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    transactions: Mapped[list[CreditTransaction]] = relationship(back_populates="wallet")


class CreditTransaction(Base):
    """One signed change to a wallet: a top-up (+) or a deduction (-)."""

    __tablename__ = PREFIX + "credit_transactions"
    __table_args__ = (
        sa.UniqueConstraint("wallet_id", "idempotency_key"),
        sa.Index(None, "wallet_id", "created_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    wallet_id: Mapped[int] = mapped_column(sa.ForeignKey(CreditWallet.id))
    amount: Mapped[Decimal]
    reason: Mapped[str | None] = mapped_column(sa.String(255))
    meta: Mapped[dict[str, t.Any] | None]
    idempotency_key: Mapped[str | None] = mapped_column(sa.String(_KEY))
    usage_id: Mapped[int | None] = mapped_column(sa.BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    wallet: Mapped[CreditWallet] = relationship(back_populates="transactions")


class Overage(Base):
    """Usage beyond a plan's included tokens, priced and waiting to be billed exactly once."""

    __tablename__ = PREFIX + "overages"
    __table_args__ = (
        sa.Index("ix_ai_metering_overages_billable", "billable_type", "billable_id", "period_start"),
        sa.Index(None, "status", "id"),
        sa.UniqueConstraint("usage_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    billable_type: Mapped[str] = mapped_column(sa.String(_BILLABLE_TYPE))
    billable_id: Mapped[str] = mapped_column(sa.String(_ID))
    usage_id: Mapped[int | None] = mapped_column(sa.BigInteger)
    tokens: Mapped[int] = mapped_column(sa.BigInteger)
    amount: Mapped[Decimal]
    currency: Mapped[str] = mapped_column(sa.String(3), default="usd")
    period_start: Mapped[dt.datetime]
    period_end: Mapped[dt.datetime | None]
    #: ``pending`` → ``syncing`` → ``synced`` (an amount that rounds to 0 minor units is
    #: ``synced`` with ``synced_amount_minor`` 0 and no ``stripe_id``: it was carried).
    status: Mapped[str] = mapped_column(sa.String(16), default="pending", server_default="pending")
    #: Minor units (cents) this overage put on the invoice; remainders carry to the next.
    synced_amount_minor: Mapped[int | None] = mapped_column(sa.BigInteger)
    #: The customer billed, frozen at the first claim like the amount: a retry or a
    #: takeover looks for (and keys) the same item even if the subscription changed since.
    stripe_customer_id: Mapped[str | None] = mapped_column(sa.String(_KEY))
    sync_attempts: Mapped[int] = mapped_column(default=0, server_default="0")
    sync_started_at: Mapped[dt.datetime | None]
    last_error: Mapped[str | None] = mapped_column(sa.Text)
    synced_at: Mapped[dt.datetime | None]
    stripe_id: Mapped[str | None] = mapped_column(sa.String(_KEY))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    def is_synced(self) -> bool:
        return self.synced_at is not None


class _RollupMetrics(_TokenColumns):
    """The summed columns every rollup table carries."""

    calls: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    total_cost: Mapped[Decimal] = mapped_column(default=Decimal(0))
    unpriced_calls: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    #: Refund adjustments dated that day (not counted in ``calls``).
    refunds: Mapped[int] = mapped_column(sa.BigInteger, default=0, server_default="0")
    #: Cost given back by refunds dated that day (positive; ``total_cost`` is already net of it).
    refunded_cost: Mapped[Decimal] = mapped_column(default=Decimal(0), server_default="0")
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class UsageRollup(_RollupMetrics, Base):
    """Daily totals per billable × tenant × provider × model × feature: the detailed rollup.

    Empty strings stand for "none" in the key columns, because unique keys treat
    NULLs as distinct and would let a re-run duplicate rows.
    """

    __tablename__ = PREFIX + "usage_daily"
    __table_args__ = (
        sa.UniqueConstraint("day", "billable_type", "billable_id", "tenant_id", "provider", "model", "feature"),
        sa.Index(None, "billable_type", "billable_id", "day"),
        sa.Index(None, "tenant_id", "day"),
        sa.Index(None, "model", "day"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    day: Mapped[dt.date] = mapped_column(sa.Date)
    billable_type: Mapped[str] = mapped_column(sa.String(_BILLABLE_TYPE), default="")
    billable_id: Mapped[str] = mapped_column(sa.String(_ID), default="")
    tenant_id: Mapped[str] = mapped_column(sa.String(_ID), default="")
    provider: Mapped[str] = mapped_column(sa.String(50))
    model: Mapped[str] = mapped_column(sa.String(150), default="")
    feature: Mapped[str] = mapped_column(sa.String(100), default="")


class UsageTotalsRollup(_RollupMetrics, Base):
    """Daily totals per tenant × provider × model × feature, without the billable.

    Overviews across all billables read this table: its size grows with days and
    models, not with customers, so a 30-day overview stays fast at any volume.
    """

    __tablename__ = PREFIX + "usage_daily_totals"
    __table_args__ = (
        sa.UniqueConstraint("day", "tenant_id", "provider", "model", "feature"),
        sa.Index(None, "tenant_id", "day"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    day: Mapped[dt.date] = mapped_column(sa.Date)
    tenant_id: Mapped[str] = mapped_column(sa.String(_ID), default="")
    provider: Mapped[str] = mapped_column(sa.String(50))
    model: Mapped[str] = mapped_column(sa.String(150), default="")
    feature: Mapped[str] = mapped_column(sa.String(100), default="")


class UsageBillableRollup(_RollupMetrics, Base):
    """Daily totals per billable × tenant, for rankings of billables over any range."""

    __tablename__ = PREFIX + "usage_daily_billables"
    __table_args__ = (
        sa.UniqueConstraint("day", "billable_type", "billable_id", "tenant_id"),
        sa.Index("ix_ai_metering_daily_billables_billable", "billable_type", "billable_id", "day"),
        sa.Index(None, "tenant_id", "day"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    day: Mapped[dt.date] = mapped_column(sa.Date)
    billable_type: Mapped[str] = mapped_column(sa.String(_BILLABLE_TYPE), default="")
    billable_id: Mapped[str] = mapped_column(sa.String(_ID), default="")
    tenant_id: Mapped[str] = mapped_column(sa.String(_ID), default="")


class UsageLatencyRollup(Base):
    """Ledger rows per day × provider × model × feature × latency bucket.

    The overview's latency percentiles and daily call counts per model read this instead of
    scanning a week of the ledger. ``bucket`` is an index into
    :data:`~flask_ai_metering.reporting.rollups.LATENCY_BOUNDS_MS` (-1: a row without a
    duration). There is no tenant or billable here: with those filters the overview reads
    the ledger, whose indexes narrow it.
    """

    __tablename__ = PREFIX + "usage_daily_latency"
    __table_args__ = (
        sa.UniqueConstraint("day", "provider", "model", "feature", "bucket"),
        sa.Index(None, "model", "day"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    day: Mapped[dt.date] = mapped_column(sa.Date)
    provider: Mapped[str] = mapped_column(sa.String(50))
    model: Mapped[str] = mapped_column(sa.String(150), default="")
    feature: Mapped[str] = mapped_column(sa.String(100), default="")
    bucket: Mapped[int] = mapped_column(sa.SmallInteger)
    #: Ledger rows (calls and their adjustments alike, as the health panel counts them).
    entries: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class AggregationState(Base):
    """Markers of background work: where aggregation stopped, what cleanup pruned."""

    __tablename__ = PREFIX + "aggregation_state"

    name: Mapped[str] = mapped_column(sa.String(50), primary_key=True)
    last_usage_id: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    #: A time the marker records (e.g. ``pruned_before``: no usage older than this is kept).
    marked_at: Mapped[dt.datetime | None]
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


__all__ = [
    "AggregationState",
    "AlertEvent",
    "Base",
    "Budget",
    "BudgetCounter",
    "Counter",
    "CreditTransaction",
    "CreditWallet",
    "Failure",
    "Overage",
    "Plan",
    "Reservation",
    "Subscription",
    "Usage",
    "UsageBillableRollup",
    "UsageLimitOverride",
    "UsageRollup",
    "UsageTotalsRollup",
    "table",
]
