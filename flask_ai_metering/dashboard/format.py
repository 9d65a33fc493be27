"""Template filters: money, counts, percentages and time left, formatted for people."""

from __future__ import annotations

import datetime as dt
import typing as t
from decimal import Decimal

_SYMBOLS = {"usd": "$", "eur": "€", "gbp": "£", "jpy": "¥", "inr": "₹"}


def money(value: t.Any, currency: str = "usd") -> str:
    """``$1,234.57`` for large amounts, more digits for the sub-cent amounts AI calls cost.

    Costs are exact Decimals; only the display rounds (half-even, like the rest).
    """
    if value is None:
        return "—"
    amount = value if isinstance(value, Decimal) else Decimal(str(value))
    symbol = _SYMBOLS.get(currency.lower(), currency.upper() + " ")
    size = abs(amount)
    if size == 0:
        places = 2
    elif size >= 1:
        places = 2
    elif size >= Decimal("0.01"):
        places = 4
    else:
        places = 6
    text = f"{size:,.{places}f}"
    return f"{'-' if amount < 0 else ''}{symbol}{text}"


def number(value: t.Any) -> str:
    """``1,234,567``; ``—`` for None (unlimited or unknown)."""
    if value is None:
        return "—"
    return f"{int(value):,}"


def percent(value: float | None) -> str:
    if value is None:
        return "—"
    sign = "+" if value > 0 else ""
    return f"{sign}{value:.1f}%"


def resets_in(when: dt.datetime | None, now: dt.datetime | None = None) -> str:
    """``3 d 4 h`` until ``when``."""
    if when is None:
        return "—"
    now = now or dt.datetime.now(dt.timezone.utc)
    seconds = max(int((when - now).total_seconds()), 0)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min"
