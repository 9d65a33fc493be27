"""Putting billables on plans, and moving them between plans.

A billable has at most one subscription row (a unique key says so). Moving it to
another plan mid-period bumps ``plan_version``: usage before the change stays on
the old plan's counter (and in reports), and from the moment of the change the
new plan's limits apply to a fresh counter, so the billable starts the rest of
the period with the new plan's whole allowance.
"""

from __future__ import annotations

import datetime as dt
import typing as t

import sqlalchemy as sa
from sqlalchemy.orm import make_transient_to_detached
from sqlalchemy.orm.attributes import set_committed_value

from .. import signals
from ..errors import InvalidUsage
from ..models import Plan
from ..models import Subscription
from ..models import table
from ..models import utcnow
from ..validation import billing_mode as check_mode
from .policy import Billable

if t.TYPE_CHECKING:
    from flask_sqlalchemy import SQLAlchemy

    from ..runtime import Runtime

subs = table(Subscription)
plans = table(Plan)

_DATES = ("started_at", "renews_at", "ends_at", "trial_ends_at", "grace_period_ends_at")


def _plan_row(conn: sa.Connection, plan: Plan | str) -> t.Any:
    if isinstance(plan, Plan):
        if plan.id is None:
            raise InvalidUsage("plan has no id yet: add and commit it before subscribing")
        clause = plans.c.id == plan.id
    elif isinstance(plan, str):
        clause = plans.c.slug == plan
    else:
        raise InvalidUsage(f"plan must be a Plan or a plan slug, got {type(plan).__name__}")
    row = conn.execute(sa.select(plans.c.id, plans.c.slug, plans.c.is_active).where(clause)).first()
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
        now = utcnow()
        where = sa.and_(subs.c.billable_type == billable[0], subs.c.billable_id == billable[1])
        current = conn.execute(
            sa.select(subs.c.id, subs.c.plan_id, plans.c.slug)
            .join(plans, plans.c.id == subs.c.plan_id)
            .where(where)
            .with_for_update()
        ).first()
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
                )
                changes.append((current.slug, new.slug))
            conn.execute(sa.update(subs).where(subs.c.id == current.id).values(**values))
        return int(conn.execute(sa.select(subs.c.id).where(where)).scalar_one())

    for _ in range(3):
        try:
            sub_id = rt.store.run(work)
            break
        except _Retry:
            continue
    for old, new_slug in changes:
        signals.plan_changed.send(rt.app, billable=billable, old_plan=old, new_plan=new_slug, subscription_id=sub_id)
    with rt.store.engine.connect() as conn:
        row = conn.execute(sa.select(subs).where(subs.c.id == sub_id)).one()
    return _attach(db, row)


class _Retry(Exception):
    pass


def subscription_of(rt: Runtime, db: SQLAlchemy, billable: Billable) -> Subscription | None:
    with rt.store.engine.connect() as conn:
        row = conn.execute(
            sa.select(subs).where(subs.c.billable_type == billable[0], subs.c.billable_id == billable[1])
        ).first()
    return None if row is None else _attach(db, row)


def _attach(db: SQLAlchemy, row: t.Any) -> Subscription:
    """The committed row as a ``Subscription`` in the app's session, without any SQL.

    Read through metering's own connection, because the app's session may hold an
    older snapshot (MySQL's REPEATABLE READ) that cannot see what we just committed;
    then merged in with ``load=False``, so the app's pending objects are not flushed; an
    instance the session already holds keeps the app's own unflushed changes.
    """
    values = dict(row._mapping)
    key = db.session.identity_key(Subscription, (values["id"],))
    loaded = db.session.identity_map.get(key)
    if loaded is not None:
        # Refresh what the app has not changed; its own pending changes stay pending.
        state = sa.inspect(loaded)
        for name, value in values.items():
            if name not in state.committed_state:
                set_committed_value(loaded, name, value)
        return t.cast(Subscription, loaded)
    sub = Subscription(**values)
    make_transient_to_detached(sub)
    return db.session.merge(sub, load=False)
