"""``meter.refund`` (issue 12): adjustments in the ledger that counters, wallets, overages and reports follow."""

from __future__ import annotations

import datetime as dt
import typing as t
from decimal import Decimal

import pytest
import sqlalchemy as sa

from flask_ai_metering import InvalidUsage
from flask_ai_metering import UsageNotFound
from flask_ai_metering import signals
from flask_ai_metering.models import Counter
from flask_ai_metering.models import CreditTransaction
from flask_ai_metering.models import Overage
from flask_ai_metering.models import Usage
from flask_ai_metering.ops.reconcile import reconcile
from flask_ai_metering.reporting import queries
from flask_ai_metering.reporting.filters import parse_filters
from flask_ai_metering.reporting.rollups import aggregate
from tests.conftest import add_plan
from tests.conftest import concurrently
from tests.stripe_server import API_KEY
from tests.stripe_server import StripeServer

if t.TYPE_CHECKING:
    from tests.conftest import AppFactory

TEAM = ("Team", "1")
#: 1 per 1k tokens in and out: 1,000 tokens cost exactly 1.
PRICES = {"manual": {"models": {"m": {"input_price_per_1k": "1", "output_price_per_1k": "1"}}}}


def use(meter: t.Any, input_tokens: int, output_tokens: int = 0, billable: t.Any = TEAM) -> int:
    result = meter.call(
        lambda: "ok",
        billable=billable,
        provider="manual",
        model="m",
        usage={"input_tokens": input_tokens, "output_tokens": output_tokens},
    )
    return int(result.usage_id)


def rows(meter: t.Any, model: t.Any) -> list[t.Any]:
    table = model.__table__
    with meter.runtime().store.engine.connect() as conn:
        return list(conn.execute(sa.select(table).order_by(table.c.id)))


def counter(meter: t.Any) -> t.Any:
    [row] = rows(meter, Counter)
    return row


def test_a_full_refund_nets_the_call_out_everywhere(make_app: AppFactory, backend: str) -> None:
    app, db, meter = make_app(AI_METERING_PROVIDERS=PRICES)
    sent: list[dict[str, t.Any]] = []

    def receive(sender: t.Any, **kw: t.Any) -> None:
        sent.append(kw)

    with app.app_context(), signals.usage_refunded.connected_to(receive, app):
        add_plan(db, slug="pro", token_limit=1000)
        meter.subscribe(TEAM, "pro")
        kept = use(meter, 100)
        usage_id = use(meter, 300, 200)
        assert meter.check(TEAM).remaining_tokens == 400
        refund = meter.refund(usage_id, reason="bad answer")
        assert (refund.tokens, refund.cost, refund.counter_credited, refund.replayed) == (
            500,
            Decimal(1) / 2,
            True,
            False,
        )
        assert meter.check(TEAM).remaining_tokens == 900
        original, adjustment = [r for r in rows(meter, Usage) if r.id != kept]
        # The call's row is untouched; the adjustment mirrors it, negative, and names it.
        assert (original.kind, original.total_tokens, original.total_cost) == ("usage", 500, Decimal("0.5"))
        assert (adjustment.kind, adjustment.adjusts_id, adjustment.total_tokens) == ("refund", usage_id, -500)
        assert (adjustment.input_tokens, adjustment.output_tokens, adjustment.total_cost) == (
            -300,
            -200,
            Decimal("-0.5"),
        )
        assert adjustment.meta == {"reason": "bad answer"} and adjustment.counter_id == original.counter_id
        c = counter(meter)
        assert (c.used_tokens, c.calls) == (100, 2)
        assert sent == [
            {
                "billable": TEAM,
                "usage_id": usage_id,
                "refund_id": adjustment.id,
                "tokens": 500,
                "cost": Decimal("0.5"),
                "reason": "bad answer",
                "credited": Decimal(0),
                "overage_tokens": 0,
                "overage_amount": Decimal(0),
            }
        ]
        with pytest.raises(InvalidUsage, match=f"usage_id {usage_id} is refunded in full already"):
            meter.refund(usage_id, reason="again")
        assert reconcile(meter.runtime()) == []


def test_partial_refunds_add_up_and_never_exceed_the_charge(make_app: AppFactory, backend: str) -> None:
    app, db, meter = make_app(AI_METERING_PROVIDERS=PRICES)
    with app.app_context():
        add_plan(db, slug="pro", token_limit=10_000)
        meter.subscribe(TEAM, "pro")
        usage_id = use(meter, 600, 400)  # 1,000 tokens, cost 1
        first = meter.refund(usage_id, reason="half", tokens=500, cost="0.5")
        assert (first.tokens, first.cost) == (500, Decimal("0.5"))
        goodwill = meter.refund(usage_id, reason="money only", cost=Decimal("0.25"))
        assert (goodwill.tokens, goodwill.cost) == (0, Decimal("0.25"))
        with pytest.raises(InvalidUsage, match="tokens: 501 is more than the 500"):
            meter.refund(usage_id, reason="too many", tokens=501)
        with pytest.raises(InvalidUsage, match="cost: 0.3 is more than the 0.25"):
            meter.refund(usage_id, reason="too much", cost="0.30")
        rest = meter.refund(usage_id, reason="the rest")
        assert (rest.tokens, rest.cost) == (500, Decimal("0.25"))
        adjustments = [r for r in rows(meter, Usage) if r.kind == "refund"]
        assert sum(r.total_tokens for r in adjustments) == -1000
        assert sum(r.input_tokens for r in adjustments) == -600 and sum(r.output_tokens for r in adjustments) == -400
        assert sum(r.total_cost for r in adjustments) == Decimal(-1)
        assert (counter(meter).used_tokens, counter(meter).used_cost_units) == (0, 0)
        assert reconcile(meter.runtime()) == []


def test_a_refund_replayed_with_its_key_gives_back_once(make_app: AppFactory, backend: str) -> None:
    app, db, meter = make_app(AI_METERING_PROVIDERS=PRICES)
    with app.app_context():
        add_plan(db, slug="pro", token_limit=10_000)
        meter.subscribe(TEAM, "pro")
        usage_id = use(meter, 1000)
        first = meter.refund(usage_id, reason="ticket 7", tokens=100, idempotency_key="ticket-7")
        again = meter.refund(usage_id, reason="ticket 7", tokens=100, idempotency_key="ticket-7")
        bare = meter.refund(usage_id, reason="ticket 7", idempotency_key="ticket-7")
        assert again.replayed and bare.replayed and not first.replayed
        assert again.id == bare.id == first.id and (again.tokens, again.cost) == (100, Decimal(0))
        with pytest.raises(InvalidUsage, match="idempotency_key 'ticket-7' was used for a refund of 100 tokens"):
            meter.refund(usage_id, reason="ticket 7", tokens=200, idempotency_key="ticket-7")
        assert len([r for r in rows(meter, Usage) if r.kind == "refund"]) == 1
        assert counter(meter).used_tokens == 900
        # The same key on another call is another refund: keys are per refunded call.
        other = use(meter, 10)
        assert not meter.refund(other, reason="ticket 7", idempotency_key="ticket-7").replayed
        assert reconcile(meter.runtime()) == []


def test_concurrent_refunds_of_one_call_never_give_back_more_than_it_cost(make_app: AppFactory, backend: str) -> None:
    app, db, meter = make_app(AI_METERING_PROVIDERS=PRICES)
    with app.app_context():
        add_plan(db, slug="pro", token_limit=10_000)
        meter.subscribe(TEAM, "pro")
        usage_id = use(meter, 1000)

    def attempt() -> str:
        with app.app_context():
            try:
                meter.refund(usage_id, reason="race", tokens=400)
            except InvalidUsage:
                return "refused"
            return "refunded"

    outcomes = concurrently(attempt, times=4)
    with app.app_context():
        assert sorted(outcomes) == ["refunded", "refunded", "refused", "refused"]
        assert counter(meter).used_tokens == 200
        assert reconcile(meter.runtime()) == []


def test_bad_refunds_name_the_field_and_change_nothing(make_app: AppFactory) -> None:
    app, db, meter = make_app(AI_METERING_PROVIDERS=PRICES)
    with app.app_context():
        usage_id = use(meter, 10)
        with pytest.raises(UsageNotFound, match="usage_id 999999 names no metered call"):
            meter.refund(999_999, reason="nope")
        for bad, field in [
            ({"usage_id": "7"}, "usage_id"),
            ({"usage_id": True}, "usage_id"),
            ({"reason": ""}, "reason"),
            ({"tokens": -1}, "tokens"),
            ({"tokens": 1.5}, "tokens"),
            ({"cost": 0.5}, "cost"),
            ({"cost": "-1"}, "cost"),
            ({"tokens": 0}, "nothing to refund"),
        ]:
            kwargs = {"usage_id": usage_id, "reason": "x", **bad}
            with pytest.raises(InvalidUsage, match=field):
                meter.refund(kwargs.pop("usage_id"), **kwargs)
        refund = meter.refund(usage_id, reason="ok")
        with pytest.raises(InvalidUsage, match=f"usage_id {refund.id} is a refund adjustment, not a call"):
            meter.refund(refund.id, reason="refund of a refund")
        assert len(rows(meter, Usage)) == 2
        assert reconcile(meter.runtime()) == []


def test_a_refund_after_its_period_ended_leaves_the_old_counter_alone(make_app: AppFactory, backend: str) -> None:
    app, db, meter = make_app(AI_METERING_PROVIDERS=PRICES)
    with app.app_context():
        add_plan(db, slug="pro", token_limit=10_000)
        meter.subscribe(TEAM, "pro")
        usage_id = use(meter, 1000)
        later = counter(meter).period_end + dt.timedelta(days=1)
        refund = meter.runtime()
        from flask_ai_metering.metering.refunds import refund as refund_at

        done = refund_at(refund, usage_id, reason="late", now=later)
        assert not done.counter_credited and counter(meter).used_tokens == 1000
        adjustment = rows(meter, Usage)[-1]
        assert adjustment.counter_id is None and adjustment.occurred_at == later
        assert reconcile(meter.runtime()) == []


def test_credits_mode_refunds_go_back_to_the_wallet(make_app: AppFactory, backend: str) -> None:
    app, db, meter = make_app(AI_METERING_PROVIDERS=PRICES)
    with app.app_context():
        add_plan(db, slug="payg")
        meter.subscribe(TEAM, "payg", billing_mode="credits")
        meter.wallet(TEAM).add_credits(Decimal(10), reason="top-up")
        usage_id = use(meter, 2000)  # 2
        assert meter.wallet(TEAM).balance == Decimal(8)
        added: list[dict[str, t.Any]] = []
        with signals.credits_added.connected_to(lambda sender, **kw: added.append(kw), app):
            part = meter.refund(usage_id, reason="half", cost="0.5")
        assert part.credited == Decimal("0.5") and meter.wallet(TEAM).balance == Decimal("8.5")
        assert [(a["amount"], a["balance"], a["reason"]) for a in added] == [(Decimal("0.5"), Decimal("8.5"), "refund")]
        rest = meter.refund(usage_id, reason="the rest")
        assert rest.credited == Decimal("1.5") and meter.wallet(TEAM).balance == Decimal(10)
        refunds = [r for r in rows(meter, CreditTransaction) if r.reason == "refund"]
        assert [r.amount for r in refunds] == [Decimal("0.5"), Decimal("1.5")]
        assert reconcile(meter.runtime()) == []


def test_a_pending_overage_is_reduced_in_place(make_app: AppFactory, backend: str) -> None:
    app, db, meter = make_app(AI_METERING_PROVIDERS=PRICES, AI_METERING_OVERAGE_BEHAVIOR="charge")
    with app.app_context():
        add_plan(db, slug="pro", token_limit=1000, overage_price_per_1k_tokens=Decimal("0.5"))
        meter.subscribe(TEAM, "pro")
        use(meter, 800)
        usage_id = use(meter, 600)  # 400 past the limit: 0.20
        [overage] = rows(meter, Overage)
        assert (overage.tokens, overage.amount) == (400, Decimal("0.2"))
        first = meter.refund(usage_id, reason="part", tokens=100)
        assert (first.overage_tokens, first.overage_amount) == (100, Decimal("0.05"))
        rest = meter.refund(usage_id, reason="rest")
        assert (rest.overage_tokens, rest.overage_amount) == (300, Decimal("0.15"))
        [overage] = rows(meter, Overage)
        assert (overage.tokens, overage.amount, overage.status) == (0, Decimal(0), "pending")
        assert counter(meter).used_tokens == 800
        use(meter, 300)  # past the limit again by 100: the refunded allowance is not billed twice
        assert [(o.tokens, o.amount) for o in rows(meter, Overage)] == [(0, Decimal(0)), (100, Decimal("0.05"))]
        assert reconcile(meter.runtime()) == []


def test_reports_and_rollups_count_refunds_apart(make_app: AppFactory, backend: str) -> None:
    app, db, meter = make_app(AI_METERING_PROVIDERS=PRICES)
    with app.app_context():
        usage_id = use(meter, 1000)
        use(meter, 500)
        meter.refund(usage_id, reason="bad", cost="0.4", tokens=0)
        rt = meter.runtime()
        today = dt.datetime.now(dt.timezone.utc).date()
        f = parse_filters({"start": f"{today - dt.timedelta(days=1)}", "end": f"{today + dt.timedelta(days=1)}"}, "UTC")

        def sums(use_rollups: bool) -> queries.Totals:
            return rt.store.run(lambda conn: queries.totals(conn, f, use_rollups=use_rollups), write=False)

        ledger = sums(False)
        assert (ledger.calls, ledger.total_tokens, ledger.cost_units, ledger.refunded_units) == (
            2,
            1500,
            int(Decimal("1.1") * 10**12),
            int(Decimal("0.4") * 10**12),
        )
        aggregate(rt)
        assert sums(True) == ledger
        report = app.test_cli_runner().invoke(args=["ai-metering", "report", "--format", "json"])
        assert report.exit_code == 0, report.output
        assert '"total_cost": "1.1' in report.output and '"refunded_cost": "0.4' in report.output
        assert reconcile(rt) == []


@pytest.fixture(scope="module")
def stripe_server(tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[StripeServer]:
    pytest.importorskip("stripe")
    with StripeServer(tmp_path_factory.mktemp("localstripe")) as server:
        yield server


def test_a_synced_overage_is_credited_on_stripe_exactly_once(
    make_app: AppFactory, backend: str, stripe_server: StripeServer
) -> None:
    import stripe

    client = stripe.StripeClient(API_KEY, base_addresses={"api": stripe_server.url}, max_network_retries=0)
    app, db, meter = make_app(
        AI_METERING_OVERAGE_BEHAVIOR="charge",
        AI_METERING_BILLING_DRIVER="stripe",
        AI_METERING_STRIPE_API_KEY=API_KEY,
        AI_METERING_STRIPE_API_BASE=stripe_server.url,
        AI_METERING_PROVIDERS=PRICES,
    )
    customer = client.v1.customers.create(params={"email": "refund@example.com"}).id
    with app.app_context():
        add_plan(db, slug="pro", token_limit=1000, overage_price_per_1k_tokens=Decimal("0.5"))
        meter.subscribe(TEAM, "pro", stripe_customer_id=customer)
        use(meter, 1000)
        usage_id = use(meter, 1234)  # 0.617: 61 cents billed, 0.7 carried
        runner = app.test_cli_runner()
        assert runner.invoke(args=["ai-metering", "sync-stripe-overages"]).exit_code == 0
        refund = meter.refund(usage_id, reason="outage", idempotency_key="outage-1")
        assert (refund.overage_tokens, refund.overage_amount) == (1234, Decimal("0.617"))
        assert meter.refund(usage_id, reason="outage", idempotency_key="outage-1").replayed
        synced, credit = rows(meter, Overage)
        assert (synced.status, synced.tokens, synced.amount) == ("synced", 1234, Decimal("0.617"))
        assert (credit.status, credit.tokens, credit.amount, credit.usage_id) == (
            "pending",
            -1234,
            Decimal("-0.617"),
            refund.id,
        )
        first = runner.invoke(args=["ai-metering", "sync-stripe-overages"])
        second = runner.invoke(args=["ai-metering", "sync-stripe-overages"])
        assert first.exit_code == 0 and "Synced 1 overage(s) (-61 usd minor units)" in first.output
        assert second.exit_code == 0 and "Synced 0 overage(s)" in second.output
        items = client.v1.invoice_items.list(params={"customer": customer, "limit": 100}).auto_paging_iter()
        assert sorted(i.amount for i in items) == [-61, 61]
        assert reconcile(meter.runtime()) == []


def test_the_dashboard_shows_refunds(make_app: AppFactory, backend: str) -> None:
    app, db, meter = make_app(AI_METERING_PROVIDERS=PRICES)
    meter.dashboard_authorizer(lambda user: True)
    with app.app_context():
        usage_id = use(meter, 2000)
        use(meter, 1000)
        meter.refund(usage_id, reason="bad answer", cost="1.5", tokens=0)
    http = app.test_client()
    overview = http.get("/ai-metering/").get_data(as_text=True)
    assert '<th class="num">Refunds</th>' in overview  # the top billables' column
    assert 'data-test="refunded" title="Refunded">−$1.50<' in overview  # under a breakdown's cost
    explorer = http.get("/ai-metering/usage").get_data(as_text=True)
    assert f'title="Refund of usage {usage_id}">refund</span>' in explorer
    assert "of 3" in explorer and "1 refund (" in explorer
    csv = http.get("/ai-metering/usage.csv").get_data(as_text=True)
    assert csv.splitlines()[0].endswith(",kind,adjusts_id,price_source") and f",refund,{usage_id}" in csv
