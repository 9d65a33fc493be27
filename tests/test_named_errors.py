"""Named errors, not raw ones: NUL ids, unreachable billable pages, anonymous guarded requests, Retry-After."""

from __future__ import annotations

import datetime as dt
import typing as t
import urllib.parse
from decimal import Decimal

import pytest
from flask import jsonify
from flask import url_for

from flask_ai_metering import AiLimitExceeded
from flask_ai_metering import BillableRequired
from flask_ai_metering import CreditsInsufficient
from flask_ai_metering import InvalidUsage
from flask_ai_metering import quota_required
from tests.conftest import add_plan

if t.TYPE_CHECKING:
    from tests.conftest import AppFactory

TEAM = ("Team", "1")


def manual_call(meter: t.Any, **kw: t.Any) -> t.Any:
    kw.setdefault("billable", TEAM)
    return meter.call(lambda: "ok", provider="manual", model="m", usage={"input_tokens": 1}, **kw)


# -- NUL in ids --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        {"billable": ("Team", "a\x00b")},
        {"billable": ("Te\x00am", "1")},
        {"tenant": ("Org", "x\x00")},
        {"user": ("User", "\x00")},
        {"user": "u\x00"},
    ],
    ids=["billable id", "billable type", "tenant", "user tuple", "user id"],
)
def test_a_nul_in_an_id_is_invalid_usage(make_app: AppFactory, backend: str, kw: dict[str, t.Any]) -> None:
    app, _, meter = make_app()
    with app.app_context():
        with pytest.raises(InvalidUsage, match="NUL"):
            manual_call(meter, **kw)
        with pytest.raises(InvalidUsage, match="NUL"):
            meter.record(provider="manual", model="m", usage={"input_tokens": 1}, **{"billable": TEAM, **kw})


def dashboard(make_app: AppFactory) -> tuple[t.Any, t.Any]:
    app, _, meter = make_app()
    meter.dashboard_authorizer(lambda user: True)
    return app, meter


@pytest.mark.parametrize(
    "path",
    ["/ai-metering/billables/Team/a%00b", "/ai-metering/usage?billable=Team:a%00b", "/ai-metering/?billable=T%00:1"],
)
def test_a_nul_in_the_dashboard_is_a_400(make_app: AppFactory, backend: str, path: str) -> None:
    app, _ = dashboard(make_app)
    response = app.test_client().get(path)
    assert response.status_code == 400 and b"control characters" in response.data


# -- billable pages for any id ----------------------------------------------------------------

ODD_IDS = ["a/b", ".", "..", "a/../b", "a//b", "trailing/", "/lead", "~tilde", "~", "x/./y", "%2F"]


@pytest.mark.parametrize("ident", ODD_IDS)
def test_every_billable_id_has_a_reachable_page(make_app: AppFactory, ident: str) -> None:
    app, meter = dashboard(make_app)
    with app.app_context():
        meter.record(billable=("Team", ident), provider="manual", model="m", usage={"input_tokens": 1})
        other = f"other-{len(ident)}"
        meter.record(billable=("Team", other), provider="manual", model="m", usage={"input_tokens": 9})
    with app.test_request_context():
        href = url_for("ai_metering.billable", billable_type="Team", billable_id=ident)
    # What a browser requests for that link: dot segments removed, as RFC 3986 says.
    followed = urllib.parse.urlsplit(urllib.parse.urljoin("http://localhost/ai-metering/", href))
    response = app.test_client().get(followed.path)
    assert response.status_code == 200, (href, followed.path)
    page = response.get_data(as_text=True)
    assert f"Team:{ident}" in page or f"Team:{ident}".replace("&", "&amp;") in page
    overview = app.test_client().get("/ai-metering/").get_data(as_text=True)
    assert href.replace("&", "&amp;") in overview or href in overview


# -- anonymous guarded requests ---------------------------------------------------------------


def guarded_app(make_app: AppFactory, **config: t.Any) -> tuple[t.Any, t.Any, t.Any]:
    app, db, meter = make_app(**config)

    @app.post("/chat")
    @quota_required
    def chat() -> t.Any:
        return jsonify(ok=True)

    return app, db, meter


def test_an_anonymous_request_to_a_guarded_route_is_a_401(make_app: AppFactory) -> None:
    app, _, meter = guarded_app(make_app)
    response = app.test_client().post("/chat")  # the default resolver: nobody is logged in
    assert response.status_code == 401

    @meter.billable_resolver
    def nobody() -> None:
        return None

    assert app.test_client().post("/chat").status_code == 401


def test_the_app_decides_what_an_anonymous_request_gets(make_app: AppFactory) -> None:
    app, _, _ = guarded_app(make_app)

    @app.errorhandler(BillableRequired)
    def to_login(error: BillableRequired) -> t.Any:
        return jsonify(error="login_required"), 403

    response = app.test_client().post("/chat")
    assert response.status_code == 403 and response.json == {"error": "login_required"}


# -- Retry-After only when waiting helps ------------------------------------------------------


def test_no_retry_after_on_a_402(make_app: AppFactory) -> None:
    app, db, meter = guarded_app(make_app)
    meter.billable_resolver(lambda: TEAM)
    with app.app_context():
        add_plan(db, slug="credits", token_limit=None)  # no allowance: the wallet pays every token
        meter.subscribe(TEAM, "credits", billing_mode="credits")
        response = app.test_client().post("/chat")
        assert response.status_code == 402 and "Retry-After" not in response.headers
        assert "X-Remaining-Tokens" not in response.headers  # unlimited
        with pytest.raises(CreditsInsufficient) as raised:
            manual_call(meter)
        assert "Retry-After" not in dict(raised.value.get_headers())


def test_no_retry_after_for_an_expired_subscription(make_app: AppFactory) -> None:
    app, db, meter = guarded_app(make_app)
    meter.billable_resolver(lambda: TEAM)
    with app.app_context():
        add_plan(db, slug="p", token_limit=1000)
        meter.subscribe(TEAM, "p", ends_at=dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=1))
        response = app.test_client().post("/chat")
        assert response.status_code == 429 and "expired" in response.json["message"]
        assert "Retry-After" not in response.headers


def test_retry_after_when_the_limit_resets(make_app: AppFactory) -> None:
    app, db, meter = guarded_app(make_app)
    meter.billable_resolver(lambda: TEAM)
    with app.app_context():
        add_plan(db, slug="p", token_limit=10, cost_limit=Decimal("5"))
        meter.subscribe(TEAM, "p")
        meter.record(billable=TEAM, provider="manual", model="m", usage={"input_tokens": 10})
        response = app.test_client().post("/chat")
        assert response.status_code == 429 and int(response.headers["Retry-After"]) > 0


def test_no_retry_after_when_the_call_is_larger_than_a_whole_period(make_app):
    """Waiting for the reset cannot help a call that asks for more than the plan allows at all."""
    app, db, meter = make_app()

    @app.get("/big")
    @quota_required(tokens=5000)
    def big() -> t.Any:
        return jsonify(ok=True)

    @app.get("/small")
    @quota_required(tokens=10)
    def small() -> t.Any:
        return jsonify(ok=True)

    meter.billable_resolver(lambda: ("Team", "big"))
    with app.app_context():
        add_plan(db, slug="tiny", token_limit=1000)
        meter.subscribe(("Team", "big"), "tiny")
        meter.record(billable=("Team", "big"), provider="manual", usage={"input_tokens": 995})
    client = app.test_client()
    big_answer = client.get("/big")
    assert big_answer.status_code == 429 and "Retry-After" not in big_answer.headers
    small_answer = client.get("/small")
    assert small_answer.status_code == 429 and int(small_answer.headers["Retry-After"]) >= 1
    with app.app_context(), pytest.raises(AiLimitExceeded) as refused:
        meter.call(
            lambda: None, billable=("Team", "big"), provider="manual", max_tokens=2000, usage={"input_tokens": 1}
        )
    assert refused.value.check.fits_a_period is False
    assert "Retry-After" not in dict(refused.value.get_headers())
