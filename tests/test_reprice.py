"""``flask ai-metering reprice`` (issue 12): unpriced calls priced later, through ledger adjustments."""

from __future__ import annotations

import typing as t
from decimal import Decimal

import sqlalchemy as sa

from flask_ai_metering.models import Counter
from flask_ai_metering.models import CreditTransaction
from flask_ai_metering.models import Usage
from flask_ai_metering.ops.reconcile import reconcile
from flask_ai_metering.ops.reprice import reprice
from flask_ai_metering.pricing import catalogue_label
from tests.conftest import add_plan

if t.TYPE_CHECKING:
    from tests.conftest import AppFactory

TEAM = ("Team", "1")
#: 1 per 1k tokens in and out: 1,000 tokens cost exactly 1.
PRICES = {"manual": {"models": {"m": {"input_price_per_1k": "1", "output_price_per_1k": "2"}}}}


def rows(meter: t.Any, model: t.Any) -> list[t.Any]:
    table = model.__table__
    with meter.runtime().store.engine.connect() as conn:
        return list(conn.execute(sa.select(table).order_by(table.c.id)))


def use(meter: t.Any, billable: t.Any = TEAM, model: str = "m") -> t.Any:
    return meter.call(
        lambda: "ok",
        billable=billable,
        provider="manual",
        model=model,
        usage={"input_tokens": 1000, "output_tokens": 500},
    )


def test_unpriced_calls_are_repriced_once_through_adjustments(make_app: AppFactory, backend: str) -> None:
    before, db, old = make_app()  # no price for "m" yet
    with before.app_context():
        add_plan(db, slug="pro", token_limit=100_000, cost_limit=Decimal(100))
        old.subscribe(TEAM, "pro")
        use(old)
        use(old)
        use(old, model="still-unknown")
        [first, _, _] = rows(old, Usage)
        assert (first.unpriced, first.price_source, first.total_cost) == (True, "unpriced", Decimal(0))
    app, _, meter = make_app(AI_METERING_PROVIDERS=PRICES)  # the same database, now with a price
    with app.app_context():
        dry = reprice(meter.runtime(), dry_run=True)
        assert (dry.candidates, dry.repriced, dry.still_unpriced, dry.delta_units) == (3, 2, 1, 4 * 10**12)
        assert len(rows(meter, Usage)) == 3  # a dry run writes nothing
        outcome = app.test_cli_runner().invoke(args=["ai-metering", "reprice"])
        assert outcome.exit_code == 0, outcome.output
        assert "3 call(s) unpriced or estimated; repriced 2 (cost 4 more" in outcome.stderr
        ledger = rows(meter, Usage)
        adjustments = [r for r in ledger if r.kind == "reprice"]
        assert [(a.adjusts_id, a.total_tokens, a.total_cost, a.price_source) for a in adjustments] == [
            (ledger[0].id, 0, Decimal(2), "override"),
            (ledger[1].id, 0, Decimal(2), "override"),
        ]
        assert ledger[0].unpriced and ledger[0].total_cost == 0  # the call's row is never edited
        [counter] = rows(meter, Counter)
        assert (counter.used_tokens, counter.used_cost_units, counter.calls) == (4500, 4 * 10**12, 3)
        assert meter.check(TEAM).remaining_cost == Decimal(96)
        again = reprice(meter.runtime())
        assert (again.candidates, again.repriced) == (1, 0)  # each call is repriced once
        report = app.test_cli_runner().invoke(args=["ai-metering", "report", "--format", "json"])
        assert '"calls": 3' in report.stdout and '"total_cost": "4.000000000000"' in report.stdout
        assert reconcile(meter.runtime()) == []


def test_credits_calls_pay_the_difference_and_refunds_give_it_back(make_app: AppFactory) -> None:
    before, db, old = make_app()
    with before.app_context():
        add_plan(db, slug="payg")
        old.subscribe(TEAM, "payg", billing_mode="credits")
        old.wallet(TEAM).add_credits(Decimal(10), reason="top-up")
        usage_id = use(old).usage_id
    app, _, meter = make_app(AI_METERING_PROVIDERS=PRICES)
    with app.app_context():
        done = reprice(meter.runtime())
        assert (done.repriced, done.charged_units) == (1, 2 * 10**12)
        assert meter.wallet(TEAM).balance == Decimal(8)
        refund = meter.refund(usage_id, reason="bad answer")
        assert (refund.cost, refund.credited) == (Decimal(2), Decimal(2)) and meter.wallet(TEAM).balance == 10
        assert [r.reason for r in rows(meter, CreditTransaction)] == ["top-up", "usage", "refund"]
        assert reconcile(meter.runtime()) == []


def test_every_row_says_where_its_price_came_from(make_app: AppFactory) -> None:
    app, _, meter = make_app(AI_METERING_PROVIDERS=PRICES)
    with app.app_context():
        use(meter)
        meter.call(lambda: None, billable=TEAM, model="gpt-4o-mini", usage={"input_tokens": 10, "output_tokens": 1})
        use(meter, model="nope")
        assert [r.price_source for r in rows(meter, Usage)] == ["override", catalogue_label(), "unpriced"]
        assert catalogue_label().startswith("genai-prices ")
