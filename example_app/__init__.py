"""A small flaskr-style app that uses flask-ai-metering end to end (``make demo``).

Demo only: there are no passwords. Every visitor is logged in as the ``admin`` user
automatically, and the dashboard authorizer lets admins in. A real app would use
its own login and ``return user.is_admin`` — never auto-login.
"""

from __future__ import annotations

import os
import typing as t

from flask import Flask
from flask import jsonify
from flask import redirect
from flask import render_template
from flask import url_for
from flask_login import LoginManager
from flask_login import UserMixin
from flask_login import current_user
from flask_login import login_required
from flask_login import login_user
from flask_sqlalchemy import SQLAlchemy

from flask_ai_metering import AiMetering
from flask_ai_metering import quota_required

db = SQLAlchemy()
meter = AiMetering()
login_manager = LoginManager()

#: The price of the demo's manual provider model (no provider reports it).
PROVIDERS = {"manual": {"models": {"demo-small": {"input_price_per_1k": "0.0005", "output_price_per_1k": "0.0015"}}}}


class DemoUser(UserMixin):
    """A hard-coded user; the demo has no user table and no passwords."""

    def __init__(self, user_id: str, name: str, is_admin: bool) -> None:
        self.id = user_id
        self.name = name
        self.is_admin = is_admin


USERS = {
    "1": DemoUser("1", "admin", True),
    "2": DemoUser("2", "alice", False),
    "3": DemoUser("3", "bob", False),
}


@login_manager.user_loader
def load_user(user_id: str) -> DemoUser | None:
    return USERS.get(user_id)


@meter.billable_resolver
def billable() -> tuple[str, str] | None:
    return ("User", current_user.id) if current_user.is_authenticated else None


@meter.dashboard_authorizer
def can_view_dashboard(user: t.Any) -> bool:
    return bool(getattr(user, "is_authenticated", False) and getattr(user, "is_admin", False))


def create_app(test_config: dict[str, t.Any] | None = None) -> Flask:
    """The app factory (``FLASK_APP=example_app:create_app``)."""
    app = Flask(__name__, instance_relative_config=True)
    os.makedirs(app.instance_path, exist_ok=True)
    default_db = "sqlite:///" + os.path.join(app.instance_path, "demo.sqlite")
    app.config.from_mapping(
        SECRET_KEY="demo-only-not-secret",
        SQLALCHEMY_DATABASE_URI=os.environ.get("EXAMPLE_DATABASE_URL", default_db),
        AI_METERING_PROVIDERS=PROVIDERS,
        AI_METERING_DEFAULT_PROVIDER="manual",
        DEMO_AUTO_LOGIN=True,
    )
    if test_config:
        app.config.update(test_config)
    db.init_app(app)
    meter.init_app(app, db=db)
    login_manager.init_app(app)

    @app.before_request
    def demo_auto_login() -> None:
        # Demo only: log every visitor in as the admin so the dashboard opens.
        if app.config["DEMO_AUTO_LOGIN"] and not current_user.is_authenticated:
            login_user(USERS["1"])

    @app.get("/")
    def index() -> str:
        return render_template("index.html", users=USERS.values())

    @app.get("/login/<user_id>")
    def login(user_id: str) -> t.Any:
        user = USERS.get(user_id)
        if user is not None:
            login_user(user)
        return redirect(url_for("index"))

    @app.post("/ai/summarize")
    @login_required
    @quota_required(feature="summary", tokens=1500)
    def summarize() -> t.Any:
        result = meter.call(
            lambda: {"summary": "A short, made-up summary."},
            provider="manual",
            model="demo-small",
            feature="summary",
            usage={"input_tokens": 1200, "output_tokens": 150},
            max_tokens=1500,
        )
        return jsonify(
            {**result.response, "cost": str(result.usage.total_cost), "remaining_tokens": result.remaining_tokens}
        )

    @app.post("/ai/chat")
    @login_required
    @quota_required
    def chat() -> t.Any:
        result = meter.call(
            lambda: {"reply": "Hello from the demo model."},
            provider="manual",
            model="demo-small",
            feature="chat",
            usage={"input_tokens": 300, "output_tokens": 80},
        )
        return jsonify({**result.response, "cost": str(result.usage.total_cost)})

    from .seed import seed_demo_command

    app.cli.add_command(seed_demo_command)
    return app
