"""Sign-up, log-in and log-out: Flask-Login sessions over the ``example_users`` table.

Signing up creates a team on the Free plan (or joins one with its team code) and
logs the new member in.
"""

from __future__ import annotations

import typing as t
from urllib.parse import urlsplit

import sqlalchemy as sa
from flask import Blueprint
from flask import current_app
from flask import flash
from flask import redirect
from flask import render_template
from flask import request
from flask import url_for
from flask_login import current_user
from flask_login import login_user
from flask_login import logout_user

from .extensions import db
from .extensions import meter
from .models import Team
from .models import User
from .seed import ensure_member_budgets
from .seed import ensure_plans

bp = Blueprint("auth", __name__)

MIN_PASSWORD = 8


def safe_next(target: str | None) -> str:
    """Only a path on this site: never an open redirect."""
    if target and target.startswith("/") and not target.startswith("//") and not urlsplit(target).netloc:
        return target
    return url_for("views.chat")


def _find_user(email: str) -> User | None:
    return db.session.execute(sa.select(User).where(User.email == email)).scalar_one_or_none()


@bp.route("/signup", methods=["GET", "POST"])
def signup() -> t.Any:
    if current_user.is_authenticated:
        return redirect(url_for("views.chat"))
    form = {k: request.form.get(k, "").strip() for k in ("name", "email", "team", "team_code")}
    if request.method == "GET":
        return render_template("signup.html", form=form)
    # The plans first (the first sign-up on an unseeded database creates them).
    ensure_plans(db, current_app.config["EXAMPLE_FREE_TOKEN_LIMIT"])
    password = request.form.get("password", "")
    email = form["email"].lower()
    errors = []
    if not form["name"]:
        errors.append("Tell us your name.")
    if "@" not in email or len(email) > 254:
        errors.append("Enter a valid email address.")
    elif _find_user(email) is not None:
        errors.append("That email already has an account: log in instead.")
    if len(password) < MIN_PASSWORD:
        errors.append(f"Choose a password of at least {MIN_PASSWORD} characters.")
    team = None
    if form["team_code"]:
        team = db.session.get(Team, form["team_code"])
        if team is None:
            errors.append("No team has that code: leave it empty to start your own team.")
    if errors:
        for error in errors:
            flash(error, "error")
        return render_template("signup.html", form=form), 400
    new_team = team is None
    if team is None:
        team_name = form["team"] or f"{form['name']}'s team"
        team = Team(id=Team.new_id(team_name), name=team_name[:120])
        db.session.add(team)
    user = User(email=email, name=form["name"][:120], team=team)
    user.set_password(password)
    db.session.add(user)
    db.session.commit()
    team_id, user_id = team.id, user.id
    # Metering commits in its own transactions: end the app's before subscribing.
    db.session.remove()
    if new_team:
        meter.subscribe(("Team", team_id), "free")  # a new team starts on the Free plan
    ensure_member_budgets(meter, team_id, [str(user_id)])  # every member gets a daily budget
    member = db.session.get(User, user_id)
    assert member is not None
    login_user(member)
    flash(f"Welcome, {member.name}! You're on the {member.team.name} team.", "ok")
    return redirect(url_for("views.chat"))


@bp.route("/login", methods=["GET", "POST"])
def login() -> t.Any:
    if current_user.is_authenticated:
        return redirect(safe_next(request.args.get("next")))
    email = request.form.get("email", "").strip().lower()
    if request.method == "POST":
        user = _find_user(email)
        if user is not None and user.check_password(request.form.get("password", "")):
            login_user(user, remember=bool(request.form.get("remember")))
            return redirect(safe_next(request.args.get("next")))
        flash("Wrong email or password.", "error")
        return render_template("login.html", email=email), 401
    return render_template("login.html", email=email)


@bp.post("/logout")
def logout() -> t.Any:
    logout_user()
    return redirect(url_for("auth.login"))
