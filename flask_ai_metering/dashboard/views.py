"""The dashboard's views: check access, parse filters, ask :mod:`.pages`, render.

Read-only GET views. Any future action (a POST) must go through the host app's
CSRF protection and the same functions the CLI calls.
"""

from __future__ import annotations

import datetime as dt
import os
import typing as t
from zoneinfo import ZoneInfo

from flask import Response
from flask import abort
from flask import current_app
from flask import render_template
from flask import request
from flask import send_file
from flask import stream_with_context
from flask import url_for

from ..money import from_units
from ..reporting import queries
from ..reporting.filters import FilterError
from ..reporting.filters import Filters
from ..reporting.filters import parse_filters
from ..reporting.filters import presets
from . import charts
from . import pages
from .export import stream_csv
from .format import money

if t.TYPE_CHECKING:
    from ..config import Settings
    from ..extension import AiMetering
    from ..runtime import Runtime

#: The overview's auto-refresh intervals in seconds (``?refresh=60``); off by default.
REFRESH_CHOICES = ("0", "60", "300")
#: Ledger rows per explorer page.
PER_PAGE = 50
#: Cache lifetime of plotly.js: its URL carries the version, so it never goes stale.
ONE_YEAR = 365 * 24 * 3600
__all__ = ["FilterError"]


def _meter() -> AiMetering:
    return t.cast("AiMetering", current_app.extensions["ai_metering"])


def _runtime() -> Runtime:
    return _meter().runtime()


def current_user() -> t.Any:
    """Flask-Login's ``current_user`` when a login manager is set up on the app, else None."""
    if getattr(current_app, "login_manager", None) is None:
        return None
    try:
        from flask_login import current_user as user
    except ImportError:  # pragma: no cover - a login_manager attribute without flask_login
        return None
    return user._get_current_object()


#: The Stripe webhook's endpoint name in the blueprint (``ai_metering.stripe_webhook``).
WEBHOOK_ENDPOINT = "stripe_webhook"


def authorize() -> None:
    """Deny by default: without an authorizer, or when it says no, every page is 403.

    The Stripe webhook is not a page: Stripe's signature authenticates it.
    """
    if request.endpoint == f"ai_metering.{WEBHOOK_ENDPOINT}":
        return
    authorizer = _meter()._dashboard_authorizer
    if authorizer is None or not authorizer(current_user()):
        abort(403)


def stripe_webhook() -> tuple[t.Any, int]:
    """``POST <prefix>/stripe/webhook``: verify and apply a Stripe event.

    204 when applied (or ignored as unknown or stale), 400 for a bad signature or a
    malformed event; Stripe retries anything else.
    """
    import stripe

    try:
        _meter().handle_stripe_webhook(request.get_data(), request.headers.get("Stripe-Signature", ""))
    except stripe.SignatureVerificationError:
        return {"error": "bad_signature", "message": "the Stripe-Signature header does not verify"}, 400
    except ValueError as exc:
        return {"error": "bad_event", "message": str(exc)}, 400
    return "", 204


def exempt_webhook_from_csrf(app: t.Any) -> None:
    """Exempt the webhook from Flask-WTF's ``CSRFProtect``, whichever extension inits first.

    Stripe cannot send a CSRF token; the signature is the check. ``CSRFProtect``
    lives in ``app.extensions["csrf"]`` once set up, which may be after us: the
    exemption is added at the first app context that finds it.
    """
    from flask import appcontext_pushed

    location = f"{stripe_webhook.__module__}.{stripe_webhook.__name__}"

    def exempt(sender: t.Any, **_: t.Any) -> None:
        csrf = sender.extensions.get("csrf")
        if csrf is None or getattr(csrf, "_ai_metering_exempt", False) or not hasattr(csrf, "exempt"):
            return
        csrf.exempt(location)
        csrf._ai_metering_exempt = True

    exempt(app)
    appcontext_pushed.connect(exempt, app, weak=False)


def bad_filter(error: FilterError) -> tuple[str, int]:
    return render_template("ai_metering/error.html", message=error.description, status=400), 400


def plotly_path() -> str:
    import plotly

    return os.path.join(os.path.dirname(plotly.__file__), "package_data", "plotly.min.js")


def plotly_version() -> str:
    from plotly.offline import get_plotlyjs_version

    return str(get_plotlyjs_version())


def template_context(settings: Settings) -> dict[str, t.Any]:
    zone = ZoneInfo(settings.timezone)

    def local_time(at: dt.datetime | None) -> str:
        return "" if at is None else at.astimezone(zone).strftime("%Y-%m-%d %H:%M")

    return {
        "ai_metering_base_template": settings.base_template,
        "presets": presets,
        "local_time": local_time,
        "units_money": lambda units: money(from_units(int(units)), settings.currency),
        "ai_metering_currency": settings.currency,
        "ai_metering_timezone": settings.timezone,
        "ai_metering_plotly_url": lambda: url_for("ai_metering.plotly_js", version=plotly_version()),
        "ai_metering_version": _package_version(),
    }


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version

    try:
        return version("flask-ai-metering")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "dev"


def _filters() -> Filters:
    return parse_filters(request.args, _runtime().settings.timezone)


def overview() -> str:
    f = _filters()
    group = request.args.get("group", "model")
    if group not in ("model", "provider"):
        raise FilterError("'group' must be model or provider.")
    raw_refresh = request.args.get("refresh", "").strip() or "0"
    if raw_refresh not in REFRESH_CHOICES:
        raise FilterError(f"'refresh' must be one of {', '.join(REFRESH_CHOICES)} (seconds; 0 is off).")
    data = pages.overview(_runtime(), f, group)
    figures = {
        "failures": charts.error_rate_per_day(data.health, f.start, f.end),
        "latency": charts.latency_per_day(data.health, f.start, f.end),
        "cost": charts.cost_over_time(data.current, f.start, f.end, group),
        "activity": charts.calls_and_tokens(data.current, f.start, f.end),
        "models": charts.cost_by(data.current, "model"),
        "tokens": charts.token_types(data.current),
    }
    return render_template(
        "ai_metering/overview.html",
        filters=f,
        data=data,
        figures=figures,
        group=group,
        refresh=int(raw_refresh),
        ranked=pages.ranked,
        change=pages.change,
    )


def usage() -> str:
    f = _filters()
    rt = _runtime()
    with rt.store.engine.connect() as conn:
        rows, has_next = queries.ledger_page(conn, f, PER_PAGE)
        # One row of sums (a COUNT for the rows): the header needs no breakdown.
        summary = pages.Summary(totals=queries.totals(conn, f, use_rollups=rt.settings.aggregation_tables))
    return render_template(
        "ai_metering/usage.html", filters=f, rows=rows, has_next=has_next, summary=summary, per_page=PER_PAGE
    )


def usage_csv() -> Response:
    f = _filters()
    name = f"ai-usage-{f.start.isoformat()}-{f.end.isoformat()}.csv"
    return Response(
        stream_with_context(stream_csv(_runtime().store.engine, f)),
        mimetype="text/csv",
        headers={"Content-Disposition": f'attachment; filename="{name}"', "X-Content-Type-Options": "nosniff"},
    )


def billable(billable_type: str, billable_id: str) -> str:
    f = _filters()
    if len(billable_type) > 100 or len(billable_id) > 100:
        raise FilterError("The billable type and id are at most 100 characters each.")
    if any(ord(c) < 32 for c in billable_type + billable_id):
        raise FilterError("The billable type and id must not contain control characters.")
    data = pages.billable_page(_runtime(), (billable_type, billable_id), f)
    figure = charts.cost_over_time(data.summary, f.start, f.end, "model")
    return render_template("ai_metering/billable.html", filters=f, data=data, figure=figure, ranked=pages.ranked)


def plans() -> str:
    return render_template("ai_metering/plans.html", filters=_filters(), plans=pages.plans(_runtime()))


def plotly_js(version: str) -> Response:
    if version != plotly_version():
        abort(404)
    return send_file(plotly_path(), mimetype="text/javascript", max_age=ONE_YEAR, conditional=True)
