"""Exact money: ``Decimal`` in Python, an integer of pico-units in the database.

Token prices reach fractions of a nano-dollar per token, so costs are kept to
10^-12 of the currency unit. SQLAlchemy's ``Numeric`` silently goes through
``float`` on SQLite, so every money column is a ``BIGINT`` of pico-units
(±9.2 million currency units per value) wrapped in :class:`MoneyType`, which
reads and writes ``Decimal``.
"""

from __future__ import annotations

import typing as t
from decimal import ROUND_CEILING
from decimal import ROUND_HALF_EVEN
from decimal import Decimal
from decimal import InvalidOperation

import sqlalchemy as sa

from .errors import InvalidUsage

#: Pico-units per currency unit: the resolution of every stored amount.
UNITS_PER_UNIT = 10**12
#: The smallest amount we keep: 10^-12 of the currency unit.
QUANTUM = Decimal(1).scaleb(-12)
#: The largest magnitude a BIGINT of pico-units holds.
MAX_UNITS = 2**63 - 1


def round_money(amount: Decimal) -> Decimal:
    """Round ``amount`` to 10^-12, half-even: the one rounding every cost goes through.

    A usage row's cost is rounded once, here; Stripe amounts are rounded to minor
    units only when they are synced (see :mod:`flask_ai_metering.billing`).
    """
    return amount.quantize(QUANTUM, rounding=ROUND_HALF_EVEN)


def parse_money(value: t.Any, field: str) -> Decimal:
    """Read a user-supplied amount (``str``, ``int`` or ``Decimal``), refusing floats.

    :raises InvalidUsage: naming ``field`` when the value is a float, not a number,
        not finite, or has more precision than 10^-12.
    """
    if isinstance(value, bool) or isinstance(value, float):
        raise InvalidUsage(
            f"{field} must be a str, int or Decimal, not {type(value).__name__}"
            f" (floats are inexact): write '{value}' instead"
        )
    if not isinstance(value, (str, int, Decimal)):
        raise InvalidUsage(f"{field} must be a str, int or Decimal, got {type(value).__name__}")
    try:
        amount = Decimal(value) if not isinstance(value, Decimal) else value
    except (InvalidOperation, ValueError):
        raise InvalidUsage(f"{field} is not a number: {value!r}") from None
    if not amount.is_finite():
        raise InvalidUsage(f"{field} must be finite, got {value!r}")
    if round_money(amount) != amount:
        raise InvalidUsage(f"{field} has more than 12 decimal places: {value!r}")
    if abs(to_units(amount)) > MAX_UNITS:
        raise InvalidUsage(f"{field} is too large to store exactly: {value!r}")
    return amount


def to_units(amount: Decimal) -> int:
    """Convert an amount already rounded to 10^-12 into integer pico-units."""
    return int(amount.scaleb(12))


def to_units_ceil(amount: Decimal) -> int:
    """Pico-units rounded up: a hold must never be smaller than the cost it covers."""
    return to_units(amount.quantize(QUANTUM, rounding=ROUND_CEILING))


def from_units(units: int) -> Decimal:
    """Convert integer pico-units back into a ``Decimal`` amount."""
    return Decimal(units).scaleb(-12)


def zero() -> Decimal:
    """A zero amount with the library's precision."""
    return QUANTUM * 0


class MoneyType(sa.TypeDecorator[Decimal]):
    """A ``BIGINT`` of pico-units that Python sees as ``Decimal``.

    Arithmetic in SQL must not go through this converter (``col + 1`` would bind
    ``1`` as one currency unit): SUMs and increments use
    ``sa.type_coerce(col, sa.BigInteger)`` and :func:`from_units`.
    """

    impl = sa.BigInteger
    cache_ok = True

    def process_bind_param(self, value: t.Any, dialect: sa.Dialect) -> int | None:
        if value is None:
            return None
        if isinstance(value, float):
            raise TypeError("Money is never a float: pass a Decimal or a str")
        amount = value if isinstance(value, Decimal) else Decimal(value)
        return to_units(round_money(amount))

    def process_result_value(self, value: t.Any, dialect: sa.Dialect) -> Decimal | None:
        if value is None:
            return None
        return from_units(int(value))
