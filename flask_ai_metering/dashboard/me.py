"""The end user's own usage: ``GET <prefix>/me`` (JSON) and the ``_usage_meter.html`` include.

Both answer for the current user's own billable only, as the
``@meter.billable_resolver`` names it for this request; nothing in the request
(no query parameter, no path segment) can point them at another billable. They
are not admin pages: the ``@meter.dashboard_authorizer`` does not apply, and
``/me`` lives on its own blueprint (``ai_metering_me``, endpoint
``ai_metering_me.me``) beside the dashboard's. An anonymous visitor (Flask-Login
set up and nobody logged in, or a resolver that answers None) gets a 401.

The include reads ``ai_metering_usage()``, a template global registered on the
app: any template can write ``{% include "ai_metering/_usage_meter.html" %}`` and
get "$X of $Y used, resets in Z" for the current user, or nothing when nobody is
logged in. Everything here is a read; nothing reserves or records.
"""

from __future__ import annotations

import datetime as dt
import typing as t
from decimal import Decimal

from flask import Blueprint
from flask import Flask
from flask import Response
from flask import current_app
from flask import has_request_context
from flask import jsonify

from ..quota.standing import standing
from ..reporting import me as queries
from ..resources import resource_dir
from .format import money
from .format import number
from .format import resets_in
from .views import current_user

if t.TYPE_CHECKING:
    from ..config import Settings
    from ..extension import AiMetering
    from ..quota.engine import LimitCheck

__all__ = ["register", "own_billable", "usage_summary", "usage_meter"]

#: The blueprint's name: ``url_for("ai_metering_me.me")``.
BLUEPRINT = "ai_metering_me"


def _meter() -> AiMetering:
    return t.cast("AiMetering", current_app.extensions["ai_metering"])


def _decimal(value: Decimal | None) -> str | None:
    """Money as a plain decimal string (never ``1E-10``), like ``report --format json``."""
    return None if value is None else format(value, "f")


def own_billable() -> tuple[str, str] | None:
    """``(type, id)`` of the current user's billable, or None for an anonymous visitor.

    With Flask-Login set up, nobody logged in is anonymous whatever the resolver
    would say; otherwise the ``@meter.billable_resolver`` decides (None: anonymous).
    """
    if not has_request_context():
        return None
    if getattr(current_app, "login_manager", None) is not None:
        user = current_user()
        if user is None or not getattr(user, "is_authenticated", False):
            return None
    meter = _meter()
    raw = meter._billable_resolver()
    if raw is None:
        return None
    return meter.resolve_billable(raw)


def _check(billable: tuple[str, str]) -> tuple[t.Any, LimitCheck]:
    return standing(_meter().runtime(), billable)


def usage_summary(billable: tuple[str, str], now: dt.datetime | None = None) -> dict[str, t.Any]:
    """The JSON body of ``/me`` for ``billable``: plan, limits, spend by feature, recent calls."""
    rt = _meter().runtime()
    at = now or dt.datetime.now(dt.timezone.utc)
    _, check = standing(rt, billable, now=at)
    with rt.store.engine.connect() as conn:
        plan = queries.plan_info(conn, billable)
        features = queries.spend_by_feature(conn, billable, check.period_start, check.period_end)
        recent = queries.recent_calls(conn, billable)
    return {
        "billable": {"type": billable[0], "id": billable[1]},
        "plan": None
        if plan is None
        else {
            "slug": plan.slug,
            "name": plan.name,
            "billing_mode": plan.billing_mode,
            "trial_ends_at": plan.trial_ends_at.isoformat() if plan.trial_ends_at else None,
        },
        "allowed": check.allowed,
        "usage_percentage": check.usage_percentage,
        "period": {"start": check.period_start.isoformat(), "end": check.period_end.isoformat()},
        "resets_at": check.resets_at.isoformat(),
        "resets_in_seconds": check.retry_after(at),
        "tokens": {
            "used": check.used_tokens,
            "reserved": check.reserved_tokens,
            "limit": check.token_limit,
            "remaining": check.remaining_tokens,
        },
        "cost": {
            "used": _decimal(check.used_cost),
            "reserved": _decimal(check.reserved_cost),
            "limit": _decimal(check.cost_limit),
            "remaining": _decimal(check.remaining_cost),
            "currency": rt.settings.currency,
        },
        "by_feature": [
            {
                "feature": f.feature,
                "calls": f.calls,
                "total_tokens": f.total_tokens,
                "total_cost": _decimal(f.total_cost),
            }
            for f in features
        ],
        "recent_calls": recent,
    }


def me() -> Response:
    """``GET <prefix>/me``: the current user's own usage as JSON; 401 when anonymous."""
    billable = own_billable()
    if billable is None:
        response = jsonify({"error": "unauthorized", "message": "Log in to see your usage."})
        response.status_code = 401
    else:
        response = jsonify(usage_summary(billable))
    # Personal data: never stored by a shared cache.
    response.headers["Cache-Control"] = "private, no-store"
    response.vary.add("Cookie")
    return response


def usage_meter() -> dict[str, t.Any] | None:
    """What ``_usage_meter.html`` shows for the current user (None when anonymous).

    ``text`` is "$X of $Y used, resets in Z" when the plan has a cost limit,
    "N of M tokens used, resets in Z" when it only limits tokens, and
    "$X used, resets in Z" when it limits neither. ``detail`` adds "N of M tokens"
    when the plan limits both (the bar shows the fuller of the two).
    """
    billable = own_billable()
    if billable is None:
        return None
    currency = _meter().settings().currency
    _, check = _check(billable)
    used_cost = check.used_cost + check.reserved_cost
    used_tokens = check.used_tokens + check.reserved_tokens
    left = resets_in(check.resets_at)
    if check.cost_limit is not None:
        text = f"{money(used_cost, currency)} of {money(check.cost_limit, currency)} used"
    elif check.token_limit is not None:
        text = f"{number(used_tokens)} of {number(check.token_limit)} tokens used"
    else:
        text = f"{money(used_cost, currency)} used"
    detail = None
    if check.cost_limit is not None and check.token_limit is not None:
        detail = f"{number(used_tokens)} of {number(check.token_limit)} tokens"
    return {
        "text": f"{text}, resets in {left}",
        "detail": detail,
        "used": money(used_cost, currency),
        "limit": None if check.cost_limit is None else money(check.cost_limit, currency),
        "used_tokens": used_tokens,
        "token_limit": check.token_limit,
        "resets_in": left,
        "resets_at": check.resets_at,
        "percentage": check.usage_percentage,
        "allowed": check.allowed,
        "approaching": check.approaching,
    }


def make_blueprint(settings: Settings) -> Blueprint:
    """The ``ai_metering_me`` blueprint: ``/me`` and the ``ai_metering_usage`` template global.

    :meta private:
    """
    bp = Blueprint(BLUEPRINT, __name__, template_folder=str(resource_dir("templates")))
    bp.add_url_rule("/me", "me", me)
    bp.add_app_template_global(usage_meter, "ai_metering_usage")
    return bp


def register(app: Flask, settings: Settings) -> None:
    """Serve ``/me`` under the dashboard's prefix (when the dashboard is enabled)."""
    if settings.dashboard_enabled:
        app.register_blueprint(make_blueprint(settings), url_prefix=settings.dashboard_prefix)
