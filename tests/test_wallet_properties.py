"""A property test of one wallet under random interleavings of everything that moves it.

Hypothesis drives top-ups, deductions, reservations (holds), commits that spend
less or more than their hold, releases, expiries and late commits after expiry
through the real pipeline on a real database. An in-memory model predicts every
outcome, and after every step the database must agree with it and with itself:
``balance == sum(ledger)``, ``held == sum of pending holds``, and, without
overdraft, neither the balance nor what is available ever goes below zero.
"""

from __future__ import annotations

import datetime as dt
import itertools
import typing as t

import pytest
import sqlalchemy as sa
from flask import Flask
from hypothesis import HealthCheck
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine
from hypothesis.stateful import invariant
from hypothesis.stateful import precondition
from hypothesis.stateful import rule
from hypothesis.stateful import run_state_machine_as_test

from flask_ai_metering import AiMetering
from flask_ai_metering import CreditsInsufficient
from flask_ai_metering.metering import commits
from flask_ai_metering.metering import holds
from flask_ai_metering.metering import sweeper
from flask_ai_metering.metering.spec import CallSpec
from flask_ai_metering.metering.spec import Hold
from flask_ai_metering.metering.usage import Extracted
from flask_ai_metering.metering.usage import TokenCounts
from flask_ai_metering.models import CreditTransaction
from flask_ai_metering.models import CreditWallet
from flask_ai_metering.models import Reservation
from flask_ai_metering.models import utcnow
from flask_ai_metering.money import from_units
from flask_ai_metering.money import to_units

if t.TYPE_CHECKING:
    from tests.conftest import AppFactory

#: Input is cheaper than output, so a hold (max_tokens at the output price) can be
#: more or less than what a call really spends.
PRICES = {"manual": {"models": {"m": {"input_price_per_1k": "0.001", "output_price_per_1k": "0.003"}}}}
IN_UNITS, OUT_UNITS = 1_000_000, 3_000_000  # pico-units per token
#: 0.000001 .. 0.01: on the scale of a call's cost (up to 0.016), so calls often overspend.
amounts = st.integers(min_value=1, max_value=10_000).map(lambda n: n * 10**6)

_billables = itertools.count()


def wallet_state(meter: AiMetering, billable: tuple[str, str]) -> tuple[int, int, int, int]:
    """``(balance, held, sum of ledger, sum of pending holds)`` in pico-units."""
    wallets, txns, res = CreditWallet.__table__, CreditTransaction.__table__, Reservation.__table__
    with meter.runtime().store.engine.connect() as conn:
        row = conn.execute(
            sa.select(
                wallets.c.id,
                sa.type_coerce(wallets.c.balance, sa.BigInteger),
                sa.type_coerce(wallets.c.held, sa.BigInteger),
            ).where(wallets.c.billable_type == billable[0], wallets.c.billable_id == billable[1])
        ).first()
        if row is None:
            return 0, 0, 0, 0
        ledger = conn.execute(
            sa.select(sa.func.coalesce(sa.func.sum(sa.type_coerce(txns.c.amount, sa.BigInteger)), 0)).where(
                txns.c.wallet_id == row[0]
            )
        ).scalar_one()
        holds = conn.execute(
            sa.select(sa.func.coalesce(sa.func.sum(res.c.credit_units), 0)).where(
                res.c.wallet_id == row[0], res.c.status == "pending"
            )
        ).scalar_one()
    return int(row[1]), int(row[2]), int(ledger), int(holds)


def make_machine(app: Flask, meter: AiMetering, overdraft: bool) -> type[RuleBasedStateMachine]:
    class WalletMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.ctx = app.app_context()
            self.ctx.push()
            self.rt = meter.runtime()
            self.billable = ("team", f"prop-{next(_billables)}")
            self.wallet = meter.wallet(self.billable)
            self.exists = False
            self.balance = 0
            self.held = 0
            self.pending: list[tuple[Hold, CallSpec]] = []
            self.expired: list[tuple[Hold, CallSpec]] = []

        def teardown(self) -> None:
            # Examples share the database: leave no pending hold for the next one to expire.
            for hold, _ in self.pending:
                holds.release(self.rt, hold)
            self.ctx.pop()

        @rule(amount=amounts)
        def top_up(self, amount: int) -> None:
            self.wallet.add_credits(from_units(amount))
            self.exists = True
            self.balance += amount

        @rule(amount=amounts)
        def deduct(self, amount: int) -> None:
            allowed = overdraft or self.balance - self.held - amount >= 0
            try:
                self.wallet.deduct_credits(from_units(amount))
            except CreditsInsufficient:
                assert not allowed
                return
            assert allowed
            self.exists = True
            self.balance -= amount

        @rule(max_tokens=st.integers(min_value=1, max_value=3000))
        def reserve(self, max_tokens: int) -> None:
            units = max_tokens * OUT_UNITS
            available = self.balance - self.held
            allowed = self.exists and (overdraft or (available - units >= 0 and available > 0))
            spec = CallSpec(self.billable, "manual", model="m", max_tokens=max_tokens, billing_mode="credits")
            try:
                hold = holds.reserve(self.rt, spec)
            except CreditsInsufficient:
                assert not allowed
                return
            assert allowed and isinstance(hold, Hold) and hold.credit_units == units
            self.held += units
            self.pending.append((hold, spec))

        @precondition(lambda self: self.pending or self.expired)
        @rule(data=st.data(), input_tokens=st.integers(0, 4000), output_tokens=st.integers(0, 4000))
        def commit(self, data: st.DataObject, input_tokens: int, output_tokens: int) -> None:
            late = not self.pending or (bool(self.expired) and data.draw(st.booleans(), label="late"))
            source = self.expired if late else self.pending
            hold, spec = source.pop(data.draw(st.integers(0, len(source) - 1), label="which"))
            cost = input_tokens * IN_UNITS + output_tokens * OUT_UNITS
            own = 0 if late else hold.credit_units
            available = self.balance - (self.held - own)
            charge = cost if overdraft else max(0, min(cost, available))
            extracted = Extracted(TokenCounts(input_tokens=input_tokens, output_tokens=output_tokens), model="m")
            recorded = commits.commit(self.rt, spec, hold, extracted)
            assert to_units(recorded.usage.total_cost) == cost
            self.balance -= charge
            self.held -= own

        @precondition(lambda self: self.pending)
        @rule(data=st.data())
        def release(self, data: st.DataObject) -> None:
            hold, _ = self.pending.pop(data.draw(st.integers(0, len(self.pending) - 1), label="which"))
            assert holds.release(self.rt, hold)
            self.held -= hold.credit_units

        @precondition(lambda self: self.pending)
        @rule()
        def expire(self) -> None:
            later = utcnow() + dt.timedelta(seconds=self.rt.settings.reservation_ttl + 1)
            # Other examples' holds may be pending too (a failed example leaves them): at least ours.
            assert sweeper.expire_reservations(self.rt, now=later) >= len(self.pending)
            self.held = 0
            self.expired.extend(self.pending)
            self.pending.clear()

        @invariant()
        def the_database_agrees_with_the_model_and_its_ledger(self) -> None:
            balance, held, ledger, holds = wallet_state(meter, self.billable)
            assert (balance, held) == (self.balance, self.held)
            assert balance == ledger and held == holds
            if not overdraft:
                assert balance >= 0 and balance - held >= 0

    return WalletMachine


@pytest.mark.parametrize("overdraft", [False, True], ids=["no-overdraft", "overdraft"])
def test_wallet_invariants_hold_after_every_step(make_app: AppFactory, overdraft: bool) -> None:
    app, _, meter = make_app(AI_METERING_PROVIDERS=PRICES, AI_METERING_CREDIT_OVERDRAFT=overdraft)
    machine = make_machine(app, meter, overdraft)
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=60 if not overdraft else 30,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
