"""Postpaid overage: tokens beyond a plan's included amount, priced per 1k tokens.

Computed inside the commit transaction from the counter row the commit has just
updated (and so locked): concurrent commits are serialised on that row, each sees
the total before and after its own tokens, and together they price every token
past the limit exactly once.
"""

from __future__ import annotations

import datetime as dt
import typing as t
from decimal import Decimal

import sqlalchemy as sa

from ..models import Overage
from ..models import table
from ..money import UNITS_PER_UNIT
from ..money import round_money

if t.TYPE_CHECKING:
    from ..quota.engine import CounterState
    from ..quota.policy import Policy

overages = table(Overage)


def overage_tokens(limit: int, used_after: int, added: int) -> int:
    """How many of the ``added`` tokens fall past ``limit``."""
    before = used_after - added
    return max(0, used_after - limit) - max(0, before - limit)


def record_overage(
    conn: sa.Connection,
    policy: Policy,
    state: CounterState,
    added_tokens: int,
    usage_id: int | None,
    at: dt.datetime,
    currency: str,
) -> dict[str, t.Any] | None:
    """Write the overage of one commit, or return None when it has none."""
    if policy.token_limit is None or policy.overage_price_per_1k_tokens is None:
        return None
    tokens = overage_tokens(policy.token_limit, state.used_tokens, added_tokens)
    if tokens <= 0:
        return None
    amount = round_money(Decimal(tokens) * policy.overage_price_per_1k_tokens / 1000)
    result = conn.execute(
        sa.insert(overages).values(
            billable_type=policy.billable[0],
            billable_id=policy.billable[1],
            usage_id=usage_id,
            tokens=tokens,
            amount=amount,
            currency=currency,
            period_start=policy.period.start,
            period_end=policy.period.end,
            status="pending",
            created_at=at,
        )
    )
    overage_id = int(result.inserted_primary_key[0])  # type: ignore[index]
    return {"overage_id": overage_id, "tokens": tokens, "amount": amount, "currency": currency}


#: Currencies Stripe bills in whole units (https://docs.stripe.com/currencies#zero-decimal).
ZERO_DECIMAL_CURRENCIES = frozenset(
    {"bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx", "vnd", "vuv", "xaf", "xof", "xpf"}
)
#: Currencies with three decimals, of which Stripe accepts only multiples of ten minor units.
THREE_DECIMAL_CURRENCIES = frozenset({"bhd", "jod", "kwd", "omr", "tnd"})


def minor_per_unit(currency: str) -> int:
    """Minor units in one unit of ``currency``, as Stripe counts them."""
    code = currency.lower()
    if code in ZERO_DECIMAL_CURRENCIES:
        return 1
    return 1000 if code in THREE_DECIMAL_CURRENCIES else 100


def floor_minor(units: int, currency: str) -> int:
    """Pico-units rounded down to what the payment provider can bill, in minor units.

    Rounding down is what makes the carried remainder non-negative: the part of a
    cent not billed now stays in the running total and is billed once it adds up.
    Three-decimal currencies round down to a multiple of ten, as Stripe requires.
    """
    minor = units * minor_per_unit(currency) // UNITS_PER_UNIT
    return minor - minor % 10 if currency.lower() in THREE_DECIMAL_CURRENCIES else minor
