"""Hybrid credits (issue 12): a plan's allowance is free in credits mode, the wallet pays past it; ``credits_low``."""

from __future__ import annotations

import typing as t
from decimal import Decimal

import pytest
import sqlalchemy as sa

from flask_ai_metering import CreditsInsufficient
from flask_ai_metering import quota_required
from flask_ai_metering import signals
from flask_ai_metering.billing.wallets import beyond_allowance
from flask_ai_metering.models import CreditTransaction
from flask_ai_metering.ops.reconcile import reconcile
from tests.conftest import add_plan
from tests.conftest import concurrently

if t.TYPE_CHECKING:
    from tests.conftest import AppFactory

TEAM = ("Team", "1")
#: 1 per 1k tokens: 1,000 tokens cost exactly 1.
PRICES = {"manual": {"models": {"m": {"input_price_per_1k": "1", "output_price_per_1k": "1"}}}}


def use(meter: t.Any, tokens: int, **kw: t.Any) -> t.Any:
    return meter.call(
        lambda: "ok",
        billable=TEAM,
        provider="manual",
        model="m",
        max_tokens=tokens,
        usage={"input_tokens": tokens, "output_tokens": 0},
        **kw,
    )


def deductions(meter: t.Any) -> list[Decimal]:
    table = CreditTransaction.__table__
    with meter.runtime().store.engine.connect() as conn:
        rows = conn.execute(sa.select(table).where(table.c.reason == "usage").order_by(table.c.id))
        return [r.amount for r in rows]


def test_the_allowance_is_free_and_only_the_part_beyond_it_is_charged(make_app: AppFactory, backend: str) -> None:
    app, db, meter = make_app(AI_METERING_PROVIDERS=PRICES)
    with app.app_context():
        add_plan(db, slug="hybrid", token_limit=1000)
        meter.subscribe(TEAM, "hybrid", billing_mode="credits")
        use(meter, 600)  # inside the allowance, with an empty wallet
        assert meter.wallet(TEAM).balance == 0 and deductions(meter) == []
        with pytest.raises(CreditsInsufficient):
            use(meter, 600)  # 200 of it past the allowance, and the wallet is empty
        meter.wallet(TEAM).add_credits(Decimal(5), reason="top-up")
        use(meter, 600)  # 400 inside, 200 beyond: 0.2
        use(meter, 500)  # all beyond: 0.5
        assert deductions(meter) == [Decimal("-0.2"), Decimal("-0.5")]
        assert meter.wallet(TEAM).balance == Decimal("4.3")
        assert reconcile(meter.runtime()) == []


def test_concurrent_calls_split_the_allowance_exactly(make_app: AppFactory, backend: str) -> None:
    app, db, meter = make_app(AI_METERING_PROVIDERS=PRICES)
    with app.app_context():
        add_plan(db, slug="hybrid", token_limit=1000)
        meter.subscribe(TEAM, "hybrid", billing_mode="credits")
        meter.wallet(TEAM).add_credits(Decimal(100), reason="top-up")

    def call() -> None:
        with app.app_context():
            for _ in range(5):
                use(meter, 100)

    concurrently(call, times=4)  # 2,000 tokens: 1,000 free, 1,000 charged
    with app.app_context():
        assert sum(deductions(meter)) == Decimal(-1) and meter.wallet(TEAM).balance == Decimal(99)
        assert reconcile(meter.runtime()) == []


def test_a_cost_allowance_and_a_plan_without_one(make_app: AppFactory) -> None:
    app, db, meter = make_app(AI_METERING_PROVIDERS=PRICES)
    with app.app_context():
        add_plan(db, slug="dollar", cost_limit=Decimal("1"))
        add_plan(db, slug="payg")
        meter.subscribe(TEAM, "dollar", billing_mode="credits")
        meter.wallet(TEAM).add_credits(Decimal(10), reason="top-up")
        use(meter, 1500)  # cost 1.5: 1 included, 0.5 charged
        assert deductions(meter) == [Decimal("-0.5")]
        meter.subscribe(TEAM, "payg", billing_mode="credits")
        use(meter, 100)  # no allowance: everything charged
        assert deductions(meter)[-1] == Decimal("-0.1")
        assert reconcile(meter.runtime()) == []
    assert beyond_allowance(1000, None, 1100, 0, 200, 10) == 5  # half the tokens beyond: half the cost
    assert beyond_allowance(1000, None, 1001, 0, 3, 10) == 4  # rounded up
    assert beyond_allowance(None, None, 5, 5, 5, 5) == 5


def test_record_and_the_guard_follow_the_allowance(make_app: AppFactory) -> None:
    app, db, meter = make_app(AI_METERING_PROVIDERS=PRICES)
    meter.billable_resolver(lambda: TEAM)

    @app.get("/ai")
    @quota_required
    def ai() -> str:
        return "ok"

    with app.app_context():
        add_plan(db, slug="hybrid", token_limit=1000)
        meter.subscribe(TEAM, "hybrid", billing_mode="credits")
        assert app.test_client().get("/ai").status_code == 200  # the allowance covers it, wallet empty
        meter.record(billable=TEAM, provider="manual", model="m", usage={"input_tokens": 1000})
        assert meter.wallet(TEAM).balance == 0
        assert app.test_client().get("/ai").status_code == 402  # allowance used up, wallet empty
        meter.wallet(TEAM).add_credits(Decimal(1), reason="top-up")
        assert app.test_client().get("/ai").status_code == 200
        meter.record(billable=TEAM, provider="manual", model="m", usage={"input_tokens": 300})
        assert meter.wallet(TEAM).balance == Decimal("0.7")
        assert reconcile(meter.runtime()) == []


def test_credits_low_fires_once_per_crossing(make_app: AppFactory, backend: str) -> None:
    app, db, meter = make_app(AI_METERING_PROVIDERS=PRICES, AI_METERING_CREDITS_LOW_THRESHOLD="2")
    low: list[dict[str, t.Any]] = []
    with app.app_context(), signals.credits_low.connected_to(lambda sender, **kw: low.append(kw), app):
        add_plan(db, slug="payg")
        meter.subscribe(TEAM, "payg", billing_mode="credits")
        meter.wallet(TEAM).add_credits(Decimal(5), reason="top-up")
        use(meter, 2000)  # 3 left: above
        assert low == []
        use(meter, 1500)  # 1.5 left: crossed
        use(meter, 500)  # 1 left: still under, no second notice
        assert [(n["billable"], n["available"], n["threshold"]) for n in low] == [(TEAM, Decimal("1.5"), Decimal(2))]
        meter.wallet(TEAM).add_credits(Decimal(4), reason="top-up")  # 5: re-armed
        meter.wallet(TEAM).deduct_credits(Decimal("3.5"), reason="manual")  # 1.5: crossed again
        assert len(low) == 2 and low[1]["balance"] == Decimal("1.5")
        assert reconcile(meter.runtime()) == []
    with pytest.raises(Exception, match="AI_METERING_CREDITS_LOW_THRESHOLD must be positive"):
        make_app(AI_METERING_CREDITS_LOW_THRESHOLD="0")
