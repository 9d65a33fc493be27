"""Stripe sync recovers at once: claims live as long as the claiming process's database session.

Against localstripe through the real ``stripe`` SDK, on SQLite, PostgreSQL and
MariaDB. A sync killed (SIGKILL, in a process of its own) right after Stripe
accepted an item leaves nothing locked: a re-run right after bills everything,
exactly once (metadata look-up plus idempotency keys). What another live sync
holds is reported with its age, and the run exits non-zero while anything stays
unsynced.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import typing as t
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa
from flask import Flask

from flask_ai_metering import AiMetering
from flask_ai_metering.billing.stripe import StripeBillingDriver
from flask_ai_metering.billing.sync import OverageSyncer
from flask_ai_metering.models import Overage
from flask_ai_metering.ops.reconcile import reconcile
from tests.conftest import add_plan
from tests.stripe_server import API_KEY
from tests.stripe_server import StripeServer

if t.TYPE_CHECKING:
    from tests.conftest import AppFactory

stripe = pytest.importorskip("stripe")

TEAM = ("team", "1")
PRICES = {"manual": {"models": {"m": {"input_price_per_1k": "0.001", "output_price_per_1k": "0.001"}}}}
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def stripe_server(tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[StripeServer]:
    with StripeServer(tmp_path_factory.mktemp("localstripe")) as server:
        yield server


@pytest.fixture
def client(stripe_server: StripeServer) -> t.Any:
    return stripe.StripeClient(API_KEY, base_addresses={"api": stripe_server.url}, max_network_retries=0)


def stripe_app(
    make_app: AppFactory, server: StripeServer, client: t.Any, customer: bool = True
) -> tuple[Flask, AiMetering, str | None]:
    app, db, meter = make_app(
        AI_METERING_OVERAGE_BEHAVIOR="charge",
        AI_METERING_BILLING_DRIVER="stripe",
        AI_METERING_STRIPE_API_KEY=API_KEY,
        AI_METERING_STRIPE_API_BASE=server.url,
        AI_METERING_PROVIDERS=PRICES,
    )
    cus = client.v1.customers.create(params={"email": "team-1@example.com"}).id if customer else None
    with app.app_context():
        add_plan(db, slug="pro", token_limit=1000, overage_price_per_1k_tokens=Decimal("1"))
        meter.subscribe(TEAM, "pro", stripe_customer_id=cus)
    return app, meter, cus


def use(meter: AiMetering, tokens: int) -> None:
    meter.call(lambda: "ok", billable=TEAM, provider="manual", model="m", usage={"input_tokens": tokens})


def invoice_items(client: t.Any, customer: str) -> list[t.Any]:
    return list(client.v1.invoice_items.list(params={"customer": customer, "limit": 100}).auto_paging_iter())


def overage_rows(meter: AiMetering) -> list[t.Any]:
    table = Overage.__table__
    with meter.runtime().store.engine.connect() as conn:
        return list(conn.execute(sa.select(table).order_by(table.c.id)))


def sync(app: Flask) -> t.Any:
    return app.test_cli_runner().invoke(args=["ai-metering", "sync-stripe-overages"])


def test_a_rerun_right_after_a_killed_sync_bills_everything_once(
    make_app: AppFactory, stripe_server: StripeServer, client: t.Any, backend: str, db_url: str
) -> None:
    app, meter, customer = stripe_app(make_app, stripe_server, client)
    assert customer is not None
    with app.app_context():
        use(meter, 1000)
        use(meter, 420)  # 42 cents
        use(meter, 80)  # 8 cents
        crashed = subprocess.run(
            [sys.executable, "-m", "tests.crash_sync", db_url, stripe_server.url],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert crashed.returncode == -9, crashed.stderr  # SIGKILL: no clean-up ran
        assert "stripe accepted the item" in crashed.stdout
        assert [i.amount for i in invoice_items(client, customer)] == [42]
        assert [r.status for r in overage_rows(meter)] == ["syncing", "syncing"]

        result = sync(app)  # at once: no lease to wait out

        assert result.exit_code == 0, result.output
        assert "Synced 2 overage(s) (50 usd minor units)" in result.stderr
        items = invoice_items(client, customer)
        rows = overage_rows(meter)
        assert sorted(i.amount for i in items) == [8, 42]  # the first found again, not re-created
        assert {i.id for i in items} == {r.stripe_id for r in rows}
        assert [(r.status, r.sync_attempts) for r in rows] == [("synced", 2), ("synced", 2)]
        assert reconcile(meter.runtime()) == []
        again = sync(app)
        assert again.exit_code == 0 and "Synced 0 overage(s)" in again.stderr
        assert len(invoice_items(client, customer)) == 2


def test_what_a_live_sync_holds_is_reported_with_its_age_and_the_run_exits_1(
    make_app: AppFactory,
    stripe_server: StripeServer,
    client: t.Any,
    backend: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app, meter, customer = stripe_app(make_app, stripe_server, client)
    assert customer is not None
    with app.app_context():
        use(meter, 1000)
        use(meter, 300)
        driver = t.cast(OverageSyncer, meter.runtime().billing)
    inside, go_on = threading.Event(), threading.Event()
    create = StripeBillingDriver.create_remote

    def slow_create(self: StripeBillingDriver, claim: t.Any) -> str:
        inside.set()
        assert go_on.wait(60)
        return create(self, claim)

    monkeypatch.setattr(StripeBillingDriver, "create_remote", slow_create)
    reports: list[t.Any] = []
    live = threading.Thread(target=lambda: reports.append(driver.sync_overages()))
    live.start()
    try:
        assert inside.wait(60)
        with app.app_context():
            result = sync(app)
            [row] = overage_rows(meter)
            assert row.status == "syncing"
    finally:
        go_on.set()
        live.join(60)
    assert result.exit_code == 1
    assert f"1 held by another live sync (overage {row.id} claimed " in result.stderr
    assert "s ago)" in result.stderr
    assert reports[0].synced == 1 and reports[0].ok
    with app.app_context():
        assert [i.amount for i in invoice_items(client, customer)] == [30]
        done = sync(app)
        assert done.exit_code == 0 and "Synced 0 overage(s)" in done.stderr


def test_a_run_that_leaves_overage_without_a_customer_exits_1(
    make_app: AppFactory, stripe_server: StripeServer, client: t.Any
) -> None:
    app, meter, _ = stripe_app(make_app, stripe_server, client, customer=False)
    with app.app_context():
        use(meter, 1000)
        use(meter, 300)
        result = sync(app)
    assert result.exit_code == 1 and "1 wait for a billing customer" in result.stderr
