"""Postpaid overage: what is recorded per behaviour, and the exactly-once sync machinery.

The sync is exercised here through a driver of the user's own (an in-memory
biller behind the documented :class:`OverageSyncer` interface); test_stripe.py
runs the same machinery against localstripe.
"""

from __future__ import annotations

import random
import threading
import typing as t
from decimal import Decimal

import pytest
import sqlalchemy as sa
from flask import Flask

from flask_ai_metering import AiLimitExceeded
from flask_ai_metering import AiMetering
from flask_ai_metering import signals
from flask_ai_metering.billing import load_driver
from flask_ai_metering.billing import sync as sync_module
from flask_ai_metering.billing.overages import floor_minor
from flask_ai_metering.billing.reconcile import check_overages
from flask_ai_metering.billing.sync import Claim
from flask_ai_metering.billing.sync import OverageSyncer
from flask_ai_metering.errors import ConfigurationError
from flask_ai_metering.models import Overage
from flask_ai_metering.ops.reconcile import reconcile
from tests.conftest import add_plan
from tests.conftest import concurrently

if t.TYPE_CHECKING:
    from flask_sqlalchemy import SQLAlchemy

    from tests.conftest import AppFactory

TEAM = ("team", "1")
PRICES = {"manual": {"models": {"m": {"input_price_per_1k": "0.001", "output_price_per_1k": "0.001"}}}}
overages = Overage.__table__


class MemoryBiller(OverageSyncer):
    """A driver of the user's own: invoice items kept in a dict, shared per class."""

    name = "memory"
    items: t.ClassVar[dict[str, dict[str, t.Any]]] = {}
    lock = threading.Lock()

    def find_remote(self, claim: Claim) -> str | None:
        with self.lock:
            return next((k for k, v in self.items.items() if v["overage_id"] == claim.overage_id), None)

    def create_remote(self, claim: Claim) -> str:
        with self.lock:
            item_id = f"item_{len(self.items) + 1}"
            self.items[item_id] = {
                "overage_id": claim.overage_id,
                "amount": claim.amount_minor,
                "key": claim.idempotency_key,
            }
            return item_id


class NotADriver:
    def __init__(self, store: t.Any, settings: t.Any) -> None:
        self.store = store

    def sync_overages(self, **options: t.Any) -> None:
        return None


@pytest.fixture
def biller() -> t.Iterator[type[MemoryBiller]]:
    MemoryBiller.items = {}
    yield MemoryBiller


def charging_app(make_app: AppFactory, price: str = "0.01", **config: t.Any) -> tuple[Flask, SQLAlchemy, AiMetering]:
    config.setdefault("AI_METERING_OVERAGE_BEHAVIOR", "charge")
    app, db, meter = make_app(
        AI_METERING_BILLING_DRIVER="tests.test_overages:MemoryBiller", AI_METERING_PROVIDERS=PRICES, **config
    )
    with app.app_context():
        add_plan(db, slug="pro", token_limit=1000, overage_price_per_1k_tokens=Decimal(price))
        # By slug: touching the expired Plan instance would open a session snapshot on MySQL.
        meter.subscribe(TEAM, "pro", stripe_customer_id="cus_test")
    return app, db, meter


def syncer(meter: AiMetering) -> OverageSyncer:
    return t.cast(OverageSyncer, meter.runtime().billing)


def use(meter: AiMetering, tokens: int, billable: tuple[str, str] = TEAM) -> t.Any:
    return meter.call(
        lambda: "ok",
        billable=billable,
        provider="manual",
        model="m",
        max_tokens=tokens,
        usage={"input_tokens": tokens, "output_tokens": 0},
    )


def rows(meter: AiMetering) -> list[t.Any]:
    with meter.runtime().store.engine.connect() as conn:
        return list(conn.execute(sa.select(overages).order_by(overages.c.id)))


def test_charge_records_only_the_tokens_past_the_limit(make_app: AppFactory, biller: t.Any) -> None:
    app, _, meter = charging_app(make_app)
    charged: list[dict[str, t.Any]] = []
    with app.app_context(), signals.overage_charged.connected_to(lambda s, **kw: charged.append(kw), app):
        use(meter, 900)
        use(meter, 250)  # 150 past the limit
        use(meter, 333)
        assert [(r.tokens, r.amount, r.status) for r in rows(meter)] == [
            (150, Decimal("0.0015"), "pending"),
            (333, Decimal("0.00333"), "pending"),
        ]
    assert [(c["billable"], c["tokens"], c["amount"]) for c in charged] == [
        (TEAM, 150, Decimal("0.0015")),
        (TEAM, 333, Decimal("0.00333")),
    ]


def test_block_refuses_and_allow_records_without_overage(make_app: AppFactory, biller: t.Any) -> None:
    app, _, meter = charging_app(make_app, AI_METERING_OVERAGE_BEHAVIOR="block")
    with app.app_context():
        use(meter, 900)
        with pytest.raises(AiLimitExceeded):
            use(meter, 250)
        assert rows(meter) == []
    app, _, meter = make_app(AI_METERING_OVERAGE_BEHAVIOR="allow", AI_METERING_PROVIDERS=PRICES)
    with app.app_context():
        use(meter, 900, ("team", "2"))
        assert use(meter, 250, ("team", "2")).usage.total_tokens == 250
        assert rows(meter) == []


def test_sub_cent_remainders_are_carried_exactly(make_app: AppFactory, biller: t.Any) -> None:
    app, _, meter = charging_app(make_app, price="0.0173")
    rng = random.Random(4)
    with app.app_context():
        use(meter, 1000)
        driver = syncer(meter)
        for round_ in range(4):
            for _ in range(12):
                use(meter, rng.randint(1, 700))
            report = driver.sync_overages()
            assert report.ok and report.synced + report.carried == 12, round_
        synced = rows(meter)
        exact = sum((r.amount for r in synced), Decimal(0))
        billed = sum(r.synced_amount_minor for r in synced)
        assert all(r.status == "synced" for r in synced)
        assert billed == floor_minor(int(exact.scaleb(12)), "usd")
        assert sum(item["amount"] for item in biller.items.values()) == billed
        assert len(biller.items) == sum(1 for r in synced if r.synced_amount_minor)
        assert {r.stripe_id for r in synced if r.synced_amount_minor} == set(biller.items)
        assert all(r.stripe_id is None for r in synced if not r.synced_amount_minor)
        assert Decimal(0) <= exact - Decimal(billed) / 100 < Decimal("0.01")
        assert reconcile(meter.runtime()) == []


def test_two_concurrent_syncs_bill_each_overage_once(make_app: AppFactory, biller: t.Any, backend: str) -> None:
    app, _, meter = charging_app(make_app, price="10")
    with app.app_context():
        use(meter, 1000)
        for _ in range(30):
            use(meter, 7)  # 7 cents each: nothing carried
        driver = syncer(meter)
    reports = concurrently(driver.sync_overages)
    assert sum(r.synced for r in reports) == 30 and all(r.failed == 0 for r in reports)
    # What one run found held by the other (alive) it left to it, and said so.
    assert sum(len(r.held) for r in reports) <= 30
    with app.app_context():
        assert sorted(i["overage_id"] for i in biller.items.values()) == [r.id for r in rows(meter)]
        assert driver.sync_overages().synced == 0 and len(biller.items) == 30


def test_a_sync_that_died_after_the_remote_create_is_finished_without_a_duplicate(
    make_app: AppFactory, biller: t.Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, _, meter = charging_app(make_app, price="10")
    with app.app_context():
        use(meter, 1000)
        use(meter, 500)
        driver = syncer(meter)

        def die(*args: t.Any, **kwargs: t.Any) -> bool:
            raise SystemExit("killed after the remote create")

        with monkeypatch.context() as patch:
            patch.setattr(sync_module, "mark_synced", die)
            with pytest.raises(SystemExit):
                driver.sync_overages()
        assert len(biller.items) == 1 and rows(meter)[0].status == "syncing"
        with meter.runtime().store.engine.connect() as conn:
            assert "left syncing" in check_overages(meter.runtime(), conn)[0]
        # The claim died with its sync: a re-run right away finishes it, without a duplicate.
        report = driver.sync_overages()
        assert report.synced == 1 and report.ok and len(biller.items) == 1
        row = rows(meter)[0]
        assert (row.status, row.stripe_id, row.sync_attempts) == ("synced", "item_1", 2)


def test_a_failed_push_keeps_its_amount_for_the_retry(
    make_app: AppFactory, biller: t.Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, _, meter = charging_app(make_app)
    with app.app_context():
        use(meter, 1000)
        use(meter, 1234)
        driver = syncer(meter)

        def network_down(self: MemoryBiller, claim: Claim) -> str:
            raise OSError("network down")

        with monkeypatch.context() as patch:
            patch.setattr(MemoryBiller, "create_remote", network_down)
            report = driver.sync_overages()
        assert report.failed == 1 and "network down" in report.errors[0] and "1 failed" in str(report)
        row = rows(meter)[0]
        assert (row.status, row.synced_amount_minor, row.last_error) == ("pending", 1, "OSError: network down")
        assert driver.sync_overages().synced == 1
        assert [i["amount"] for i in biller.items.values()] == [1]


def test_limit_progress_and_billables_without_a_customer(make_app: AppFactory, biller: t.Any) -> None:
    app, db, meter = charging_app(make_app, price="10")
    with app.app_context():
        meter.subscribe(("team", "2"), "pro")
        for billable in (TEAM, ("team", "2")):
            use(meter, 1000, billable)
            use(meter, 100, billable)
            use(meter, 100, billable)
        events: list[tuple[str, int]] = []

        class Progress:
            def start(self, total: int) -> None:
                events.append(("start", total))

            def update(self, n: int) -> None:
                events.append(("update", n))

        driver = syncer(meter)
        first = driver.sync_overages(limit=1, progress=Progress())
        assert (first.synced, first.waiting) == (1, 2) and events == [("start", 1), ("update", 1)]
        assert "2 wait for a billing customer" in str(first)
        assert driver.sync_overages().synced == 1


def test_immediate_strategy_syncs_in_the_background(make_app: AppFactory, biller: t.Any) -> None:
    app, _, meter = charging_app(make_app, AI_METERING_OVERAGE_SYNC_STRATEGY="immediate")
    with app.app_context():
        use(meter, 1000)
        use(meter, 1500)
        syncer(meter).wait(30)
        assert [(r.status, r.synced_amount_minor) for r in rows(meter)] == [("synced", 1)]


def test_custom_driver_must_implement_the_interface(make_app: AppFactory) -> None:
    app, _, meter = make_app()
    with app.app_context():
        store, settings = meter.runtime().store, meter.settings()
        assert load_driver("null", store, settings).sync_overages() is None
        with pytest.raises(ConfigurationError, match="sync_after_commit"):
            load_driver("tests.test_overages:NotADriver", store, settings)
        with pytest.raises(ConfigurationError, match="AI_METERING_STRIPE_API_KEY"):
            load_driver("stripe", store, settings)


@pytest.mark.parametrize(
    ("currency", "units", "minor"),
    [
        ("usd", 10**12 * 123 // 100 + 1, 123),
        ("jpy", 10**12 * 99 + 10**12 - 1, 99),
        ("kwd", 10**12 * 1239 // 1000, 1230),
    ],
)
def test_minor_units_round_down_per_currency(currency: str, units: int, minor: int) -> None:
    assert floor_minor(units, currency) == minor
