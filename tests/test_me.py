"""``GET <prefix>/me`` and the ``_usage_meter.html`` include: the current user's own usage only."""

from __future__ import annotations

import datetime as dt
import typing as t
from decimal import Decimal

import pytest
from flask import Flask
from flask import render_template_string
from jinja2 import StrictUndefined

from flask_ai_metering import AiMetering
from tests.conftest import AppFactory
from tests.conftest import add_plan

flask_login = pytest.importorskip("flask_login")

PRICES = {"openai": {"models": {"gpt-4o-mini": {"input_price_per_1k": "0.00015", "output_price_per_1k": "0.0006"}}}}


class User(flask_login.UserMixin):  # type: ignore[misc]
    def __init__(self, user_id: str, team: str) -> None:
        self.id = user_id
        self.team = team


USERS = {"1": User("1", "a"), "2": User("2", "b")}


def build(make_app: AppFactory) -> tuple[Flask, AiMetering]:
    app, db, meter = make_app(AI_METERING_PROVIDERS=PRICES)
    app.jinja_env.undefined = StrictUndefined
    manager = flask_login.LoginManager(app)
    manager.user_loader(USERS.get)

    @meter.billable_resolver
    def team() -> tuple[str, str]:
        return ("Team", flask_login.current_user.team)

    # The admin authorizer says no to everybody: /me must not depend on it.
    meter.dashboard_authorizer(lambda user: False)

    @app.get("/login/<user_id>")
    def login(user_id: str) -> str:
        flask_login.login_user(USERS[user_id])
        return "ok"

    @app.get("/page")
    def page() -> str:
        return render_template_string('<main>{% include "ai_metering/_usage_meter.html" %}</main>')

    with app.app_context():
        add_plan(db, slug="free", name="Free", token_limit=10_000, cost_limit=Decimal("1"))
        db.session.remove()
        meter.subscribe(("Team", "a"), "free")
        now = dt.datetime.now(dt.timezone.utc)
        rows = []
        for i in range(25):
            chat = i < 15
            rows.append(
                {
                    "billable": ("Team", "a"),
                    "user": ("User", "1"),
                    "provider": "openai",
                    "model": "gpt-4o-mini",
                    "feature": "chat" if chat else "summary",
                    "usage": {"input_tokens": 100, "output_tokens": 50}
                    if chat
                    else {"input_tokens": 200, "output_tokens": 100},
                    # i = 0 is the newest: calls 0..14 are chat, 15..24 summary.
                    "occurred_at": now - dt.timedelta(seconds=i),
                }
            )
        rows += [
            {
                "billable": ("Team", "b"),
                "user": ("User", "2"),
                "provider": "openai",
                "model": "gpt-4o-mini",
                "feature": "secret-b",
                "usage": {"input_tokens": 7000, "output_tokens": 7},
            }
        ]
        meter.record_batch(rows)
    return app, meter


@pytest.fixture
def app(make_app: AppFactory, backend: str) -> Flask:
    """The app on SQLite, PostgreSQL and MariaDB (``backend`` parametrizes ``make_app``'s database)."""
    return build(make_app)[0]


def test_me_shape_and_exact_numbers(app: Flask) -> None:
    client = app.test_client()
    client.get("/login/1")
    response = client.get("/ai-metering/me")
    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "private, no-store"
    body = response.get_json()
    assert set(body) == {
        "billable",
        "plan",
        "allowed",
        "usage_percentage",
        "period",
        "resets_at",
        "resets_in_seconds",
        "tokens",
        "cost",
        "by_feature",
        "recent_calls",
    }
    assert body["billable"] == {"type": "Team", "id": "a"}
    assert body["plan"] == {"slug": "free", "name": "Free", "billing_mode": "plan", "trial_ends_at": None}
    # 15 chat calls of 150 tokens + 10 summary calls of 300 tokens.
    assert body["tokens"] == {"used": 5250, "reserved": 0, "limit": 10_000, "remaining": 4750}
    # chat: 0.1 * 0.00015 + 0.05 * 0.0006 = 0.000045 a call; summary: 0.00009.
    assert body["cost"] == {
        "used": "0.001575000000",
        "reserved": "0.000000000000",
        "limit": "1.000000000000",
        "remaining": "0.998425000000",
        "currency": "usd",
    }
    assert body["usage_percentage"] == 52.5 and body["allowed"] is True
    resets_at = dt.datetime.fromisoformat(body["resets_at"])
    assert body["period"]["end"] == body["resets_at"]
    assert dt.datetime.fromisoformat(body["period"]["start"]) <= dt.datetime.now(dt.timezone.utc) < resets_at
    assert 0 < body["resets_in_seconds"] <= 31 * 86400
    assert body["by_feature"] == [
        {"feature": "summary", "calls": 10, "total_tokens": 3000, "total_cost": "0.000900000000"},
        {"feature": "chat", "calls": 15, "total_tokens": 2250, "total_cost": "0.000675000000"},
    ]
    recent = body["recent_calls"]
    assert len(recent) == 20
    assert [c["feature"] for c in recent] == ["chat"] * 15 + ["summary"] * 5
    times = [dt.datetime.fromisoformat(c["occurred_at"]) for c in recent]
    assert times == sorted(times, reverse=True)
    assert recent[0] | {"id": 0, "occurred_at": ""} == {
        "id": 0,
        "occurred_at": "",
        "user_id": "1",
        "provider": "openai",
        "model": "gpt-4o-mini",
        "feature": "chat",
        "input_tokens": 100,
        "output_tokens": 50,
        "total_tokens": 150,
        "total_cost": "0.000045000000",
        "currency": "usd",
    }


def test_another_billable_is_never_visible(app: Flask) -> None:
    client = app.test_client()
    client.get("/login/2")
    for url in ("/ai-metering/me", "/ai-metering/me?billable=Team:a", "/ai-metering/me?billable_id=a"):
        body = client.get(url).get_json()
        assert body["billable"] == {"type": "Team", "id": "b"}
        assert body["plan"] is None
        assert body["tokens"]["used"] == 7007 and body["tokens"]["limit"] is None
        assert [f["feature"] for f in body["by_feature"]] == ["secret-b"]
        assert {c["user_id"] for c in body["recent_calls"]} == {"2"}
    # One route, no parameters: nothing in the request can name a billable.
    assert [r.arguments for r in app.url_map.iter_rules() if r.endpoint == "ai_metering_me.me"] == [set()]
    client.get("/login/1")
    assert "secret-b" not in client.get("/ai-metering/me").get_data(as_text=True)


def test_anonymous_is_401_and_the_admin_dashboard_stays_closed(app: Flask) -> None:
    client = app.test_client()
    response = client.get("/ai-metering/me")
    assert response.status_code == 401 and response.get_json()["error"] == "unauthorized"
    client.get("/login/1")
    assert client.get("/ai-metering/me").status_code == 200
    assert client.get("/ai-metering/").status_code == 403  # /me is not behind the admin authorizer


def test_without_flask_login_the_resolver_decides(make_app: AppFactory) -> None:
    app, _, meter = make_app()
    who: list[t.Any] = [None]
    meter.billable_resolver(lambda: who[0])
    client = app.test_client()
    assert client.get("/ai-metering/me").status_code == 401
    who[0] = ("Team", "z")
    body = client.get("/ai-metering/me").get_json()
    assert body["billable"] == {"type": "Team", "id": "z"} and body["recent_calls"] == []


def test_the_include_renders_the_meter(app: Flask) -> None:
    client = app.test_client()
    assert client.get("/page").get_data(as_text=True) == "<main></main>"  # anonymous: nothing
    client.get("/login/1")
    html = client.get("/page").get_data(as_text=True)
    assert "data-ai-usage-meter" in html and 'data-state="ok"' in html
    assert "$0.001575 of $1.00 used, resets in " in html
    assert "5,250 of 10,000 tokens" in html and 'value="52.5"' in html
    client.get("/login/2")
    # Team b has no plan: no limits, so only what it spent.
    assert "$0.001054 used, resets in " in client.get("/page").get_data(as_text=True)


def test_the_meter_text_for_a_token_only_plan(make_app: AppFactory) -> None:
    app, db, meter = make_app()
    meter.billable_resolver(lambda: ("Team", "t"))
    with app.app_context():
        add_plan(db, slug="tokens", token_limit=2000)
        db.session.remove()
        meter.subscribe(("Team", "t"), "tokens")
        meter.record(billable=("Team", "t"), provider="manual", model="m", usage={"input_tokens": 1700})
    with app.test_request_context():
        html = render_template_string('{% include "ai_metering/_usage_meter.html" %}')
    assert "1,700 of 2,000 tokens used, resets in " in html and 'data-state="approaching"' in html
