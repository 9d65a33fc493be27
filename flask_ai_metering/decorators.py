"""``@quota_required``: refuse a view before it runs when the billable is out of quota."""

from __future__ import annotations

import functools
import typing as t

from flask import current_app

from .billing.wallets import Wallet
from .errors import AiLimitExceeded
from .errors import BillableRequired
from .errors import CreditsInsufficient
from .errors import FeatureNotAllowed
from .headers import limit_headers
from .quota.standing import standing
from .validation import max_tokens

P = t.ParamSpec("P")
R = t.TypeVar("R")


@t.overload
def quota_required(view: t.Callable[P, R]) -> t.Callable[P, R]: ...


@t.overload
def quota_required(
    view: None = None, *, feature: str | None = None, tokens: int = 0
) -> t.Callable[[t.Callable[P, R]], t.Callable[P, R]]: ...


def quota_required(view: t.Callable[P, R] | None = None, *, feature: str | None = None, tokens: int = 0) -> t.Any:
    """Check the current billable's quota before the view runs; reserve nothing.

    Bare, a request is allowed while anything remains; with ``tokens=N`` while at
    least N remain. ``feature=`` answers 403 when the plan lists its features and
    this is not one of them. With no billable (an anonymous request) it raises
    :class:`BillableRequired` (401; the app's error handler may say otherwise). A
    refusal raises :class:`AiLimitExceeded` (429) or
    :class:`CreditsInsufficient` (402), carrying the limit headers; an allowed
    response carries the ``X-Remaining-*`` headers too. Works on async views.
    """

    def decorator(fn: t.Callable[P, R]) -> t.Callable[P, R]:
        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> t.Any:
            meter = current_app.extensions["ai_metering"]
            check = enforce(meter, feature=feature, tokens=tokens)
            response = current_app.make_response(current_app.ensure_sync(fn)(*args, **kwargs))
            response.headers.update(limit_headers(check))
            return response

        return t.cast(t.Callable[P, R], wrapper)

    if view is not None:
        return decorator(view)
    return decorator


def enforce(meter: t.Any, *, feature: str | None = None, tokens: int = 0) -> t.Any:
    """Raise the HTTP error that refuses the current billable, or return its ``LimitCheck``."""
    rt = meter.runtime()
    resolved = meter._billable_resolver()
    if resolved is None:
        raise BillableRequired()
    billable = meter.resolve_billable(resolved)
    policy, check = standing(rt, billable, max_tokens(tokens) or 0)
    if not policy.allows_feature(feature):
        raise FeatureNotAllowed(feature, policy.plan_slug or "")
    if not check.allowed:
        raise AiLimitExceeded(check.reason or _reason(check), check)
    if policy.billing_mode == "credits" and not _within_allowance(policy, check, max_tokens(tokens) or 0):
        wallet = Wallet(
            rt.store, billable, currency=rt.settings.currency, overdraft=rt.settings.credit_overdraft, sender=rt.app
        )
        if not rt.settings.credit_overdraft and wallet.available <= 0:
            raise CreditsInsufficient("The credit wallet is empty: add credits to continue.", check)
    return check


def _within_allowance(policy: t.Any, check: t.Any, tokens: int) -> bool:
    """In credits mode: whether the plan's allowance still covers a request (the wallet pays past it)."""
    if not policy.limited:
        return False
    if check.remaining_tokens is not None and check.remaining_tokens < max(tokens, 1):
        return False
    return check.remaining_cost is None or check.remaining_cost > 0


def _reason(check: t.Any) -> str:
    which = "token" if check.remaining_tokens is not None and check.remaining_tokens <= 0 else "cost"
    return f"The {which} limit for this period is used up. It resets at {check.resets_at.isoformat()}."
