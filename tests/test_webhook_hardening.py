"""Stripe webhooks: stale events ignored, customer look-up opt-in, malformed events 400, a shipped route."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import typing as t

import pytest
from flask import Flask
from flask import abort
from flask import current_app
from flask import request

from flask_ai_metering import AiMetering
from flask_ai_metering.billing.webhooks import handle_stripe_webhook
from flask_ai_metering.errors import ConfigurationError
from flask_ai_metering.errors import InvalidUsage
from tests.conftest import add_plan

if t.TYPE_CHECKING:
    from tests.conftest import AppFactory

stripe = pytest.importorskip("stripe")

SECRET = "whsec_hardening"
TEAM = ("Team", "1")
URL = "/ai-metering/stripe/webhook"


def signed(body: t.Any, secret: str = SECRET) -> tuple[bytes, str]:
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    stamp = int(time.time())
    digest = hmac.new(secret.encode(), f"{stamp}.".encode() + payload, hashlib.sha256).hexdigest()
    return payload, f"t={stamp},v1={digest}"


def event(kind: str, obj: dict[str, t.Any], created: int | None = None, eid: str = "evt_1") -> dict[str, t.Any]:
    body: dict[str, t.Any] = {"id": eid, "object": "event", "type": kind, "data": {"object": obj}}
    if created is not None:
        body["created"] = created
    return body


def hook_app(make_app: AppFactory, **config: t.Any) -> tuple[Flask, AiMetering]:
    app, db, meter = make_app(AI_METERING_STRIPE_WEBHOOK_SECRET=SECRET, **config)
    with app.app_context():
        add_plan(db, slug="tiny", token_limit=1000)
    return app, meter


# -- stale events -----------------------------------------------------------------------------


def test_an_older_update_delivered_after_the_deletion_does_not_revive_the_subscription(make_app: AppFactory) -> None:
    app, meter = hook_app(make_app)
    now = int(time.time())
    with app.app_context():
        meter.subscribe(TEAM, "tiny", stripe_customer_id="cus_order", stripe_subscription_id="sub_order")
        assert meter.check(TEAM).allowed
        older = event(
            "customer.subscription.updated",
            {"id": "sub_order", "customer": "cus_order", "status": "active", "current_period_end": now + 86400 * 20},
            created=now - 600,
            eid="evt_A",
        )
        deleted = event(
            "customer.subscription.deleted",
            {"id": "sub_order", "customer": "cus_order", "status": "canceled", "ended_at": now - 300},
            created=now - 300,
            eid="evt_B",
        )
        handle_stripe_webhook(meter, *signed(deleted))
        assert not meter.check(TEAM).allowed
        handle_stripe_webhook(meter, *signed(older))  # Stripe's late retry of the earlier event
        sub = meter.subscription(TEAM)
        assert sub is not None and sub.ends_at is not None and not sub.is_active()
        assert not meter.check(TEAM).allowed
        # A newer event still applies (and a redelivery of the same one changes nothing more).
        newer = event("customer.subscription.updated", {"id": "sub_order", "status": "active"}, created=now)
        handle_stripe_webhook(meter, *signed(newer))
        assert meter.check(TEAM).allowed


# -- customer look-up -------------------------------------------------------------------------


def test_the_customer_look_up_is_opt_in(make_app: AppFactory) -> None:
    app, meter = hook_app(make_app)
    with app.app_context():
        meter.subscribe(TEAM, "tiny", stripe_customer_id="cus_multi")
        addon_deleted = event("customer.subscription.deleted", {"id": "sub_ADDON", "customer": "cus_multi"})
        handle_stripe_webhook(meter, *signed(addon_deleted))
        sub = meter.subscription(TEAM)
        assert sub is not None and sub.ends_at is None and sub.stripe_subscription_id is None
        assert meter.check(TEAM).allowed


def test_with_the_customer_look_up_another_subscription_of_the_customer_never_matches(make_app: AppFactory) -> None:
    app, meter = hook_app(make_app, AI_METERING_STRIPE_WEBHOOK_MATCH_CUSTOMER=True)
    with app.app_context():
        meter.subscribe(TEAM, "tiny", stripe_customer_id="cus_multi", stripe_subscription_id="sub_MAIN")
        addon_deleted = event("customer.subscription.deleted", {"id": "sub_ADDON", "customer": "cus_multi"})
        handle_stripe_webhook(meter, *signed(addon_deleted))
        sub = meter.subscription(TEAM)
        assert sub is not None and sub.ends_at is None and sub.stripe_subscription_id == "sub_MAIN"
        # A subscription that names none is found by its customer and remembers the id.
        meter.subscribe(("Team", "2"), "tiny", stripe_customer_id="cus_two")
        handle_stripe_webhook(
            meter, *signed(event("customer.subscription.updated", {"id": "sub_2", "customer": "cus_two"}))
        )
        other = meter.subscription(("Team", "2"))
        assert other is not None and other.stripe_subscription_id == "sub_2"


# -- malformed events ------------------------------------------------------------------------

MALFORMED: list[t.Any] = [
    [],
    {"type": "customer.subscription.updated"},
    {"type": "customer.subscription.updated", "data": {"object": "sub_1"}},
    {"type": 7, "data": {"object": {}}},
    event("customer.subscription.deleted", {"id": "sub_1", "ended_at": 10**20}),
    event("customer.subscription.deleted", {"id": "sub_1", "ended_at": "soon"}),
    event("customer.subscription.updated", {"id": "sub_1", "status": "active", "items": {"data": "x"}}),
    event("customer.subscription.updated", {"id": "sub_1", "status": "active", "items": "x"}),
    event("customer.subscription.updated", {"id": "sub_1", "status": "active", "cancel_at": -5}),
    event("customer.subscription.updated", {"id": ["sub_1"], "status": "active"}),
    event("customer.subscription.updated", {"id": "sub_1", "status": "active"}, created=10**20),
    event("invoice.payment_failed", {"customer": 42, "parent": "x"}),
]


@pytest.mark.parametrize("body", MALFORMED, ids=range(len(MALFORMED)))
def test_a_malformed_signed_event_is_a_named_error(make_app: AppFactory, body: t.Any) -> None:
    app, meter = hook_app(make_app, AI_METERING_STRIPE_WEBHOOK_MATCH_CUSTOMER=True)
    with app.app_context():
        meter.subscribe(TEAM, "tiny", stripe_customer_id="cus_1", stripe_subscription_id="sub_1")
        with pytest.raises(InvalidUsage):
            handle_stripe_webhook(meter, *signed(body))
        sub = meter.subscription(TEAM)
        assert sub is not None and sub.ends_at is None


# -- the shipped route -----------------------------------------------------------------------


def test_the_route_is_opt_in(make_app: AppFactory) -> None:
    app, _ = hook_app(make_app)
    assert app.test_client().post(URL, data=b"{}").status_code == 404


def test_the_route_needs_a_signing_secret(make_app: AppFactory) -> None:
    with pytest.raises(ConfigurationError, match="AI_METERING_STRIPE_WEBHOOK_SECRET"):
        make_app(AI_METERING_STRIPE_WEBHOOK_ROUTE=True)


def post(app: Flask, body: t.Any, secret: str = SECRET) -> t.Any:
    payload, header = signed(body, secret)
    return app.test_client().post(URL, data=payload, headers={"Stripe-Signature": header})


def test_the_route_applies_events_and_answers_400_to_bad_ones(make_app: AppFactory) -> None:
    app, meter = hook_app(make_app, AI_METERING_STRIPE_WEBHOOK_ROUTE=True)
    with app.app_context():
        meter.subscribe(TEAM, "tiny", stripe_subscription_id="sub_r")
    client = app.test_client()
    assert client.get(URL).status_code == 405  # POST only
    assert client.get("/ai-metering/").status_code == 403  # the dashboard stays closed
    bad_signature = post(app, event("customer.subscription.deleted", {"id": "sub_r"}), secret="whsec_other")
    assert bad_signature.status_code == 400 and bad_signature.json["error"] == "bad_signature"
    assert client.post(URL, data=b"{}").status_code == 400  # no signature at all
    for body in MALFORMED:
        response = post(app, body)
        assert response.status_code == 400 and response.json["error"] == "bad_event", body
    assert post(app, b"not json").status_code == 400
    with app.app_context():
        assert meter.check(TEAM).allowed
    applied = post(app, event("customer.subscription.deleted", {"id": "sub_r", "status": "canceled"}))
    assert applied.status_code == 204
    assert post(app, event("some.unknown.event", {"id": "x"})).status_code == 204
    with app.app_context():
        assert not meter.check(TEAM).allowed


class FakeCSRFProtect:
    """Flask-WTF's ``CSRFProtect`` as far as this matters: every POST needs a token unless exempt."""

    def __init__(self, app: Flask) -> None:
        self._exempt_views: set[str] = set()
        app.extensions["csrf"] = self
        app.before_request(self.protect)

    def exempt(self, view: t.Any) -> t.Any:
        self._exempt_views.add(view if isinstance(view, str) else f"{view.__module__}.{view.__name__}")
        return view

    def protect(self) -> None:
        if request.method != "POST":
            return
        view = current_app.view_functions.get(request.endpoint or "")
        if view is not None and f"{view.__module__}.{view.__name__}" in self._exempt_views:
            return
        abort(400, "The CSRF token is missing.")


def test_the_route_is_exempt_from_csrf_protection_set_up_after_us(make_app: AppFactory) -> None:
    app, meter = hook_app(make_app, AI_METERING_STRIPE_WEBHOOK_ROUTE=True)
    FakeCSRFProtect(app)
    with app.app_context():
        meter.subscribe(TEAM, "tiny", stripe_subscription_id="sub_c")
    response = post(app, event("customer.subscription.deleted", {"id": "sub_c", "status": "canceled"}))
    assert response.status_code == 204
    with app.app_context():
        assert not meter.check(TEAM).allowed


@pytest.mark.parametrize("deleted_first", [True, False], ids=["deleted-first", "updated-first"])
def test_an_update_of_the_same_second_as_the_deletion_does_not_revive_it(
    make_app: AppFactory, deleted_first: bool
) -> None:
    """Stripe's ``created`` counts seconds: two events of one second arrive in either order, and the end wins."""
    app, meter = hook_app(make_app)
    now = int(time.time())
    with app.app_context():
        meter.subscribe(TEAM, "tiny", stripe_customer_id="cus_tie", stripe_subscription_id="sub_tie")
        updated = event(
            "customer.subscription.updated",
            {"id": "sub_tie", "customer": "cus_tie", "status": "active", "current_period_end": now + 86400 * 20},
            created=now - 60,
            eid="evt_U",
        )
        deleted = event(
            "customer.subscription.deleted",
            {"id": "sub_tie", "customer": "cus_tie", "status": "canceled", "ended_at": now - 60},
            created=now - 60,
            eid="evt_D",
        )
        for body in (deleted, updated) if deleted_first else (updated, deleted):
            handle_stripe_webhook(meter, *signed(body))
        sub = meter.subscription(TEAM)
        assert sub is not None and sub.ends_at is not None and not sub.is_active()
        assert not meter.check(TEAM).allowed
