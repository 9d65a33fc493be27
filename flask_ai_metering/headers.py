"""The limit headers of guarded responses: built in one place from a ``LimitCheck``."""

from __future__ import annotations

import datetime as dt
import typing as t

if t.TYPE_CHECKING:
    from .quota.engine import LimitCheck


def limit_headers(check: LimitCheck, *, refused: bool = False, now: dt.datetime | None = None) -> dict[str, str]:
    """``X-Remaining-*``, ``X-Usage-Percentage``, ``RateLimit-*`` and, when refused, ``Retry-After``.

    ``RateLimit-*`` count tokens, or requests for a budget with a request limit (its
    remaining requests are also ``X-Remaining-Requests``); callers pass the tightest of
    the limits a call ran under. A header for an unlimited dimension is left out. ``Retry-After`` is sent only
    when waiting for the period's reset lifts the refusal: not for an expired
    subscription, nor for a call larger than a whole period allows (callers also
    leave it out for an empty credit wallet).
    """
    headers: dict[str, str] = {}
    reset = check.retry_after(now)
    if check.remaining_tokens is not None:
        headers["X-Remaining-Tokens"] = str(check.remaining_tokens)
        headers["RateLimit-Limit"] = str(check.token_limit)
        headers["RateLimit-Remaining"] = str(check.remaining_tokens)
        headers["RateLimit-Reset"] = str(reset)
    if check.remaining_requests is not None:
        headers["X-Remaining-Requests"] = str(check.remaining_requests)
        if check.remaining_tokens is None or check.remaining_requests == 0:
            headers["RateLimit-Limit"] = str(check.request_limit)
            headers["RateLimit-Remaining"] = str(check.remaining_requests)
            headers["RateLimit-Reset"] = str(reset)
    if check.remaining_cost is not None:
        headers["X-Remaining-Cost"] = format(check.remaining_cost.normalize(), "f")
    if any(r is not None for r in (check.remaining_tokens, check.remaining_cost, check.remaining_requests)):
        headers["X-Usage-Percentage"] = f"{check.usage_percentage:.2f}"
    if refused and not check.expired and check.fits_a_period:
        headers["Retry-After"] = str(reset)
    return headers
