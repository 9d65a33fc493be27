"""The example app: accounts, a streamed chat through the real SDKs and the local model
server, the friendly refusal at the Free limit, the upgrade, credits and the dashboard's access."""

from __future__ import annotations

import datetime as dt
import json
import typing as t
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient

from example_app import create_app
from example_app import llm
from example_app.model_server import LocalModelServer
from example_app.models import User
from flask_ai_metering.models import Usage

pytest.importorskip("openai")
pytest.importorskip("anthropic")


@pytest.fixture(scope="module")
def model_server() -> t.Iterator[LocalModelServer]:
    server = LocalModelServer(delay=0).start()
    yield server
    server.stop()


def make_demo(path: Path, template: Path, server: LocalModelServer | None, **config: t.Any) -> Flask:
    path.write_bytes(template.read_bytes())
    return create_app(
        {
            "TESTING": True,
            "SQLALCHEMY_DATABASE_URI": f"sqlite:///{path}",
            "OPENAI_API_KEY": None,
            "ANTHROPIC_API_KEY": None,
            "EXAMPLE_MODEL_SERVER_URL": server.url if server else None,
            **config,
        }
    )


def close_demo(app: Flask) -> None:
    """Close what a demo app holds open: its database pool and its SDK clients' sockets."""
    with app.app_context():
        app.extensions["sqlalchemy"].engine.dispose()
    app.extensions["example_llm"].close()


@pytest.fixture
def demo(tmp_path: Path, sqlite_template: Path, model_server: LocalModelServer) -> t.Iterator[Flask]:
    app = make_demo(tmp_path / "demo.sqlite", sqlite_template, model_server, EXAMPLE_FREE_TOKEN_LIMIT=700)
    yield app
    close_demo(app)


def ledger(app: Flask, **where: t.Any) -> list[t.Any]:
    with app.app_context():
        engine = app.extensions["sqlalchemy"].engine
        table = Usage.__table__
        query = sa.select(table).where(*(table.c[k] == v for k, v in where.items())).order_by(table.c.id)
        with engine.connect() as conn:
            return list(conn.execute(query).all())


def csrf(client: FlaskClient) -> str:
    client.get("/login")
    with client.session_transaction() as session:
        return str(session["csrf"])


def signup(client: FlaskClient, name: str = "Vera Visitor", email: str = "vera@example.org", **extra: str) -> t.Any:
    form = {"name": name, "email": email, "password": "correct horse", "team": "Vera's Lab", **extra}
    return client.post("/signup", data={**form, "csrf_token": csrf(client)})


def login(client: FlaskClient, email: str, password: str) -> t.Any:
    return client.post("/login", data={"email": email, "password": password, "csrf_token": csrf(client)})


def team_of(app: Flask, email: str) -> str:
    with app.app_context():
        db = app.extensions["sqlalchemy"]
        user = db.session.execute(sa.select(User).where(User.email == email)).scalar_one()
        return str(user.team_id)


def chat(client: FlaskClient, message: str, model: str = "gpt-4o-mini") -> tuple[t.Any, list[dict[str, t.Any]]]:
    """POST a message to the streaming endpoint; returns the response and its decoded events."""
    response = client.post(
        "/chat/stream",
        json={"message": message, "model": model, "history": []},
        headers={"X-CSRF-Token": csrf(client)},
    )
    events = []
    if response.mimetype == "text/event-stream":
        for block in response.get_data(as_text=True).split("\n\n"):
            if block.startswith("data: "):
                events.append(json.loads(block[len("data: ") :]))
    return response, events


def test_seed_demo_is_idempotent_and_seeds_the_demo_users(demo: Flask) -> None:
    runner = demo.test_cli_runner()
    first = runner.invoke(args=["seed-demo"])
    assert first.exit_code == 0, first.output
    assert "admin@example.com / admin-password" in first.output
    rows = len(ledger(demo))
    assert rows > 1000
    assert {r.billable_type for r in ledger(demo)} == {"Team"}
    assert len(ledger(demo, billable_id="acme")) > 100
    again = runner.invoke(args=["seed-demo"])
    assert again.exit_code == 0 and "Seeded 0 new" in again.output
    assert "0 member budget(s)" in again.output  # nor another member budget
    assert len(ledger(demo)) == rows
    client = demo.test_client()
    assert login(client, "admin@example.com", "admin-password").status_code == 302
    assert client.get("/ai-metering/").status_code == 200  # the admin sees the dashboard
    client.post("/logout", data={"csrf_token": csrf(client)})
    assert login(client, "member@example.com", "member-password").status_code == 302
    assert client.get("/ai-metering/").status_code == 403  # a member does not
    me = client.get("/ai-metering/me").get_json()
    assert me["billable"] == {"type": "Team", "id": "acme"} and me["plan"]["slug"] == "pro"


def test_sign_up_log_out_and_log_in(demo: Flask) -> None:
    client = demo.test_client()
    assert client.get("/chat").status_code == 302  # login required
    response = signup(client)
    assert response.status_code == 302 and response.location.endswith("/chat")
    page = client.get("/chat").get_data(as_text=True)
    assert "Vera&#39;s Lab" in page and "data-ai-usage-meter" in page and "of $1.00 used, resets in" in page
    with demo.app_context():
        db = demo.extensions["sqlalchemy"]
        user = db.session.execute(sa.select(User).where(User.email == "vera@example.org")).scalar_one()
        assert "correct horse" not in user.password_hash and user.check_password("correct horse")
        assert user.team.name == "Vera's Lab" and not user.is_admin
        meter = demo.extensions["ai_metering"]
        assert meter.subscription(("Team", user.team_id)).plan.slug == "free"
    assert client.get("/ai-metering/").status_code == 403
    client.post("/logout", data={"csrf_token": csrf(client)})
    assert client.get("/chat").status_code == 302
    assert login(client, "vera@example.org", "wrong password").status_code == 401
    assert login(client, "vera@example.org", "correct horse").status_code == 302
    assert client.get("/chat").status_code == 200
    # A second account with the same email is refused; a colleague joins with the team code.
    other = demo.test_client()
    assert signup(other, email="vera@example.org").status_code == 400
    code = team_of(demo, "vera@example.org")
    assert signup(other, name="Walt", email="walt@example.org", team_code=code).status_code == 302
    assert team_of(demo, "walt@example.org") == code
    assert "Walt" in client.get("/team").get_data(as_text=True)


def test_posts_need_the_csrf_token(demo: Flask) -> None:
    client = demo.test_client()
    response = client.post("/signup", data={"name": "x", "email": "x@example.org", "password": "12345678"})
    assert response.status_code == 400


@pytest.mark.parametrize(
    ("model", "provider"), [("gpt-4o-mini", "openai"), ("claude-haiku-4-5", "anthropic")], ids=["openai", "anthropic"]
)
def test_chat_streams_through_the_real_sdk(demo: Flask, model: str, provider: str) -> None:
    client = demo.test_client()
    signup(client)
    team = team_of(demo, "vera@example.org")
    response, events = chat(client, "How does metering work?", model)
    assert response.status_code == 200 and response.mimetype == "text/event-stream"
    deltas = [e["delta"] for e in events if "delta" in e]
    assert len(deltas) > 10  # word by word
    text = "".join(deltas)
    assert "You asked: “How does metering work?”." in text
    assert events[-1]["done"] is True and "data-ai-usage-meter" in events[-1]["meter"]
    [row] = ledger(demo, billable_id=team)
    assert (row.billable_type, row.provider, row.model, row.feature) == ("Team", provider, model, "chat")
    assert row.user_id == str(_user_id(demo, "vera@example.org"))
    # The local server counts one token per streamed word and ~4 characters a prompt token.
    assert row.output_tokens == len(deltas)
    assert row.input_tokens > 0 and row.total_cost > 0 and not row.unpriced
    assert row.total_tokens == row.input_tokens + row.output_tokens
    me = client.get("/ai-metering/me").get_json()
    assert me["tokens"]["used"] == row.total_tokens
    assert me["recent_calls"][0]["model"] == model


def _user_id(app: Flask, email: str) -> int:
    with app.app_context():
        db = app.extensions["sqlalchemy"]
        return int(db.session.execute(sa.select(User.id).where(User.email == email)).scalar_one())


def test_free_limit_shows_a_friendly_page_and_the_upgrade_lifts_it(demo: Flask) -> None:
    client = demo.test_client()
    signup(client)
    team = team_of(demo, "vera@example.org")
    statuses = []
    for i in range(10):
        response, _ = chat(client, f"Question number {i}")
        statuses.append(response.status_code)
        if response.status_code != 200:
            break
    assert statuses[0] == 200 and statuses[-1] == 429, statuses
    calls = len(ledger(demo, billable_id=team))
    assert calls == len(statuses) - 1  # the refused call was never sent nor recorded
    html = response.get_data(as_text=True)
    assert response.mimetype == "text/html"  # a page, not a JSON 429
    assert "reached your Free limit" in html and "It resets on" in html
    assert int(response.headers["Retry-After"]) > 0
    # Refused because what is left cannot hold another answer of up to MAX_TOKENS.
    me = client.get("/ai-metering/me").get_json()
    assert 0 <= me["tokens"]["remaining"] < llm.MAX_TOKENS + 100 and me["usage_percentage"] > 0
    upgrade = client.post(
        "/billing/plan", data={"plan": "pro", "next": "/chat", "csrf_token": csrf(client)}, follow_redirects=True
    )
    assert upgrade.status_code == 200 and "You&#39;re on the Pro plan now. Your 14-day trial has started." in (
        upgrade.get_data(as_text=True)
    )
    with demo.app_context():
        subscription = demo.extensions["ai_metering"].subscription(("Team", team))
        assert subscription.plan.slug == "pro"
        trial = subscription.trial_ends_at.replace(tzinfo=dt.timezone.utc)
        assert dt.timedelta(days=13) < trial - dt.datetime.now(dt.timezone.utc) <= dt.timedelta(days=14)
    response, events = chat(client, "And now?")
    assert response.status_code == 200 and events[-1]["done"]
    assert len(ledger(demo, billable_id=team)) == calls + 1


def test_credits_without_stripe_explain_what_to_set(demo: Flask) -> None:
    client = demo.test_client()
    signup(client)
    page = client.get("/billing").get_data(as_text=True)
    assert "Balance:" in page and "Upgrade to Pro" in page
    response = client.post("/billing/credits", data={"amount": "10", "csrf_token": csrf(client)})
    assert response.status_code == 503
    assert "AI_METERING_STRIPE_API_KEY" in response.get_data(as_text=True)
    assert client.post("/billing/credits", data={"amount": "7", "csrf_token": csrf(client)}).status_code == 400


def test_the_local_model_server_starts_on_first_use(tmp_path: Path, sqlite_template: Path) -> None:
    app = make_demo(tmp_path / "lazy.sqlite", sqlite_template, None)
    client = app.test_client()
    signup(client)
    response, events = chat(client, "hello", "claude-haiku-4-5")
    assert response.status_code == 200 and events[-1]["done"]
    close_demo(app)


class FakeCheckout:
    """Stands in for ``StripeClient().v1.checkout.sessions`` (localstripe has no Checkout)."""

    def __init__(self) -> None:
        self.created: list[dict[str, t.Any]] = []

    def create(self, params: dict[str, t.Any]) -> t.Any:
        self.created.append(params)
        return SimpleNamespace(id="cs_test_1", url="https://checkout.stripe.test/c/cs_test_1")

    def retrieve(self, session_id: str) -> t.Any:
        assert session_id == "cs_test_1"
        metadata = self.created[-1]["metadata"]
        return SimpleNamespace(id=session_id, payment_status="paid", metadata=metadata)


def test_credits_through_stripe_checkout(
    tmp_path: Path, sqlite_template: Path, model_server: LocalModelServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from example_app import views

    checkout = FakeCheckout()
    stripe_client = SimpleNamespace(v1=SimpleNamespace(checkout=SimpleNamespace(sessions=checkout)))
    monkeypatch.setattr(views, "_stripe_client", lambda: stripe_client)
    demo = make_demo(
        tmp_path / "stripe.sqlite", sqlite_template, model_server, AI_METERING_STRIPE_API_KEY="sk_test_example"
    )
    client = demo.test_client()
    signup(client)
    team = team_of(demo, "vera@example.org")
    response = client.post("/billing/credits", data={"amount": "10", "csrf_token": csrf(client)})
    assert response.status_code == 303 and response.location == "https://checkout.stripe.test/c/cs_test_1"
    [params] = checkout.created
    assert params["mode"] == "payment" and params["line_items"][0]["price_data"]["unit_amount"] == 1000
    assert params["metadata"] == {"team": team, "credits": "10"}
    for _ in range(2):  # a reload of the success page adds nothing more
        done = client.get("/billing/credits/done?session_id=cs_test_1")
        assert done.status_code == 302
    with demo.app_context():
        assert demo.extensions["ai_metering"].wallet(("Team", team)).balance == Decimal("10")
    close_demo(demo)


def test_seed_demo_leaves_a_team_in_its_trial_and_a_refund(tmp_path: t.Any, sqlite_template: t.Any) -> None:
    """Issue 12: the demo shows a trial and a refund."""
    import shutil

    from flask_ai_metering.models import Usage

    path = tmp_path / "seeded.sqlite"
    shutil.copy(sqlite_template, path)
    app = create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": f"sqlite:///{path}"})
    result = app.test_cli_runner().invoke(args=["seed-demo"])
    assert result.exit_code == 0, result.output
    with app.app_context():
        meter = app.extensions["ai_metering"]
        sub = meter.subscription(("Team", "hooli"))
        assert sub is not None and sub.trial_ends_at is not None
        assert sub.trial_ends_at > dt.datetime.now(dt.timezone.utc)
        with meter.runtime().store.engine.connect() as conn:
            kinds = list(conn.execute(sa.select(Usage.__table__.c.kind).where(Usage.__table__.c.kind == "refund")))
        assert len(kinds) == 1


def test_every_member_has_a_daily_budget_fit_for_the_team_plan(demo: Flask) -> None:
    """Seeded members, a sign-up and an upgrade (issue 15); budgets the plan makes pointless: none."""
    from example_app.seed import TEAMS
    from flask_ai_metering.ops.health import validate
    from flask_ai_metering.ops.reconcile import reconcile

    runner = demo.test_cli_runner()
    assert runner.invoke(args=["seed-demo"]).exit_code == 0  # (a re-run adds none: the idempotency test)

    def daily(team: str) -> dict[str | None, t.Any]:
        with demo.app_context():
            return {b.user_id: b for b in demo.extensions["ai_metering"].budgets(("Team", team)) if b.period == "day"}

    with demo.app_context():
        users = demo.extensions["sqlalchemy"].session.execute(sa.select(User.id, User.team_id)).all()
    for user_id, team_id in users:
        budget = daily(team_id)[str(user_id)]
        assert budget.scope == f"Team:{team_id} user {user_id}"
        free_team = team_id in {team[0] for team in TEAMS if team[2] == "free"}
        assert (budget.token_limit, budget.request_limit) == ((None, 50) if free_team else (100_000, 200))
    listed = json.loads(
        runner.invoke(args=["ai-metering", "budgets", "--billable", "Team:acme", "--format", "json"]).output
    )
    assert len(listed) == 2 and all(b["used"]["requests"] >= 0 for b in listed)

    client = demo.test_client()
    signup(client)
    team = team_of(demo, "vera@example.org")
    [free] = daily(team).values()
    assert (free.token_limit, free.request_limit) == (None, 50)
    client.post("/billing/plan", data={"plan": "pro", "next": "/chat", "csrf_token": csrf(client)})
    [pro] = daily(team).values()
    assert (pro.token_limit, pro.request_limit) == (100_000, 200) and pro.id != free.id
    response, _ = chat(client, "Does my budget count this?")
    assert response.status_code == 200
    [counted] = json.loads(
        runner.invoke(args=["ai-metering", "budgets", "--billable", f"Team:{team}", "--format", "json"]).output
    )
    assert counted["used"]["requests"] == 1
    with demo.app_context():
        assert [line for line in validate(demo) if line.startswith("budgets:")] == []
        assert reconcile(demo.extensions["ai_metering"].runtime()) == []
