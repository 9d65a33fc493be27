"""The dashboard: a server-rendered Plotly console under ``AI_METERING_DASHBOARD_PREFIX``.

Pages: ``/`` overview, ``/usage`` explorer, ``/usage.csv``, ``/billables/<type>/<id>``
and ``/plans``; endpoints ``ai_metering.<name>``. Every page is read-only (GET) and
answers 403 unless the ``@meter.dashboard_authorizer`` callback says yes for the
current user (Flask-Login's ``current_user`` when a login manager is set up, else
None). Templates live under ``templates/ai_metering/`` (a host app overrides one by
shipping the same path) and extend ``AI_METERING_BASE_TEMPLATE``. plotly.js comes
from the installed plotly package at a versioned, year-cached URL: no CDN, and not
4.8 MB inlined into every page.

With ``AI_METERING_STRIPE_WEBHOOK_ROUTE`` the blueprint also serves
``POST <prefix>/stripe/webhook`` (endpoint ``ai_metering.stripe_webhook``): no
dashboard login (Stripe's signature is the authentication), exempt from Flask-WTF's
CSRF protection, 400 for a bad signature or a malformed event.
"""

from __future__ import annotations

import typing as t

from flask import Blueprint
from flask import Flask
from werkzeug.routing import PathConverter

from ..resources import resource_dir
from . import me
from . import views
from .format import money
from .format import number
from .format import percent
from .format import resets_in

if t.TYPE_CHECKING:
    from ..config import Settings

__all__ = ["register_dashboard"]


class BillableIdConverter(PathConverter):
    """A billable id in a URL path, whatever it holds: ``a/b``, ``.``, ``..``, ``a//b``.

    Slashes stay slashes (the id spans path segments); a segment that clients or
    Werkzeug would rewrite (empty, ``.``, ``..``) or that starts with ``~`` gets a
    ``~`` in front, which :meth:`to_python` takes off again. So every id has a page
    that a browser reaches as linked.

    :meta private:
    """

    def to_python(self, value: str) -> str:
        return "/".join(part[1:] if part.startswith("~") else part for part in value.split("/"))

    def to_url(self, value: t.Any) -> str:
        parts = str(value).split("/")
        escaped = "/".join("~" + p if p in ("", ".", "..") or p.startswith("~") else p for p in parts)
        return super().to_url(escaped)


def make_blueprint(settings: Settings) -> Blueprint:
    """A fresh blueprint per app, so two apps in one process never share state.

    :meta private:
    """
    bp = Blueprint(
        "ai_metering",
        __name__,
        template_folder=str(resource_dir("templates")),
        static_folder=str(resource_dir("static") / "ai_metering"),
        static_url_path="/static",
    )
    bp.before_request(views.authorize)
    bp.register_error_handler(views.FilterError, views.bad_filter)
    if settings.stripe_webhook_route:
        bp.add_url_rule("/stripe/webhook", views.WEBHOOK_ENDPOINT, views.stripe_webhook, methods=["POST"])
    if not settings.dashboard_enabled:
        return bp
    bp.add_url_rule("/", "overview", views.overview)
    bp.add_url_rule("/usage", "usage", views.usage)
    bp.add_url_rule("/usage.csv", "usage_csv", views.usage_csv)
    bp.add_url_rule("/billables/<billable_type>/<ai_metering_id:billable_id>", "billable", views.billable)
    bp.add_url_rule("/plans", "plans", views.plans)
    bp.add_url_rule("/static/plotly-<version>.min.js", "plotly_js", views.plotly_js)
    for name, fn in (("money", money), ("number", number), ("percent", percent), ("resets_in", resets_in)):
        bp.add_app_template_filter(fn, name)

    @bp.context_processor
    def inject() -> dict[str, t.Any]:
        return views.template_context(settings)

    return bp


def register_dashboard(app: Flask, meter: t.Any, settings: Settings) -> None:
    """Register the dashboard blueprint on ``app`` under ``settings.dashboard_prefix``."""
    app.url_map.converters.setdefault("ai_metering_id", BillableIdConverter)
    app.register_blueprint(make_blueprint(settings), url_prefix=settings.dashboard_prefix)
    me.register(app, settings)
    if settings.stripe_webhook_route:
        views.exempt_webhook_from_csrf(app)
