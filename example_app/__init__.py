"""The example app: a small team chat product metered by flask-ai-metering (``make demo``).

* Accounts: sign-up and log-in (Flask-Login, passwords hashed with werkzeug), teams
  with members. The team is the billable; the member is the user calls are
  attributed to.
* Plans: Free and Pro (with a 14-day trial), chosen on the billing page
  (``meter.subscribe``); credits bought through Stripe Checkout when Stripe is configured.
* Chat: answers stream in token by token from the official ``openai`` and
  ``anthropic`` SDKs, instrumented with ``meter.instrument``; without API keys a
  local model server that ships with the example answers (:mod:`example_app.llm`).
* Limits: over the Free plan's allowance, the chat shows a friendly page with the
  reset time (an error handler for ``AiLimitExceeded``).
* The metering dashboard opens for admins only (``@meter.dashboard_authorizer``);
  every page shows the user's usage meter (``ai_metering/_usage_meter.html``).

Demo accounts (``flask seed-demo``): ``admin@example.com`` / ``admin-password``
(an admin) and ``member@example.com`` / ``member-password`` (a member of the same team).
"""

from __future__ import annotations

import hmac
import os
import secrets
import typing as t

from flask import Flask
from flask import abort
from flask import request
from flask import session
from flask_login import current_user

from .extensions import db
from .extensions import login_manager
from .extensions import meter
from .models import Team
from .models import User

__all__ = ["create_app", "db", "meter", "Team", "User"]

#: The price of the seeded ``manual`` provider's model (no provider reports it).
PROVIDERS = {"manual": {"models": {"demo-small": {"input_price_per_1k": "0.0005", "output_price_per_1k": "0.0015"}}}}


@login_manager.user_loader
def load_user(user_id: str) -> User | None:
    return db.session.get(User, int(user_id)) if user_id.isdigit() else None


@meter.billable_resolver
def billable() -> Team | None:
    """The logged-in member's team pays for the call."""
    return current_user.team if current_user.is_authenticated else None


@meter.dashboard_authorizer
def can_view_dashboard(user: t.Any) -> bool:
    """Admins see the metering dashboard; members don't."""
    return bool(user is not None and user.is_authenticated and user.is_admin)


def csrf_token() -> str:
    """The session's CSRF token, for forms (``csrf_token``) and fetch (``X-CSRF-Token``)."""
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(24)
    return str(session["csrf"])


def create_app(test_config: dict[str, t.Any] | None = None) -> Flask:
    """The app factory (``FLASK_APP=example_app:create_app``)."""
    app = Flask(__name__, instance_relative_config=True)
    os.makedirs(app.instance_path, exist_ok=True)
    default_db = "sqlite:///" + os.path.join(app.instance_path, "demo.sqlite")
    app.config.from_mapping(
        SECRET_KEY=os.environ.get("EXAMPLE_SECRET_KEY", "demo-only-not-secret"),
        SQLALCHEMY_DATABASE_URI=os.environ.get("EXAMPLE_DATABASE_URL", default_db),
        AI_METERING_PROVIDERS=PROVIDERS,
        # Real services answer when their key is set; otherwise the local model server.
        OPENAI_API_KEY=os.environ.get("OPENAI_API_KEY"),
        ANTHROPIC_API_KEY=os.environ.get("ANTHROPIC_API_KEY"),
        EXAMPLE_MODEL_SERVER_URL=os.environ.get("EXAMPLE_MODEL_SERVER_URL"),
        #: Tokens a month on the Free plan (set when ``seed-demo`` or the first sign-up creates it).
        EXAMPLE_FREE_TOKEN_LIMIT=int(os.environ.get("EXAMPLE_FREE_TOKEN_LIMIT", "5000")),
        EXAMPLE_CSRF=True,
    )
    if test_config:
        app.config.update(test_config)
    db.init_app(app)
    meter.init_app(app, db=db)
    login_manager.init_app(app)

    from . import llm

    app.extensions["example_llm"] = llm.Clients(app)
    with app.app_context():
        # The app's own two tables (a real app would use Flask-Migrate); the metering
        # tables come from `flask ai-metering db upgrade`.
        db.create_all()

    app.jinja_env.globals["csrf_token"] = csrf_token

    @app.before_request
    def check_csrf() -> None:
        if request.method == "POST" and app.config["EXAMPLE_CSRF"]:
            sent = request.form.get("csrf_token") or request.headers.get("X-CSRF-Token") or ""
            expected = str(session.get("csrf") or "")
            if not expected or not hmac.compare_digest(sent, expected):
                abort(400, "The form expired: reload the page and try again.")

    from .auth import bp as auth_bp
    from .seed import seed_demo_command
    from .views import bp as views_bp
    from .views import register_error_handlers

    app.register_blueprint(auth_bp)
    app.register_blueprint(views_bp)
    register_error_handlers(app)
    app.cli.add_command(seed_demo_command)
    return app
