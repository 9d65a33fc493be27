"""Map verified Stripe webhook events onto our subscriptions.

Stripe delivers events at least once and in any order, so every change here is
an absolute SET computed from the event (a redelivery changes nothing more), and
the ``subscription_expired`` signal fires only for the delivery that changed
``ends_at``. A subscription is found by ``stripe_subscription_id``, else by
``stripe_customer_id`` (and then remembers the subscription id).

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

In a view::

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
    :raises ValueError: the payload is not JSON.
    :raises ConfigurationError: no signing secret is configured.
    """
    import stripe

    rt: Runtime = meter_or_runtime.runtime() if hasattr(meter_or_runtime, "runtime") else meter_or_runtime
    secret = secret or rt.settings.stripe_webhook_secret
    if not secret:
        raise ConfigurationError(f"{ConfigVars.STRIPE_WEBHOOK_SECRET} is needed to verify Stripe webhooks")
    event = stripe.Webhook.construct_event(payload, signature, secret)
    data = event.to_dict()
    obj = data["data"]["object"]
    at = now or utcnow()
    kind = data["type"]
    if kind == "customer.subscription.updated":
        _apply(rt, obj.get("id"), obj.get("customer"), _updated_values(obj, at))
    elif kind == "customer.subscription.deleted":
        ended = _time(obj.get("ended_at")) or at
        _apply(rt, obj.get("id"), obj.get("customer"), {"ends_at": ended, "grace_period_ends_at": None}, expire_at=at)
    elif kind == "invoice.payment_failed":
        days = rt.settings.payment_failure_grace_days
        values = {"ends_at": at, "grace_period_ends_at": at + dt.timedelta(days=days)}
        _apply(
            rt, _invoice_subscription(obj), obj.get("customer"), values, expire_at=at if days == 0 else None, once=True
        )
    return event


def _updated_values(obj: dict[str, t.Any], at: dt.datetime) -> dict[str, t.Any]:
    period_end = _period_end(obj)
    values: dict[str, t.Any] = {}
    if period_end is not None:
        values["renews_at"] = period_end
    if obj.get("trial_end"):
        values["trial_ends_at"] = _time(obj["trial_end"])
    status = obj.get("status")
    if status in _LIVE:
        values["grace_period_ends_at"] = None
        values["ends_at"] = _time(obj.get("cancel_at")) or (period_end if obj.get("cancel_at_period_end") else None)
    elif status in _ENDED:
        values["ends_at"] = _time(obj.get("ended_at")) or at
    return values


def _period_end(obj: dict[str, t.Any]) -> dt.datetime | None:
    """The current period's end: on the subscription before API 2025-03-31, on its items after."""
    if obj.get("current_period_end"):
        return _time(obj["current_period_end"])
    ends = [i.get("current_period_end") for i in (obj.get("items") or {}).get("data", [])]
    ends = [e for e in ends if e]
    return _time(max(ends)) if ends else None


def _invoice_subscription(invoice: dict[str, t.Any]) -> str | None:
    """The invoice's subscription id, wherever this API version keeps it."""
    if isinstance(invoice.get("subscription"), str):
        return t.cast(str, invoice["subscription"])
    details = ((invoice.get("parent") or {}).get("subscription_details") or {}).get("subscription")
    return details if isinstance(details, str) else None


def _time(value: t.Any) -> dt.datetime | None:
    return dt.datetime.fromtimestamp(int(value), dt.timezone.utc) if value else None


def _apply(
    rt: Runtime,
    subscription_id: str | None,
    customer_id: str | None,
    values: dict[str, t.Any],
    *,
    expire_at: dt.datetime | None = None,
    once: bool = False,
) -> None:
    """Write ``values`` to the matching subscription; send ``subscription_expired`` if it just ended.

    :param expire_at: the change ends the subscription at this instant.
    :param once: leave a subscription already in a grace period as it is.
    """

    def work(conn: sa.Connection) -> tuple[t.Any, bool]:
        row = None
        if subscription_id:
            row = conn.execute(sa.select(subs).where(subs.c.stripe_subscription_id == subscription_id)).first()
        if row is None and customer_id:
            row = conn.execute(sa.select(subs).where(subs.c.stripe_customer_id == customer_id)).first()
        if row is None or (once and row.grace_period_ends_at is not None):
            return None, False
        changes = dict(values, updated_at=utcnow())
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
