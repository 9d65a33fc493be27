"""``flask ai-metering validate``: everything that can be wrong, one line per problem.

Checks run from the outside in, and each stage runs only when the previous one
passed, so a missing database gives one clear line rather than a cascade:
configuration (unknown keys, bad values, the billing driver), the database
(connectivity, schema version), then the data (orphaned subscriptions, counters
and wallets that disagree with their ledgers, budgets their plan makes pointless
or useless, unpriced models, stuck reservations and queued rows) and, with queued recording, the broker.
"""

from __future__ import annotations

import datetime as dt
import difflib
import typing as t

import sqlalchemy as sa

from ..billing import NullBillingDriver
from ..config import DEFAULTS
from ..config import ConfigVars
from ..config import Settings
from ..config import unknown_keys
from ..errors import ConfigurationError
from ..models import Plan
from ..models import Reservation
from ..models import Subscription
from ..models import Usage
from ..models import utcnow
from ..money import from_units
from ..money import to_units
from ..queueing import celery_for
from ..quota.budgets import PERIODS
from ..quota.budgets import budgets
from . import schema as migrations
from .privacy import secret_key_problem
from .reconcile import reconcile

if t.TYPE_CHECKING:
    from flask import Flask

    from ..runtime import Runtime

subs = Subscription.__table__
plans = Plan.__table__
usage = Usage.__table__
reservations = Reservation.__table__


def validate(app: Flask, rt: Runtime | None = None) -> list[str]:
    """Every problem found, as ``"area: what is wrong; how to fix it"`` lines (empty: all good).

    Call inside an app context. Without ``rt`` the runtime is built here, so a
    billing driver that cannot load is reported instead of raised.
    """
    problems = _config(app)
    if rt is None:
        rt, driver_problem = _runtime(app)
        problems += driver_problem
    unreachable = _database(rt)
    if unreachable:
        return problems + unreachable
    problems += _data(rt)
    if rt.settings.queue_recording:
        problems += _broker(app)
    return problems


def _config(app: Flask) -> list[str]:

    problems = []
    for key in unknown_keys(app.config):
        close = difflib.get_close_matches(key, DEFAULTS, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        problems.append(f"config: unknown key {key}{hint}")
    try:
        Settings.from_config(app.config)
    except ConfigurationError as exc:
        problems.append(f"config: {exc}")
    weak_key = secret_key_problem(app)
    if weak_key is not None:
        problems.append(f"config: {weak_key}; set a long random SECRET_KEY")
    return problems


def _runtime(app: Flask) -> tuple[Runtime, list[str]]:
    """The app's runtime; when its billing driver cannot load, one with the null driver and the reason."""
    meter = app.extensions["ai_metering"]
    try:
        return meter.runtime(), []
    except ConfigurationError as exc:
        # The rest of the checks need no driver: carry on with one that does nothing.
        state = meter._state(app)
        return state.runtime(app, billing=NullBillingDriver(state.store, state.settings)), [f"config: {exc}"]


def _database(rt: Runtime) -> list[str]:
    engine = rt.store.engine
    where = engine.url.render_as_string(hide_password=True)
    try:
        with engine.connect() as conn:
            conn.execute(sa.select(1))
        current = migrations.current(engine)
    except sa.exc.SQLAlchemyError as exc:
        reason = getattr(exc, "orig", None) or exc
        return [f"database: cannot connect to {where}: {reason}"]
    head = migrations.head()
    if current is None:
        return [f"database: the metering tables are not created in {where}; run flask ai-metering db upgrade"]
    if current != head:
        return [f"database: schema is at revision {current}, the code expects {head}; run flask ai-metering db upgrade"]
    return []


def notes(app: Flask) -> list[str]:
    """What ``validate`` tells without failing: choices whose consequences are easy to miss."""
    try:
        settings = Settings.from_config(app.config)
    except ConfigurationError:
        return []  # reported as a problem
    if settings.default_plan is None:
        return [
            "plans: billables without a subscription are unlimited (metered, never refused);"
            f" set {ConfigVars.DEFAULT_PLAN} to hold them to a plan"
        ]
    return []


def _data(rt: Runtime) -> list[str]:
    now = utcnow()
    problems = [f"ledger: {line}" for line in reconcile(rt, now=now)]
    with rt.store.engine.connect() as conn:
        problems += _default_plan(conn, rt.settings)
        problems += _orphans(conn)
        problems += _budgets(conn, rt.settings)
        problems += _unpriced(conn)
        problems += _stuck(conn, rt, now)
    return problems


def _default_plan(conn: sa.Connection, settings: Settings) -> list[str]:
    if settings.default_plan is None:
        return []
    if conn.execute(sa.select(plans.c.id).where(plans.c.slug == settings.default_plan)).first() is None:
        return [f"config: {settings.missing_default_plan()}"]
    return []


def _orphans(conn: sa.Connection) -> list[str]:
    """Subscriptions whose plan is gone (SQLite does not enforce the foreign key), with the usage under them."""
    counted = (
        sa.select(sa.func.count())
        .select_from(usage)
        .where(usage.c.billable_type == subs.c.billable_type, usage.c.billable_id == subs.c.billable_id)
        .scalar_subquery()
    )
    rows = conn.execute(
        sa.select(subs.c.id, subs.c.billable_type, subs.c.billable_id, subs.c.plan_id, counted.label("usage_rows"))
        .outerjoin(plans, plans.c.id == subs.c.plan_id)
        .where(plans.c.id.is_(None))
        .order_by(subs.c.id)
    )
    return [
        f"data: subscription {row.id} of {row.billable_type}:{row.billable_id} is on plan id {row.plan_id},"
        f" which does not exist ({row.usage_rows} usage row(s) counted under an unknown plan);"
        " move it with flask ai-metering migrate-plan"
        for row in rows
    ]


#: A plan's period type as the budget period of the same length (``rolling`` is a month).
_PLAN_PERIODS = {"daily": "day", "weekly": "week", "monthly": "month", "yearly": "year", "rolling": "month"}


def _budgets(conn: sa.Connection, settings: Settings) -> list[str]:
    """Live budgets that can never bind, or never be used, under their billable's plan.

    A budget whose limit exceeds the plan's for a period at least as long as its own
    is never reached before the plan refuses (a month budget of 2M tokens on a plan of
    1M a month). A budget on a feature the plan no longer lists never sees a call: the
    plan refuses them all. A billable without a subscription is judged against
    ``AI_METERING_DEFAULT_PLAN`` when set (else it is unlimited and no budget is pointless).
    """
    terms = [plans.c.slug, plans.c.token_limit, sa.type_coerce(plans.c.cost_limit, sa.BigInteger), plans.c.period]
    terms.append(plans.c.features)
    default = None
    if settings.default_plan is not None:
        default = conn.execute(sa.select(*terms).where(plans.c.slug == settings.default_plan)).first()
    subscribed = sa.and_(subs.c.billable_type == budgets.c.billable_type, subs.c.billable_id == budgets.c.billable_id)
    rows = conn.execute(
        sa.select(budgets, subs.c.id.label("subscription_id"), *(c.label(f"plan_{i}") for i, c in enumerate(terms)))
        .select_from(budgets.outerjoin(subs, subscribed).outerjoin(plans, plans.c.id == subs.c.plan_id))
        .where(budgets.c.removed_at.is_(None))
        .order_by(budgets.c.id)
    )
    problems = []
    for row in rows:
        plan = tuple(row[-len(terms) :]) if row.subscription_id is not None else default
        if plan is None or plan[0] is None:
            continue
        slug, token_limit, cost_units, period, features = plan
        scope = " ".join([f"{row.billable_type}:{row.billable_id}", *_scope(row)])
        what = f"budgets: budget {row.id} ({scope}, per {row.period})"
        if row.feature is not None and features and row.feature not in features:
            problems.append(
                f"{what} is on feature {row.feature!r}, which plan {slug!r} no longer allows: no call can use it;"
                " remove it with meter.remove_budget"
            )
        plan_period = _PLAN_PERIODS.get(period or settings.period_type, "month")
        if PERIODS.index(plan_period) < PERIODS.index(row.period):
            continue  # the plan's period is shorter: a budget above one plan period still binds
        limits = (("token", row.token_limit, token_limit), ("cost", _units(row.cost_limit), cost_units))
        for name, mine, theirs in limits:
            if mine is not None and theirs is not None and mine > theirs:
                problems.append(
                    f"{what} has a {name} limit of {_shown(name, mine)}, above plan {slug!r}'s"
                    f" {_shown(name, theirs)} per"
                    f" {plan_period}: the plan refuses first, so it never binds; lower it or remove it"
                )
    return problems


def _shown(name: str, value: int) -> str:
    """A token count with its unit, or pico-units as a plain amount."""
    return f"{value:,} tokens" if name == "token" else format(from_units(value).normalize(), "f")


def _units(amount: t.Any) -> int | None:
    return None if amount is None else to_units(amount)


def _scope(row: t.Any) -> list[str]:
    fields = (("user", row.user_id), ("feature", row.feature), ("model", row.model))
    return [f"{name} {value}" for name, value in fields if value is not None]


def _unpriced(conn: sa.Connection) -> list[str]:
    rows = conn.execute(
        sa.select(usage.c.provider, usage.c.model, sa.func.count().label("n"))
        .where(usage.c.unpriced.is_(True))
        .group_by(usage.c.provider, usage.c.model)
        .order_by(usage.c.provider, usage.c.model)
    )
    return [
        f"pricing: {row.n} usage row(s) of {row.provider}/{row.model} are unpriced (recorded at cost 0);"
        " add the model to AI_METERING_PROVIDERS"
        for row in rows
    ]


def _stuck(conn: sa.Connection, rt: Runtime, now: dt.datetime) -> list[str]:
    """Reservations past expiry, and queued rows no worker wrote within a reservation's lifetime."""
    problems = []
    expired = conn.execute(
        sa.select(sa.func.count())
        .select_from(reservations)
        .where(reservations.c.status == "pending", reservations.c.expires_at < now)
    ).scalar()
    if expired:
        problems.append(
            f"reservations: {expired} past their expiry still hold quota; run flask ai-metering expire-reservations"
        )
    waiting = conn.execute(
        sa.select(sa.func.count())
        .select_from(reservations)
        .where(
            reservations.c.status == "committed",
            reservations.c.payload.is_not(None),
            sa.cast(reservations.c.payload, sa.Text) != "null",
            reservations.c.settled_at < now - dt.timedelta(seconds=rt.settings.reservation_ttl),
        )
    ).scalar()
    if waiting:
        problems.append(
            f"queue: {waiting} usage row(s) are still waiting in the outbox; is a Celery worker running?"
            " flask ai-metering expire-reservations writes them"
        )
    return problems


def _broker(app: Flask) -> list[str]:
    from kombu.utils.url import maybe_sanitize_url

    celery = celery_for(app)
    try:
        with celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
    except Exception as exc:  # kombu raises transport-specific errors
        url = maybe_sanitize_url(celery.conf.broker_url or "the default broker")
        return [f"queue: cannot reach the Celery broker at {url}: {exc}; set broker_url in app.config['CELERY']"]
    return []
