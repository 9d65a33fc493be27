"""The Stripe driver against localstripe through the real ``stripe`` SDK, and Stripe webhooks.

localstripe ignores ``Idempotency-Key``, so every exactly-once result here comes
from the driver's own records and its metadata look-up, not from Stripe's.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import time
import typing as t
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa
from flask import Flask

from flask_ai_metering import AiMetering
from flask_ai_metering import signals
from flask_ai_metering.billing import sync as sync_module
from flask_ai_metering.billing.sync import OverageSyncer
from flask_ai_metering.billing.webhooks import handle_stripe_webhook
from flask_ai_metering.models import Overage
from flask_ai_metering.models import Subscription
from flask_ai_metering.models import utcnow
from flask_ai_metering.ops.reconcile import reconcile
from tests.conftest import add_plan
from tests.conftest import concurrently
from tests.stripe_server import API_KEY
from tests.stripe_server import StripeServer

if t.TYPE_CHECKING:
    from tests.conftest import AppFactory

stripe = pytest.importorskip("stripe")

TEAM = ("team", "1")
PRICES = {"manual": {"models": {"m": {"input_price_per_1k": "0.001", "output_price_per_1k": "0.001"}}}}
SECRET = "whsec_test_secret"


@pytest.fixture(scope="module")
def stripe_server(tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[StripeServer]:
    with StripeServer(tmp_path_factory.mktemp("localstripe")) as server:
        yield server


@pytest.fixture
def client(stripe_server: StripeServer) -> t.Any:
    return stripe.StripeClient(API_KEY, base_addresses={"api": stripe_server.url}, max_network_retries=0)


def stripe_app(make_app: AppFactory, server: StripeServer, client: t.Any, price: str) -> tuple[Flask, AiMetering, str]:
    """An app billing overage to a fresh localstripe customer."""
    app, db, meter = make_app(
        AI_METERING_OVERAGE_BEHAVIOR="charge",
        AI_METERING_BILLING_DRIVER="stripe",
        AI_METERING_STRIPE_API_KEY=API_KEY,
        AI_METERING_STRIPE_API_BASE=server.url,
        AI_METERING_PROVIDERS=PRICES,
    )
    customer = client.v1.customers.create(params={"email": "team-1@example.com"}).id
    with app.app_context():
        add_plan(db, slug="pro", token_limit=1000, overage_price_per_1k_tokens=Decimal(price))
        meter.subscribe(TEAM, "pro", stripe_customer_id=customer)
    return app, meter, customer


def syncer(meter: AiMetering) -> OverageSyncer:
    return t.cast(OverageSyncer, meter.runtime().billing)


def use(meter: AiMetering, tokens: int) -> None:
    meter.call(lambda: "ok", billable=TEAM, provider="manual", model="m", usage={"input_tokens": tokens})


def invoice_items(client: t.Any, customer: str) -> list[t.Any]:
    return list(client.v1.invoice_items.list(params={"customer": customer, "limit": 100}).auto_paging_iter())


def overage_rows(meter: AiMetering) -> list[t.Any]:
    table = Overage.__table__
    with meter.runtime().store.engine.connect() as conn:
        return list(conn.execute(sa.select(table).order_by(table.c.id)))


def test_overage_reaches_stripe_once_after_two_syncs(
    make_app: AppFactory, stripe_server: StripeServer, client: t.Any
) -> None:
    app, meter, customer = stripe_app(make_app, stripe_server, client, price="0.5")
    with app.app_context():
        use(meter, 1000)
        use(meter, 1234)  # 1234 tokens past the limit at 0.50 per 1k: 0.617
        runner = app.test_cli_runner()
        first = runner.invoke(args=["ai-metering", "sync-stripe-overages"])
        second = runner.invoke(args=["ai-metering", "sync-stripe-overages"])
        assert first.exit_code == 0 and "Synced 1 overage(s) (61 usd minor units)" in first.output
        assert second.exit_code == 0 and "Synced 0 overage(s)" in second.output
        items = invoice_items(client, customer)
        [row] = overage_rows(meter)
        assert [(i.id, i.amount, i.currency) for i in items] == [(row.stripe_id, 61, "usd")]
        assert items[0].metadata.to_dict()["ai_metering_overage_id"] == str(row.id)
        assert (row.status, row.synced_amount_minor, row.amount) == ("synced", 61, Decimal("0.617"))
        assert reconcile(meter.runtime()) == []


def test_two_syncs_at_the_same_time_create_each_item_once(
    make_app: AppFactory, stripe_server: StripeServer, client: t.Any
) -> None:
    app, meter, customer = stripe_app(make_app, stripe_server, client, price="10")
    with app.app_context():
        use(meter, 1000)
        for _ in range(12):
            use(meter, 3)
        driver = syncer(meter)
    reports = concurrently(driver.sync_overages)
    assert sorted(r.synced for r in reports) != [] and sum(r.synced for r in reports) == 12
    items = invoice_items(client, customer)
    assert len(items) == 12 and {i.amount for i in items} == {3}
    assert len({i.metadata.to_dict()["ai_metering_overage_id"] for i in items}) == 12


def die_after_stripe_accepts(driver: OverageSyncer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run a sync that dies after Stripe accepted each item, before we wrote it down."""

    def killed(*args: t.Any, **kwargs: t.Any) -> bool:
        raise SystemExit("process killed before it wrote down the invoice item")

    with monkeypatch.context() as patch:
        patch.setattr(sync_module, "mark_synced", killed)
        with pytest.raises(SystemExit):
            driver.sync_overages()


def test_a_sync_killed_after_stripe_accepted_the_item_bills_once(
    make_app: AppFactory, stripe_server: StripeServer, client: t.Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, meter, customer = stripe_app(make_app, stripe_server, client, price="1")
    with app.app_context():
        use(meter, 1000)
        use(meter, 420)
        use(meter, 80)
        driver = syncer(meter)

        die_after_stripe_accepts(driver, monkeypatch)
        assert [i.amount for i in invoice_items(client, customer)] == [42]
        assert [r.status for r in overage_rows(meter)] == ["syncing", "syncing"]  # both were claimed
        # The re-run after the claim went stale looks the item up instead of creating it again.
        report = driver.sync_overages(now=utcnow() + dt.timedelta(hours=1))
        assert report.synced == 2 and report.ok
        items = invoice_items(client, customer)
        rows = overage_rows(meter)
        assert sorted(i.amount for i in items) == [8, 42]
        assert {i.id for i in items} == {r.stripe_id for r in rows}
        assert [(r.status, r.sync_attempts) for r in rows] == [("synced", 2), ("synced", 2)]


def test_a_retry_bills_the_customer_of_the_first_claim(
    make_app: AppFactory, stripe_server: StripeServer, client: t.Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, meter, customer = stripe_app(make_app, stripe_server, client, price="1")
    with app.app_context():
        use(meter, 1500)
        driver = syncer(meter)

        die_after_stripe_accepts(driver, monkeypatch)
        # The billable moves to another Stripe customer before the retry.
        other = client.v1.customers.create(params={"email": "moved@example.com"}).id
        meter.subscribe(TEAM, "pro", stripe_customer_id=other)
        report = driver.sync_overages(now=utcnow() + dt.timedelta(hours=1))
        assert report.synced == 1 and report.ok
        assert [i.amount for i in invoice_items(client, customer)] == [50]  # found again, not re-created
        assert invoice_items(client, other) == []
        assert [r.stripe_customer_id for r in overage_rows(meter)] == [customer]


def test_remainders_are_carried_to_the_next_sync_exactly(
    make_app: AppFactory, stripe_server: StripeServer, client: t.Any
) -> None:
    app, meter, customer = stripe_app(make_app, stripe_server, client, price="0.013")
    with app.app_context():
        use(meter, 1000)
        driver = syncer(meter)
        for tokens in (100, 250, 333, 999, 1, 777, 500, 640):
            use(meter, tokens)
            driver.sync_overages()
        rows = overage_rows(meter)
        exact = sum((r.amount for r in rows), Decimal(0))  # 3600 tokens at 0.013 per 1k
        billed = sum(i.amount for i in invoice_items(client, customer))
        assert exact == Decimal("0.0468") and billed == 4
        # Cumulative cents 0.13, 0.455, 0.8879, 2.1866, 2.1879, 3.198, 3.848, 4.68, billed as they add up.
        assert [r.synced_amount_minor for r in rows] == [0, 0, 0, 2, 0, 1, 0, 1]
        assert exact - Decimal(billed) / 100 == Decimal("0.0068")
        assert all(r.status == "synced" for r in rows) and reconcile(meter.runtime()) == []


def test_immediate_strategy_syncs_after_the_commit(
    make_app: AppFactory, stripe_server: StripeServer, client: t.Any
) -> None:
    app, db, meter = make_app(
        AI_METERING_OVERAGE_BEHAVIOR="charge",
        AI_METERING_OVERAGE_SYNC_STRATEGY="immediate",
        AI_METERING_BILLING_DRIVER="stripe",
        AI_METERING_STRIPE_API_KEY=API_KEY,
        AI_METERING_STRIPE_API_BASE=stripe_server.url,
        AI_METERING_PROVIDERS=PRICES,
    )
    customer = client.v1.customers.create(params={}).id
    with app.app_context():
        add_plan(db, slug="pro", token_limit=10, overage_price_per_1k_tokens=Decimal("100"))
        meter.subscribe(TEAM, "pro", stripe_customer_id=customer)
        use(meter, 15)
        syncer(meter).wait(30)
        assert [i.amount for i in invoice_items(client, customer)] == [50]


# -- webhooks ------------------------------------------------------------------------


def signed(event: dict[str, t.Any], secret: str = SECRET, at: int | None = None) -> tuple[bytes, str]:
    """The body and ``Stripe-Signature`` header, computed the way Stripe signs."""
    payload = json.dumps(event).encode()
    stamp = at or int(time.time())
    digest = hmac.new(secret.encode(), f"{stamp}.".encode() + payload, hashlib.sha256).hexdigest()
    return payload, f"t={stamp},v1={digest}"


def event(kind: str, obj: dict[str, t.Any]) -> dict[str, t.Any]:
    return {"id": "evt_1", "object": "event", "type": kind, "data": {"object": obj}}


@pytest.fixture
def webhook_app(make_app: AppFactory) -> t.Iterator[tuple[Flask, AiMetering]]:
    app, db, meter = make_app(
        AI_METERING_STRIPE_WEBHOOK_SECRET=SECRET,
        AI_METERING_PAYMENT_FAILURE_GRACE_PERIOD=3,
        AI_METERING_STRIPE_WEBHOOK_MATCH_CUSTOMER=True,  # these events name the customer only
    )
    with app.app_context():
        add_plan(db, slug="pro", token_limit=1000)
        meter.subscribe(TEAM, "pro", stripe_customer_id="cus_w")
        yield app, meter


def subscription(meter: AiMetering) -> Subscription:
    sub = meter.subscription(TEAM)
    assert sub is not None
    return sub


def test_a_bad_signature_is_refused_and_changes_nothing(webhook_app: tuple[Flask, AiMetering]) -> None:
    _, meter = webhook_app
    payload, header = signed(event("customer.subscription.deleted", {"id": "sub_1", "customer": "cus_w"}), "whsec_x")
    with pytest.raises(stripe.SignatureVerificationError):
        handle_stripe_webhook(meter, payload, header)
    stale_payload, stale_header = signed(event("invoice.payment_failed", {"customer": "cus_w"}), at=1_600_000_000)
    with pytest.raises(stripe.SignatureVerificationError):
        handle_stripe_webhook(meter, stale_payload, stale_header)
    assert subscription(meter).ends_at is None


def test_subscription_updated_sets_renewal_and_cancellation(webhook_app: tuple[Flask, AiMetering]) -> None:
    _, meter = webhook_app
    period_end, cancel_at = 1_900_000_000, 1_900_000_000
    obj = {
        "id": "sub_1",
        "customer": "cus_w",
        "status": "active",
        "cancel_at": cancel_at,
        "items": {"data": [{"current_period_end": period_end}]},
    }
    returned = handle_stripe_webhook(meter, *signed(event("customer.subscription.updated", obj)))
    assert returned.type == "customer.subscription.updated"
    sub = subscription(meter)
    assert sub.renews_at == dt.datetime.fromtimestamp(period_end, dt.timezone.utc)
    assert sub.ends_at == dt.datetime.fromtimestamp(cancel_at, dt.timezone.utc)
    assert sub.stripe_subscription_id == "sub_1"


def test_payment_failure_starts_one_grace_period_and_recovery_clears_it(
    webhook_app: tuple[Flask, AiMetering],
) -> None:
    _, meter = webhook_app
    now = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)
    failed = event("invoice.payment_failed", {"customer": "cus_w", "subscription": None})
    handle_stripe_webhook(meter, *signed(failed), now=now)
    handle_stripe_webhook(meter, *signed(failed), now=now + dt.timedelta(days=2))  # Stripe's retry
    sub = subscription(meter)
    assert (sub.ends_at, sub.grace_period_ends_at) == (now, now + dt.timedelta(days=3))
    assert sub.is_active(now + dt.timedelta(days=2)) and not sub.is_active(now + dt.timedelta(days=3))
    recovered = event("customer.subscription.updated", {"id": "sub_9", "customer": "cus_w", "status": "active"})
    handle_stripe_webhook(meter, *signed(recovered), now=now + dt.timedelta(days=1))
    sub = subscription(meter)
    assert (sub.ends_at, sub.grace_period_ends_at) == (None, None)


def test_subscription_deleted_ends_it_now_and_signals_once(webhook_app: tuple[Flask, AiMetering]) -> None:
    app, meter = webhook_app
    expired: list[dict[str, t.Any]] = []
    deleted = event("customer.subscription.deleted", {"id": "sub_1", "customer": "cus_w", "status": "canceled"})
    with signals.subscription_expired.connected_to(lambda s, **kw: expired.append(kw), app):
        handle_stripe_webhook(meter, *signed(deleted))
        handle_stripe_webhook(meter, *signed(deleted))  # redelivered
    sub = subscription(meter)
    assert sub.ends_at is not None and sub.ends_at <= utcnow() and not sub.is_active()
    assert [(kw["billable"], kw["subscription_id"]) for kw in expired] == [(TEAM, sub.id)]


def test_zero_grace_days_end_the_subscription_on_the_failed_payment(make_app: AppFactory, tmp_path: Path) -> None:
    app, db, meter = make_app(
        AI_METERING_PAYMENT_FAILURE_GRACE_PERIOD=0, AI_METERING_STRIPE_WEBHOOK_MATCH_CUSTOMER=True
    )
    with app.app_context():
        add_plan(db, slug="pro")
        meter.subscribe(TEAM, "pro", stripe_customer_id="cus_z")
        failed = event("invoice.payment_failed", {"customer": "cus_z"})
        handle_stripe_webhook(meter.runtime(), *signed(failed), secret=SECRET)
        assert not subscription(meter).is_active()
