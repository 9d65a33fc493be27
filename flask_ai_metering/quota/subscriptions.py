"""Putting billables on plans, and moving them between plans.

A billable has at most one subscription row (a unique key says so). Moving it to
another plan mid-period bumps ``plan_version``; what happens to the allowance is
``AI_METERING_PLAN_CHANGE``, decided here, once, under the subscription's row lock:

* ``carry``: the billable stays on its counter, so the usage already in the period
  counts against the new plan's limits;
* ``prorate``: the same counter, and limits for the rest of the period of the old
  limit for the elapsed share plus the new limit for the remaining share
  (``prorated_*`` columns, read by the policy query until the period ends);
* ``reset``: ``counter_segment`` moves, so the new plan's whole allowance starts on
  a fresh counter (a customer who can change plans can refill their allowance).

A hold taken before the change keeps its counter id, so it commits (or is
released) on the counter it was taken on whatever happened since.
"""

from __future__ import annotations

import datetime as dt
import math
import typing as t
from fractions import Fraction

import sqlalchemy as sa
from sqlalchemy.orm import make_transient_to_detached
from sqlalchemy.orm.attributes import set_committed_value

from .. import signals
from ..errors import AiMeteringError
from ..errors import InvalidUsage
from ..models import Base
from ..models import Plan
from ..models import Subscription
from ..models import table
from ..models import utcnow
from ..validation import billing_mode as check_mode
from .periods import period_for
from .policy import Billable

if t.TYPE_CHECKING:
    from flask_sqlalchemy import SQLAlchemy

    from ..config import Settings
    from ..runtime import Runtime

subs = table(Subscription)
plans = table(Plan)

_DATES = ("started_at", "renews_at", "ends_at", "trial_ends_at", "grace_period_ends_at")


#: A plan's limits as the counters hold them (the cost in raw pico-units), and its period type.
_LIMITS = (plans.c.token_limit, sa.type_coerce(plans.c.cost_limit, sa.BigInteger).label("cost_units"), plans.c.period)


#: A plan's trial: its length, and its limits as the counters hold them (None: the plan's own).
_TRIAL_LIMITS = (
    plans.c.trial_days,
    plans.c.trial_token_limit,
    sa.type_coerce(plans.c.trial_cost_limit, sa.BigInteger).label("trial_cost_units"),
)


def _plan_row(conn: sa.Connection, plan: Plan | str) -> t.Any:
    if isinstance(plan, Plan):
        if plan.id is None:
            raise InvalidUsage("plan has no id yet: add and commit it before subscribing")
        clause = plans.c.id == plan.id
    elif isinstance(plan, str):
        clause = plans.c.slug == plan
    else:
        raise InvalidUsage(f"plan must be a Plan or a plan slug, got {type(plan).__name__}")
    row = conn.execute(
        sa.select(plans.c.id, plans.c.slug, plans.c.is_active, *_LIMITS, *_TRIAL_LIMITS).where(clause)
    ).first()
    if row is None:
        raise InvalidUsage(f"plan {getattr(plan, 'slug', plan)!r} does not exist")
    return row


def subscribe(
    rt: Runtime,
    db: SQLAlchemy,
    billable: Billable,
    plan: Plan | str,
    *,
    billing_mode: str = "plan",
    stripe_customer_id: str | None = None,
    stripe_subscription_id: str | None = None,
    from_plan: str | None = None,
    **dates: dt.datetime | None,
) -> Subscription:
    """Create or move the billable's subscription, in one short transaction of our own."""
    mode = check_mode(billing_mode) or "plan"
    unknown = set(dates) - set(_DATES)
    if unknown:
        raise InvalidUsage(f"unknown subscription fields: {', '.join(sorted(unknown))}")
    for name, value in dates.items():
        if value is not None and (not isinstance(value, dt.datetime) or value.tzinfo is None):
            raise InvalidUsage(f"{name} must be a timezone-aware datetime, got {value!r}")
    changes: list[tuple[str | None, str]] = []

    def work(conn: sa.Connection) -> int:
        changes.clear()
        new = _plan_row(conn, plan)
        if not new.is_active:
            raise InvalidUsage(f"plan {new.slug!r} is not active")
        where = sa.and_(subs.c.billable_type == billable[0], subs.c.billable_id == billable[1])
        current = _locked(conn, where)
        now = utcnow()  # read under the row lock: plan changes of one billable are ordered in time
        if from_plan is not None and (current is None or current.slug != from_plan):
            held = "no plan" if current is None else f"plan {current.slug!r}"
            raise InvalidUsage(f"{billable[0]}:{billable[1]} is on {held}, not {from_plan!r}")
        values: dict[str, t.Any] = {k: v for k, v in dates.items() if v is not None}
        values["billing_mode"] = mode
        values["updated_at"] = now
        if stripe_customer_id is not None:
            values["stripe_customer_id"] = stripe_customer_id
        if stripe_subscription_id is not None:
            values["stripe_subscription_id"] = stripe_subscription_id
        if current is None:
            values.setdefault("started_at", now)
            values.update(trial_terms(new, None, dates.get("trial_ends_at"), values["started_at"], now))
            inserted = rt.store.insert_ignore(
                conn,
                subs,
                {
                    "billable_type": billable[0],
                    "billable_id": billable[1],
                    "plan_id": new.id,
                    "plan_version": 0,
                    "created_at": now,
                    **values,
                },
            )
            if inserted != 1:  # a racing subscribe created it first: move that one instead
                raise _Retry()
        else:
            if current.plan_id != new.id:
                values.update(
                    plan_id=new.id,
                    previous_plan_id=current.plan_id,
                    plan_changed_at=now,
                    plan_version=subs.c.plan_version + 1,
                    **allowance_on_change(rt.settings, current, new, now),
                )
                changes.append((current.slug, new.slug))
            values.update(trial_terms(new, current, dates.get("trial_ends_at"), now, now))
            conn.execute(sa.update(subs).where(subs.c.id == current.id).values(**values))
        return int(conn.execute(sa.select(subs.c.id).where(where)).scalar_one())

    for _ in range(3):
        try:
            sub_id = rt.store.run(work)
            break
        except _Retry:
            continue
    else:
        raise AiMeteringError(f"could not subscribe {billable[0]}:{billable[1]}: its row kept changing")
    for old, new_slug in changes:
        signals.plan_changed.send(rt.app, billable=billable, old_plan=old, new_plan=new_slug, subscription_id=sub_id)
    with rt.store.engine.connect() as conn:
        row = conn.execute(sa.select(subs).where(subs.c.id == sub_id)).one()
    return attach(db, Subscription, row)


class _Retry(Exception):
    pass


_CURRENT = (
    subs.c.id,
    subs.c.plan_id,
    subs.c.started_at,
    subs.c.plan_changed_at,
    subs.c.prorated_token_limit,
    subs.c.prorated_cost_units,
    subs.c.prorated_until,
    subs.c.trial_ends_at,
)


class _Current(t.NamedTuple):
    """The locked subscription row and its plan's slug and limits."""

    id: int
    plan_id: int
    started_at: dt.datetime
    plan_changed_at: dt.datetime | None
    prorated_token_limit: int | None
    prorated_cost_units: int | None
    prorated_until: dt.datetime | None
    trial_ends_at: dt.datetime | None
    slug: str
    token_limit: int | None
    cost_units: int | None
    period: str | None


def _locked(conn: sa.Connection, where: sa.ColumnElement[bool]) -> _Current | None:
    """Lock the billable's subscription row, then read its plan.

    The row alone is locked: PostgreSQL re-checks a ``FOR UPDATE`` join against the
    plan row it first joined, so a row whose plan changed meanwhile would vanish.
    """
    row = conn.execute(sa.select(*_CURRENT).where(where).with_for_update()).first()
    if row is None:
        return None
    plan = conn.execute(sa.select(plans.c.slug, *_LIMITS).where(plans.c.id == row.plan_id)).one()
    return _Current(*row, *plan)


def allowance_on_change(settings: Settings, current: _Current, new: t.Any, now: dt.datetime) -> dict[str, t.Any]:
    """The subscription columns a plan change from ``current`` to ``new`` at ``now`` sets.

    ``current`` is the locked subscription row with its plan's limits; ``new`` the new plan's row.
    """
    cleared = {"prorated_token_limit": None, "prorated_cost_units": None, "prorated_until": None}
    if settings.plan_change == "reset":
        return {**cleared, "counter_segment": subs.c.counter_segment + 1}
    if settings.plan_change == "carry":
        return cleared
    period = period_for(
        now,
        period_type=new.period or settings.period_type,
        alignment=settings.period_alignment,
        timezone=settings.timezone,
        anchor=current.started_at,
    )
    running = current.prorated_until is not None and current.prorated_until > now
    # Never before the previous change: the shares of one period's segments must add up to 1.
    at = max(now, current.plan_changed_at) if running and current.plan_changed_at else now
    tick = dt.timedelta(microseconds=1)
    remaining = Fraction(max((period.end - at) // tick, 0), (period.end - period.start) // tick)
    return {
        "prorated_token_limit": prorate(
            current.prorated_token_limit if running else current.token_limit,
            current.token_limit,
            new.token_limit,
            remaining,
        ),
        "prorated_cost_units": prorate(
            current.prorated_cost_units if running else current.cost_units,
            current.cost_units,
            new.cost_units,
            remaining,
        ),
        "prorated_until": period.end,
    }


def trial_terms(
    new: t.Any, current: _Current | None, explicit_end: dt.datetime | None, start: dt.datetime, now: dt.datetime
) -> dict[str, t.Any]:
    """The subscription columns a trial sets when the billable subscribes to ``new`` at ``now``.

    A trial starts when ``trial_ends_at`` is given, or when a billable subscribes or moves to a
    plan with ``trial_days`` and its subscription never had a trial (so changing plans cannot
    restart one). While a trial runs,
    the new plan's trial limits (each falling back to the plan's own) are in force until the
    trial's end, through the subscription's time-bounded limits (``prorated_*``), which the
    policy query already reads: a trial costs the hot path nothing.
    """
    out: dict[str, t.Any] = {}
    if explicit_end is not None:
        end: dt.datetime | None = explicit_end
    elif new.trial_days and (current is None or current.trial_ends_at is None and current.plan_id != new.id):
        end = start + dt.timedelta(days=int(new.trial_days))
    else:
        end = current.trial_ends_at if current is not None else None
        if end is None or end <= now:
            return out
        return _trial_limits(new, end)
    out.update(trial_ends_at=end, trial_ending_sent_at=None, trial_ended_sent_at=None)
    if end is not None and end > now:
        out.update(_trial_limits(new, end))
    return out


def _trial_limits(plan: t.Any, end: dt.datetime) -> dict[str, t.Any]:
    token_limit = plan.trial_token_limit if plan.trial_token_limit is not None else plan.token_limit
    cost_units = plan.trial_cost_units if plan.trial_cost_units is not None else plan.cost_units
    return {"prorated_token_limit": token_limit, "prorated_cost_units": cost_units, "prorated_until": end}


def prorate(in_force: int | None, old: int | None, new: int | None, remaining: Fraction) -> int | None:
    """The period's limit after a change: ``in_force`` with the remaining share moved from ``old`` to ``new``.

    ``in_force`` is the old plan's limit (or the prorated one of an earlier change);
    the result is the old limits for the elapsed shares plus ``new`` for the
    remaining one, rounded down, and never above the larger of ``in_force`` and
    ``new``. An unlimited new plan is unlimited; from an unlimited plan, the new
    limit applies whole (there is no finite share to carry), with usage carried.
    """
    if new is None:
        return None
    if in_force is None or old is None:
        return new
    prorated = math.floor(in_force + (new - old) * remaining)
    return max(0, min(prorated, max(in_force, new)))


def subscription_of(rt: Runtime, db: SQLAlchemy, billable: Billable) -> Subscription | None:
    with rt.store.engine.connect() as conn:
        row = conn.execute(
            sa.select(subs).where(subs.c.billable_type == billable[0], subs.c.billable_id == billable[1])
        ).first()
    return None if row is None else attach(db, Subscription, row)


M = t.TypeVar("M", bound=Base)


def attach(db: SQLAlchemy, model: type[M], row: t.Any) -> M:
    """The committed row as a ``model`` instance in the app's session, without any SQL.

    Read through metering's own connection, because the app's session may hold an
    older snapshot (MySQL's REPEATABLE READ) that cannot see what we just committed;
    then merged in with ``load=False``, so the app's pending objects are not flushed; an
    instance the session already holds keeps the app's own unflushed changes.
    """
    values = dict(row._mapping)
    key = db.session.identity_key(model, (values["id"],))
    loaded = db.session.identity_map.get(key)
    if loaded is not None:
        # Refresh what the app has not changed; its own pending changes stay pending.
        state = sa.inspect(loaded)
        for name, value in values.items():
            if name not in state.committed_state:
                set_committed_value(loaded, name, value)
        return t.cast(M, loaded)
    instance = model(**values)
    make_transient_to_detached(instance)
    return db.session.merge(instance, load=False)
