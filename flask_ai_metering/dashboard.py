"""The dashboard blueprint (placeholder until the dashboard lands)."""

from __future__ import annotations

import typing as t

from flask import Blueprint
from flask import Flask
from flask import abort

if t.TYPE_CHECKING:
    from .config import Settings


def register_dashboard(app: Flask, meter: t.Any, settings: Settings) -> None:
    bp = Blueprint("ai_metering", __name__)

    @bp.route("/")
    def overview() -> t.Any:
        abort(403)

    app.register_blueprint(bp, url_prefix=settings.dashboard_prefix)
