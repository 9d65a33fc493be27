"""The app's extension objects, shared by its modules (created unbound, bound in ``create_app``)."""

from __future__ import annotations

from flask_login import LoginManager
from flask_sqlalchemy import SQLAlchemy

from flask_ai_metering import AiMetering

db = SQLAlchemy()
meter = AiMetering()
login_manager = LoginManager()
login_manager.login_view = "auth.login"
login_manager.login_message = "Log in to chat."
