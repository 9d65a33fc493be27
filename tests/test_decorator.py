"""@quota_required: 429 / 402 / 403 with the limit headers, on sync and async views."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from flask import jsonify

from flask_ai_metering import AiLimitExceeded
from flask_ai_metering import quota_required
from tests.conftest import add_plan

TEAM = ("Team", "1")


@pytest.fixture
def guarded(make_app):
    app, db, meter = make_app()

    @meter.billable_resolver
    def resolve():
        return TEAM

    @app.post("/chat")
    @quota_required
    def chat():
        return jsonify(ok=True)

    @app.post("/big")
    @quota_required(tokens=4000, feature="chat")
    async def big():
        return {"ok": True}

    @app.post("/summary")
    @quota_required(feature="summary")
    def summary():
        return "ok"

    with app.app_context():
        add_plan(db, slug="p", token_limit=5000, cost_limit=Decimal("2"), features=["chat"])
        meter.subscribe(TEAM, "p")
    return app, db, meter


def test_allowed_responses_carry_remaining_headers(guarded):
    app, _, meter = guarded
    response = app.test_client().post("/chat")
    assert response.status_code == 200
    assert response.headers["X-Remaining-Tokens"] == "5000"
    assert response.headers["X-Remaining-Cost"] == "2"
    assert response.headers["X-Usage-Percentage"] == "0.00"
    assert response.headers["RateLimit-Limit"] == "5000"
    assert "Retry-After" not in response.headers


def test_refusals_are_429_with_headers_and_json_body(guarded):
    app, _, meter = guarded
    with app.app_context():
        meter.record(billable=TEAM, provider="manual", usage={"output_tokens": 1500})
    client = app.test_client()
    assert client.post("/chat").status_code == 200
    response = client.post("/big")  # needs 4000, 3500 remain
    assert response.status_code == 429
    body = json.loads(response.data)
    assert body["error"] == "ai_limit_exceeded" and "resets" in body["message"]
    assert body["remaining_tokens"] == 3500
    assert response.headers["X-Remaining-Tokens"] == "3500"
    assert int(response.headers["Retry-After"]) > 0
    assert response.headers["RateLimit-Remaining"] == "3500"
    assert response.headers["Content-Type"] == "application/json"


def test_feature_not_in_plan_is_403(guarded):
    app, _, _ = guarded
    assert app.test_client().post("/summary").status_code == 403


def test_unlimited_dimensions_are_left_out(make_app):
    app, db, meter = make_app()
    meter.billable_resolver(lambda: TEAM)

    @app.get("/x")
    @quota_required
    def x():
        return "ok"

    response = app.test_client().get("/x")
    assert response.status_code == 200
    assert "X-Remaining-Tokens" not in response.headers and "X-Remaining-Cost" not in response.headers


def test_credits_mode_empty_wallet_is_402(make_app):
    app, db, meter = make_app()
    meter.billable_resolver(lambda: TEAM)

    @app.get("/x")
    @quota_required
    def x():
        return "ok"

    with app.app_context():
        add_plan(db, slug="c", token_limit=None)  # no allowance: the wallet pays every token
        meter.subscribe(TEAM, "c", billing_mode="credits")
    response = app.test_client().get("/x")
    assert response.status_code == 402
    assert json.loads(response.data)["error"] == "credits_insufficient"
    with app.app_context():
        meter.wallet(TEAM).add_credits(Decimal("5"))
    assert app.test_client().get("/x").status_code == 200


def test_app_can_customise_the_429(guarded):
    app, _, meter = guarded

    @app.errorhandler(AiLimitExceeded)
    def custom(error):
        return {"custom": True, "left": error.check.remaining_tokens}, 429

    with app.app_context():
        meter.record(billable=TEAM, provider="manual", usage={"output_tokens": 5000})
    response = app.test_client().post("/chat")
    assert response.status_code == 429 and response.json == {"custom": True, "left": 0}


def test_missing_billable_is_a_clear_error(make_app):
    app, _, _ = make_app()

    @app.get("/x")
    @quota_required
    def x():
        return "ok"

    app.config["TESTING"] = False
    response = app.test_client().get("/x")
    assert response.status_code == 401  # nobody to bill: an anonymous request, not a server error
