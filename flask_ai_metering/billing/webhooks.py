"""Map verified Stripe webhook events onto our subscriptions.

Stripe delivers events at least once and in any order, so every change here is
an absolute SET computed from the event (a redelivery changes nothing more), and
the ``subscription_expired`` signal fires only for the delivery that changed
``ends_at``. Each subscription keeps the ``created`` time of the last event
applied to it (``stripe_event_at``); an older event delivered later is ignored,
so a late retry of an ``updated`` cannot revive a subscription a ``deleted`` ended
(nor can one of the same second, in whichever order the two arrive).

A subscription is found by ``stripe_subscription_id``. Only with
``AI_METERING_STRIPE_WEBHOOK_MATCH_CUSTOMER`` is one without that id found by its
``stripe_customer_id`` (and then remembers the subscription id); a subscription
that already names another Stripe subscription is never matched by its customer,
so an add-on subscription of the same customer cannot end it.

A signed event whose shape is not what Stripe sends raises
:class:`~flask_ai_metering.errors.InvalidUsage` (a ``ValueError``): answer 400.

=================================  ==============================================
``customer.subscription.updated``  ``renews_at`` from the current period's end;
                                   active/trialing: ``ends_at`` from
                                   ``cancel_at``/``cancel_at_period_end`` (else
                                   none) and any payment grace period cleared;
                                   canceled: ``ends_at`` = ``ended_at``.
``customer.subscription.deleted``  ``ends_at`` = ``ended_at`` (or now), grace
                                   cleared, ``subscription_expired`` sent.
``invoice.payment_failed``         ``ends_at`` = now and ``grace_period_ends_at``
                                   = now + ``AI_METERING_PAYMENT_FAILURE_GRACE_PERIOD``
                                   days, once (Stripe's retries do not extend it);
                                   0 days ends the subscription now.
=================================  ==============================================

The shipped route (``AI_METERING_STRIPE_WEBHOOK_ROUTE = True``) serves
``POST <dashboard prefix>/stripe/webhook``: 204 when applied or ignored, 400 for a
bad signature or a malformed event. In a view of your own::

    @app.post("/stripe/webhook")
    def stripe_webhook():
        try:
            handle_stripe_webhook(meter, request.get_data(), request.headers.get("Stripe-Signature", ""))
        except (ValueError, stripe.SignatureVerificationError):
            abort(400)
        return "", 204
"""

from __future__ import annotations

import datetime as dt
import typing as t

import sqlalchemy as sa

from .. import signals
from ..config import ConfigVars
from ..errors import ConfigurationError
from ..errors import InvalidUsage
from ..models import Subscription
from ..models import table
from ..models import utcnow

if t.TYPE_CHECKING:
    from ..runtime import Runtime

subs = table(Subscription)

_LIVE = ("active", "trialing")
_ENDED = ("canceled", "incomplete_expired")


def handle_stripe_webhook(
    meter_or_runtime: t.Any,
    payload: bytes,
    signature: str,
    *,
    secret: str | None = None,
    now: dt.datetime | None = None,
) -> t.Any:
    """Verify a Stripe webhook and apply it to the matching subscription; return the event.

    :param meter_or_runtime: the ``AiMetering`` instance (inside an app context) or a runtime.
    :param payload: the request body, exactly as received (``request.get_data()``).
    :param signature: the ``Stripe-Signature`` header.
    :param secret: the endpoint's signing secret (default ``AI_METERING_STRIPE_WEBHOOK_SECRET``).
    :raises stripe.SignatureVerificationError: the signature is wrong or too old (answer 400).
    :raises ValueError: the payload is not JSON, or (:class:`InvalidUsage`) a signed
        event does not have the shape Stripe sends (answer 400).
    :raises ConfigurationError: no signing secret is configured.
    """
    import stripe

    rt: Runtime = meter_or_runtime.runtime() if hasattr(meter_or_runtime, "runtime") else meter_or_runtime
    secret = secret or rt.settings.stripe_webhook_secret
    if not secret:
        raise ConfigurationError(f"{ConfigVars.STRIPE_WEBHOOK_SECRET} is needed to verify Stripe webhooks")
    try:
        event = stripe.Webhook.construct_event(payload, signature, secret)
        data = event.to_dict()
    except stripe.SignatureVerificationError:
        raise
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise InvalidUsage(f"the webhook payload is not a Stripe event ({type(exc).__name__})") from None
    at = now or utcnow()
    kind, obj, created = _shape(data)
    match_customer = rt.settings.stripe_webhook_match_customer
    try:
        if kind == "customer.subscription.updated":
            values = _updated_values(obj, at)
            _apply(rt, _id(obj, "id"), _id(obj, "customer"), values, created=created, match_customer=match_customer)
        elif kind == "customer.subscription.deleted":
            ended = _time(obj.get("ended_at"), "ended_at") or at
            _apply(
                rt,
                _id(obj, "id"),
                _id(obj, "customer"),
                {"ends_at": ended, "grace_period_ends_at": None},
                expire_at=at,
                created=created,
                match_customer=match_customer,
            )
        elif kind == "invoice.payment_failed":
            days = rt.settings.payment_failure_grace_days
            values = {"ends_at": at, "grace_period_ends_at": at + dt.timedelta(days=days)}
            _apply(
                rt,
                _invoice_subscription(obj),
                _id(obj, "customer"),
                values,
                expire_at=at if days == 0 else None,
                once=True,
                created=created,
                match_customer=match_customer,
            )
    except (KeyError, TypeError, AttributeError) as exc:
        raise InvalidUsage(f"malformed {kind} event ({type(exc).__name__})") from None
    return event


def _shape(data: t.Any) -> tuple[str, dict[str, t.Any], dt.datetime | None]:
    """The event's type, object and ``created`` time; InvalidUsage unless Stripe's shape."""
    if not isinstance(data, dict):
        raise InvalidUsage("the webhook payload is not a Stripe event (not an object)")
    kind = data.get("type")
    inner = data.get("data")
    obj = inner.get("object") if isinstance(inner, dict) else None
    if not isinstance(kind, str) or not isinstance(obj, dict):
        raise InvalidUsage("the webhook payload is not a Stripe event (no type or data.object)")
    return kind, obj, _time(data.get("created"), "created")


def _id(obj: dict[str, t.Any], field: str) -> str | None:
    """A Stripe id field: a string (or an expanded object's id), else None."""
    value = obj.get(field)
    if isinstance(value, dict):
        value = value.get("id")
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > 255 or "\x00" in value:
        raise InvalidUsage(f"malformed Stripe event: {field} is not an id")
    return value


def _updated_values(obj: dict[str, t.Any], at: dt.datetime) -> dict[str, t.Any]:
    period_end = _period_end(obj)
    values: dict[str, t.Any] = {}
    if period_end is not None:
        values["renews_at"] = period_end
    if obj.get("trial_end"):
        values["trial_ends_at"] = _time(obj["trial_end"], "trial_end")
    status = obj.get("status")
    if status in _LIVE:
        values["grace_period_ends_at"] = None
        cancel_at = _time(obj.get("cancel_at"), "cancel_at")
        values["ends_at"] = cancel_at or (period_end if obj.get("cancel_at_period_end") else None)
    elif status in _ENDED:
        values["ends_at"] = _time(obj.get("ended_at"), "ended_at") or at
    return values


def _period_end(obj: dict[str, t.Any]) -> dt.datetime | None:
    """The current period's end: on the subscription before API 2025-03-31, on its items after."""
    if obj.get("current_period_end"):
        return _time(obj["current_period_end"], "current_period_end")
    items = obj.get("items") or {}
    data = items.get("data", []) if isinstance(items, dict) else None
    if not isinstance(data, list) or not all(isinstance(i, dict) for i in data):
        raise InvalidUsage("malformed Stripe subscription: items.data is not a list of items")
    ends = [_time(i.get("current_period_end"), "items.data.current_period_end") for i in data]
    known = [e for e in ends if e is not None]
    return max(known) if known else None


def _invoice_subscription(invoice: dict[str, t.Any]) -> str | None:
    """The invoice's subscription id, wherever this API version keeps it."""
    if isinstance(invoice.get("subscription"), str):
        return _id(invoice, "subscription")
    parent = invoice.get("parent")
    details = parent.get("subscription_details") if isinstance(parent, dict) else None
    found = details.get("subscription") if isinstance(details, dict) else None
    return _id({"subscription": found}, "subscription") if isinstance(found, str) else None


#: Unix times Stripe can send: from 1970 to the year 9999 (a datetime's range).
_MAX_TIMESTAMP = 253_402_300_799


def _time(value: t.Any, field: str = "time") -> dt.datetime | None:
    """A Stripe Unix timestamp (None/0 for none); InvalidUsage for anything else."""
    if value is None or value == 0:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= _MAX_TIMESTAMP:
        raise InvalidUsage(f"malformed Stripe event: {field} is not a Unix timestamp")
    return dt.datetime.fromtimestamp(value, dt.timezone.utc)


def _reopens(row: t.Any, values: dict[str, t.Any]) -> bool:
    """``values`` would clear or postpone the end of a subscription that has one.

    Stripe's ``created`` has one-second resolution, so two events of one second arrive in
    either order: between them an end wins, as a deletion is final.
    """
    if row.ends_at is None or "ends_at" not in values:
        return False
    return values["ends_at"] is None or values["ends_at"] > row.ends_at


def _apply(
    rt: Runtime,
    subscription_id: str | None,
    customer_id: str | None,
    values: dict[str, t.Any],
    *,
    expire_at: dt.datetime | None = None,
    once: bool = False,
    created: dt.datetime | None = None,
    match_customer: bool = False,
) -> None:
    """Write ``values`` to the matching subscription; send ``subscription_expired`` if it just ended.

    :param expire_at: the change ends the subscription at this instant.
    :param once: leave a subscription already in a grace period as it is.
    :param created: the event's ``created``: an event older than the last one
        applied to the subscription changes nothing.
    :param match_customer: find the subscription by ``customer_id`` when none has
        ``subscription_id`` (only one that names no other Stripe subscription).
    """

    def work(conn: sa.Connection) -> tuple[t.Any, bool]:
        row = None
        if subscription_id:
            row = conn.execute(
                sa.select(subs).where(subs.c.stripe_subscription_id == subscription_id).with_for_update()
            ).first()
        if row is None and customer_id and match_customer:
            row = conn.execute(
                sa.select(subs).where(subs.c.stripe_customer_id == customer_id).with_for_update()
            ).first()
            if row is not None and subscription_id and row.stripe_subscription_id not in (None, subscription_id):
                return None, False  # another Stripe subscription of the customer (an add-on, say)
        if row is None or (once and row.grace_period_ends_at is not None):
            return None, False
        if created is not None and row.stripe_event_at is not None:
            if created < row.stripe_event_at:
                return None, False  # a late retry of an older event: what came after it stands
            if created == row.stripe_event_at and _reopens(row, values):
                return None, False  # the same second as the event that ended it: the end stands
        changes = dict(values, updated_at=utcnow())
        if created is not None:
            changes["stripe_event_at"] = created
        if subscription_id and row.stripe_subscription_id is None:
            changes["stripe_subscription_id"] = subscription_id
        conn.execute(sa.update(subs).where(subs.c.id == row.id).values(**changes))
        if expire_at is None:
            return row, False
        in_grace = row.grace_period_ends_at is not None and row.grace_period_ends_at > expire_at
        return row, row.ends_at is None or row.ends_at > expire_at or in_grace

    row, expired = rt.store.run(work)
    if expired:
        signals.subscription_expired.send(
            rt.app, billable=(row.billable_type, row.billable_id), subscription_id=int(row.id)
        )
