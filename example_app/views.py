"""The product's pages: chat (streamed), billing (plans and credits) and the team.

Every AI call goes through the instrumented SDK clients of :mod:`example_app.llm`:
no ``meter.call`` at the call site. A refusal over the plan's limit is raised by
the client before the request leaves the process and lands in
:func:`limit_reached`, which shows a page, not a JSON 429.
"""

from __future__ import annotations

import datetime as dt
import json
import typing as t
from decimal import Decimal

import anthropic
import openai
import sqlalchemy as sa
import stripe
from flask import Blueprint
from flask import Flask
from flask import Response
from flask import abort
from flask import current_app
from flask import flash
from flask import jsonify
from flask import redirect
from flask import render_template
from flask import render_template_string
from flask import request
from flask import stream_with_context
from flask import url_for
from flask_login import current_user
from flask_login import login_required

from flask_ai_metering import AiLimitExceeded
from flask_ai_metering import CreditsInsufficient
from flask_ai_metering.models import Plan

from . import llm
from .auth import safe_next
from .extensions import db
from .extensions import meter
from .models import User
from .seed import ensure_member_budgets

bp = Blueprint("views", __name__)

#: Credit packs on sale, in dollars.
CREDIT_PACKS = (5, 10, 25)
METER = '{% include "ai_metering/_usage_meter.html" %}'


def _sse(data: dict[str, t.Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


@bp.get("/")
def index() -> t.Any:
    if current_user.is_authenticated:
        return redirect(url_for("views.chat"))
    return render_template("index.html")


@bp.get("/chat")
@login_required
def chat() -> str:
    return render_template("chat.html", models=llm.MODELS.values(), clients=llm.clients())


@bp.post("/chat/stream")
@login_required
def chat_stream() -> Response:
    """Stream an answer as server-sent events: ``{"delta": text}`` …, then ``{"done": true, "meter": html}``."""
    data = request.get_json(silent=True) or {}
    message = str(data.get("message") or "").strip()[:4000]
    model = llm.MODELS.get(str(data.get("model") or next(iter(llm.MODELS))))
    if not message or model is None:
        abort(400, "Send a message and pick a model.")
    with meter.scope(feature="chat"):
        # Raises AiLimitExceeded here, before any request, when the team's plan is used up.
        text = llm.stream_reply(model, llm.conversation(data.get("history"), message))

    def events() -> t.Iterator[str]:
        try:
            for piece in text:
                yield _sse({"delta": piece})
        except (openai.APIError, anthropic.APIError) as error:
            current_app.logger.warning("The model failed mid-answer: %s", error)
            yield _sse({"error": "The model stopped answering. Try again."})
        # The stream has ended, so its usage is recorded: the meter shows it.
        yield _sse({"done": True, "meter": render_template_string(METER)})

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return Response(stream_with_context(events()), mimetype="text/event-stream", headers=headers)


def _plans_query() -> sa.Select[t.Any]:
    return sa.select(Plan).where(Plan.slug.in_(("free", "pro"))).order_by(Plan.token_limit)


@bp.get("/billing")
@login_required
def billing() -> str:
    team = current_user.team
    subscription = meter.subscription(team)
    return render_template(
        "billing.html",
        plans=db.session.execute(_plans_query()).scalars().all(),
        subscription=subscription,
        balance=meter.wallet(team).balance,
        packs=CREDIT_PACKS,
        stripe_ready=bool(meter.settings().stripe_api_key),
        now=dt.datetime.now(dt.timezone.utc),
    )


@bp.post("/billing/plan")
@login_required
def change_plan() -> t.Any:
    """The upgrade (or downgrade) button: ``meter.subscribe`` moves the team's subscription."""
    slug = request.form.get("plan", "")
    plan = db.session.execute(_plans_query().where(Plan.slug == slug)).scalar_one_or_none()
    if plan is None:
        abort(400, "Unknown plan.")
    team_id = current_user.team_id
    current = meter.subscription(("Team", team_id))
    options: dict[str, t.Any] = {}
    # One trial per team: the first move to a plan with trial days starts it.
    if plan.trial_days and (current is None or current.trial_ends_at is None):
        options["trial_ends_at"] = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=plan.trial_days)
    name, trial_days = plan.name, plan.trial_days
    db.session.remove()  # metering commits on its own: end the app's transaction first
    meter.subscribe(("Team", team_id), slug, **options)
    members = db.session.execute(sa.select(User.id).where(User.team_id == team_id)).scalars().all()
    db.session.remove()
    ensure_member_budgets(meter, team_id, [str(member) for member in members])  # fit for the new plan
    trial = f" Your {trial_days}-day trial has started." if options else ""
    flash(f"You're on the {name} plan now.{trial}", "ok")
    return redirect(safe_next(request.form.get("next")))


def _stripe_client() -> stripe.StripeClient:
    settings = meter.settings()
    options: dict[str, t.Any] = {"max_network_retries": 1}
    if settings.stripe_api_base:
        options["base_addresses"] = {"api": settings.stripe_api_base.rstrip("/")}
    return stripe.StripeClient(t.cast(str, settings.stripe_api_key), **options)


@bp.post("/billing/credits")
@login_required
def buy_credits() -> t.Any:
    """A credits top-up through Stripe Checkout, or a page that says what to configure."""
    dollars = request.form.get("amount", type=int)
    if dollars not in CREDIT_PACKS:
        abort(400, "Pick one of the credit packs.")
    if not meter.settings().stripe_api_key:
        return render_template("stripe_setup.html", amount=dollars), 503
    team = current_user.team
    try:
        session = _checkout_session(team, dollars)
    except stripe.StripeError as error:
        current_app.logger.warning("Stripe Checkout failed: %s", error)
        flash("Stripe did not answer: no payment was taken. Try again later.", "error")
        return redirect(url_for("views.billing"))
    return redirect(t.cast(str, session.url), code=303)


def _checkout_session(team: t.Any, dollars: int) -> t.Any:
    return _stripe_client().v1.checkout.sessions.create(
        params={
            "mode": "payment",
            "line_items": [
                {
                    "quantity": 1,
                    "price_data": {
                        "currency": meter.settings().currency,
                        "unit_amount": dollars * 100,
                        "product_data": {"name": f"${dollars} of AI credits for {team.name}"},
                    },
                }
            ],
            "client_reference_id": team.id,
            "metadata": {"team": team.id, "credits": str(dollars)},
            "success_url": url_for("views.credits_done", _external=True) + "?session_id={CHECKOUT_SESSION_ID}",
            "cancel_url": url_for("views.billing", _external=True),
        }
    )


@bp.get("/billing/credits/done")
@login_required
def credits_done() -> t.Any:
    """Back from Checkout: add the credits once the session is paid (its id is the idempotency key)."""
    if not meter.settings().stripe_api_key:
        return redirect(url_for("views.billing"))
    session = _stripe_client().v1.checkout.sessions.retrieve(request.args.get("session_id", ""))
    team = current_user.team
    metadata = t.cast(dict[str, str], session.metadata or {})
    if session.payment_status != "paid" or metadata.get("team") != team.id:
        flash("The payment has not gone through (yet).", "error")
        return redirect(url_for("views.billing"))
    amount = Decimal(metadata.get("credits", "0"))
    meter.wallet(team).add_credits(amount, reason="stripe-checkout", idempotency_key=f"checkout-{session.id}")
    flash(f"${amount} of credits added.", "ok")
    return redirect(url_for("views.billing"))


@bp.get("/team")
@login_required
def team() -> str:
    return render_template("team.html", team=current_user.team)


def limit_reached(error: AiLimitExceeded | CreditsInsufficient) -> tuple[str, int, dict[str, str]]:
    """Over the limit: a friendly page with the reset time (JSON 429 is for APIs, not people)."""
    headers = {k: v for k, v in error.get_headers() if k != "Content-Type"}
    check = error.check
    subscription = meter.subscription(current_user.team) if current_user.is_authenticated else None
    page = render_template(
        "limit.html",
        error=error,
        check=check,
        credits=isinstance(error, CreditsInsufficient),
        plan=subscription.plan if subscription else None,
        now=dt.datetime.now(dt.timezone.utc),
    )
    return page, error.code or 429, headers


def model_unavailable(error: Exception) -> tuple[t.Any, int]:
    current_app.logger.warning("The model service failed: %s", error)
    if request.path.startswith("/chat/"):
        return jsonify(error="model_unavailable", message="The model service is not answering. Try again."), 502
    return render_template("error.html", message="The model service is not answering."), 502


def register_error_handlers(app: Flask) -> None:
    app.register_error_handler(AiLimitExceeded, limit_reached)
    app.register_error_handler(CreditsInsufficient, limit_reached)
    app.register_error_handler(openai.APIError, model_unavailable)
    app.register_error_handler(anthropic.APIError, model_unavailable)
