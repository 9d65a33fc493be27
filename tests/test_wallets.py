"""Credit wallets: the ledger, the ``credits`` billing mode, and spending under concurrency."""

from __future__ import annotations

import threading
import typing as t
from decimal import Decimal

import pytest
import sqlalchemy as sa
from flask import Flask

from flask_ai_metering import AiMetering
from flask_ai_metering import CreditsInsufficient
from flask_ai_metering import InvalidUsage
from flask_ai_metering import signals
from flask_ai_metering.models import CreditTransaction
from flask_ai_metering.models import CreditWallet
from flask_ai_metering.ops.reconcile import reconcile

if t.TYPE_CHECKING:
    from tests.conftest import AppFactory

TEAM = ("team", "1")
#: One price for input and output, so a call's hold (max_tokens at the higher
#: price) equals its actual cost when its usage totals max_tokens.
PRICES = {"manual": {"models": {"m": {"input_price_per_1k": "0.002", "output_price_per_1k": "0.002"}}}}
ZERO = Decimal(0)
CALL_COST = Decimal("0.002")  # 1000 tokens at 0.002 per 1k


def ledger(meter: AiMetering, billable: tuple[str, str] = TEAM) -> tuple[Decimal, Decimal, Decimal]:
    """``(balance, held, sum of transactions)`` read straight from the tables."""
    wallets, txns = CreditWallet.__table__, CreditTransaction.__table__
    with meter.runtime().store.engine.connect() as conn:
        row = conn.execute(
            sa.select(wallets.c.id, wallets.c.balance, wallets.c.held).where(
                wallets.c.billable_type == billable[0], wallets.c.billable_id == billable[1]
            )
        ).one()
        total = conn.execute(
            sa.select(sa.func.coalesce(sa.func.sum(sa.type_coerce(txns.c.amount, sa.BigInteger)), 0)).where(
                txns.c.wallet_id == row.id
            )
        ).scalar_one()
    return row.balance, row.held, Decimal(int(total)).scaleb(-12)


def manual_call(meter: AiMetering, tokens: int = 1000, **options: t.Any) -> t.Any:
    options.setdefault("billable", TEAM)
    return meter.call(
        lambda: "ok",
        provider="manual",
        model="m",
        billing_mode="credits",
        max_tokens=tokens,
        usage={"input_tokens": tokens // 2, "output_tokens": tokens - tokens // 2},
        **options,
    )


def test_every_change_is_a_ledger_row_and_the_balance_is_their_sum(meter: AiMetering) -> None:
    wallet = meter.wallet(TEAM)
    assert wallet.balance == 0 and not wallet.has_sufficient_balance("0.01")
    first = wallet.add_credits(Decimal("10.50"), reason="top-up", meta={"payment_id": "pay_1"})
    wallet.add_credits("0.000000000001")
    taken = wallet.deduct_credits("3.25", reason="refund")
    assert first.amount == Decimal("10.5") and taken.amount == Decimal("-3.25")
    assert wallet.balance == Decimal("7.250000000001")
    assert wallet.has_sufficient_balance("7.250000000001") and not wallet.has_sufficient_balance("7.26")
    assert ledger(meter) == (Decimal("7.250000000001"), ZERO, Decimal("7.250000000001"))
    rows = wallet.transactions()
    assert [r["reason"] for r in rows] == ["refund", "top-up", "top-up"]
    assert rows[-1]["meta"] == {"payment_id": "pay_1"}


def test_signals_carry_the_amount_and_the_new_balance(meter: AiMetering, app: Flask) -> None:
    seen: list[tuple[str, dict[str, t.Any]]] = []
    with signals.credits_added.connected_to(lambda s, **kw: seen.append(("added", kw)), app):
        with signals.credits_deducted.connected_to(lambda s, **kw: seen.append(("deducted", kw)), app):
            meter.wallet(TEAM).add_credits("5")
            meter.wallet(TEAM).deduct_credits("2")
    assert [(name, kw["amount"], kw["balance"], kw["billable"]) for name, kw in seen] == [
        ("added", Decimal(5), Decimal(5), TEAM),
        ("deducted", Decimal(2), Decimal(3), TEAM),
    ]


def test_an_idempotency_key_applies_once_and_refuses_another_amount(meter: AiMetering, app: Flask) -> None:
    wallet = meter.wallet(TEAM)
    sent: list[t.Any] = []
    with signals.credits_added.connected_to(lambda s, **kw: sent.append(kw), app):
        first = wallet.add_credits("5", idempotency_key="stripe-pi-1")
        again = wallet.add_credits("5", idempotency_key="stripe-pi-1")
    assert again.id == first.id and wallet.balance == 5 and len(sent) == 1
    with pytest.raises(InvalidUsage, match="stripe-pi-1"):
        wallet.add_credits("6", idempotency_key="stripe-pi-1")


@pytest.mark.parametrize("amount", [0.5, "-1", "0", "abc", "0.0000000000001", True])
def test_bad_amounts_are_refused_and_record_nothing(meter: AiMetering, amount: t.Any) -> None:
    with pytest.raises(InvalidUsage, match="amount"):
        meter.wallet(TEAM).add_credits(amount)
    assert meter.wallet(TEAM).transactions() == []


def test_a_deduction_never_overdraws_without_overdraft(meter: AiMetering) -> None:
    wallet = meter.wallet(TEAM)
    wallet.add_credits("1")
    with pytest.raises(CreditsInsufficient) as info:
        wallet.deduct_credits("1.01")
    assert info.value.code == 402
    assert ledger(meter) == (Decimal(1), ZERO, Decimal(1))


def test_overdraft_lets_a_wallet_go_below_zero(make_app: AppFactory) -> None:
    app, _, meter = make_app(AI_METERING_CREDIT_OVERDRAFT=True, AI_METERING_PROVIDERS=PRICES)
    with app.app_context():
        meter.wallet(TEAM).add_credits("0.001")
        manual_call(meter)
        meter.wallet(TEAM).deduct_credits("1")
        assert ledger(meter) == (Decimal("-1.001"), ZERO, Decimal("-1.001"))


def test_a_credits_call_holds_its_cost_and_deducts_what_it_spent(make_app: AppFactory) -> None:
    app, _, meter = make_app(AI_METERING_PROVIDERS=PRICES)
    with app.app_context():
        wallet = meter.wallet(TEAM)
        wallet.add_credits("0.01")
        during: list[Decimal] = []

        def provider() -> str:
            during.append(wallet.available)
            return "ok"

        result = meter.call(
            provider,
            billable=TEAM,
            provider="manual",
            model="m",
            billing_mode="credits",
            max_tokens=4000,  # holds 0.008
            usage={"input_tokens": 300, "output_tokens": 200},  # costs 0.001
        )
        assert during == [Decimal("0.002")]
        assert result.usage is not None and result.usage.total_cost == Decimal("0.001")
        assert ledger(meter) == (Decimal("0.009"), ZERO, Decimal("0.009"))
        assert wallet.transactions()[0]["reason"] == "usage"
        assert reconcile(meter.runtime()) == []


def test_an_empty_wallet_refuses_the_call_before_it_runs(make_app: AppFactory) -> None:
    app, _, meter = make_app(AI_METERING_PROVIDERS=PRICES)
    with app.app_context():
        meter.wallet(TEAM).add_credits("0.0019")
        ran: list[bool] = []
        with pytest.raises(CreditsInsufficient) as info:
            meter.call(
                lambda: ran.append(True),
                billable=TEAM,
                provider="manual",
                model="m",
                billing_mode="credits",
                max_tokens=1000,
            )
        assert ran == [] and info.value.code == 402
        assert ledger(meter) == (Decimal("0.0019"), ZERO, Decimal("0.0019"))


def test_a_failed_call_returns_its_hold(make_app: AppFactory) -> None:
    app, _, meter = make_app(AI_METERING_PROVIDERS=PRICES)
    with app.app_context():
        meter.wallet(TEAM).add_credits("0.002")

        def boom() -> None:
            raise RuntimeError("provider down")

        with pytest.raises(RuntimeError):
            meter.call(boom, billable=TEAM, provider="manual", model="m", billing_mode="credits", max_tokens=1000)
        assert ledger(meter) == (Decimal("0.002"), ZERO, Decimal("0.002"))
        manual_call(meter)
        assert ledger(meter) == (ZERO, ZERO, ZERO)


def test_eight_threads_spend_a_wallet_worth_fifty_calls_exactly(make_app: AppFactory, backend: str) -> None:
    app, _, meter = make_app(AI_METERING_PROVIDERS=PRICES)
    with app.app_context():
        meter.wallet(TEAM).add_credits(CALL_COST * 50)
    start = threading.Barrier(8)
    outcomes: list[str] = []
    errors: list[BaseException] = []

    def spend() -> None:
        with app.app_context():
            start.wait()
            while True:
                try:
                    manual_call(meter)
                except CreditsInsufficient:
                    outcomes.append("refused")
                    return
                except BaseException as error:  # surfaced below, not swallowed
                    errors.append(error)
                    return
                outcomes.append("ok")

    threads = [threading.Thread(target=spend) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    assert outcomes.count("ok") == 50 and outcomes.count("refused") == 8
    with app.app_context():
        assert ledger(meter) == (ZERO, ZERO, ZERO)
        assert len(meter.wallet(TEAM).transactions(limit=100)) == 51
        assert reconcile(meter.runtime()) == []
