"""One billable per customer (issue 12): tuples, instances and ``current_user`` map to one ``(type, id)``."""

from __future__ import annotations

import json
import typing as t

import pytest
import sqlalchemy as sa
from flask_login import LoginManager
from flask_login import UserMixin
from flask_login import current_user
from flask_login import login_user

from flask_ai_metering import ConfigurationError
from flask_ai_metering import InvalidUsage
from flask_ai_metering.models import Counter
from flask_ai_metering.models import Usage
from flask_ai_metering.ops.reconcile import reconcile
from tests.conftest import add_plan

if t.TYPE_CHECKING:
    from tests.conftest import AppFactory


def spend(meter: t.Any, billable: t.Any, tokens: int = 10) -> t.Any:
    return meter.call(
        lambda: None, billable=billable, provider="manual", max_tokens=tokens, usage={"output_tokens": tokens}
    )


def stored(meter: t.Any, model: t.Any) -> list[tuple[str, str]]:
    table = model.__table__
    with meter.runtime().store.engine.connect() as conn:
        return sorted({(r.billable_type, r.billable_id) for r in conn.execute(sa.select(table))})


def models(db: t.Any) -> tuple[type, type]:
    class Team(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "teams"
        id = sa.Column(sa.Integer, primary_key=True)

    class User(UserMixin, db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "users"
        id = sa.Column(sa.Integer, primary_key=True)

    return Team, User


def test_every_form_of_one_customer_is_one_billable(make_app: AppFactory, backend: str) -> None:
    app, db, meter = make_app()
    Team, _ = models(db)
    with app.app_context():
        add_plan(db, slug="pro", token_limit=100)
        meter.subscribe(("team", 42), "pro")
        spend(meter, Team(id=42))
        spend(meter, ("TEAM", "42"))
        spend(meter, ("Team", 42))
        assert meter.check(("team", "42")).remaining_tokens == 70
        assert meter.subscription(Team(id=42)) is not None
        assert stored(meter, Usage) == stored(meter, Counter) == [("Team", "42")]
        spend(meter, ("Workspace", 1))  # no such model, no alias: stored as given
        assert ("Workspace", "1") in stored(meter, Usage)
        assert reconcile(meter.runtime()) == []


def test_flask_logins_current_user_is_its_model(make_app: AppFactory) -> None:
    app, db, meter = make_app()
    _, User = models(db)
    login = LoginManager(app)
    login.user_loader(lambda ident: User(id=int(ident)))
    with app.test_request_context(), app.app_context():
        login_user(User(id=7))
        assert meter.resolve_billable(current_user) == ("User", "7")
        spend(meter, current_user)
        spend(meter, ("user", 7))
        assert stored(meter, Usage) == [("User", "7")]


def test_aliases_from_the_extension_and_from_config(make_app: AppFactory) -> None:
    app, db, meter = make_app(AI_METERING_BILLABLE_ALIASES={"org": "Team"})
    kept = models(db)  # noqa: F841 (alive while the test runs)
    meter.billable_alias("account", "Team")
    with app.app_context():
        assert meter.resolve_billable(("ORG", 1)) == ("Team", "1")
        assert meter.resolve_billable(("Account", 1)) == ("Team", "1")
        with pytest.raises(InvalidUsage, match="already maps to 'Team'"):
            meter.billable_alias("org", "Company")
        with pytest.raises(InvalidUsage, match="is the name of model 'User'"):
            meter.billable_alias("user", "Team")
        with pytest.raises(InvalidUsage, match="alias must be a non-empty str"):
            meter.billable_alias("", "Team")
    with pytest.raises(ConfigurationError, match="AI_METERING_BILLABLE_ALIASES must map str to str"):
        make_app(AI_METERING_BILLABLE_ALIASES={"org": 1})


def test_ambiguous_forms_are_refused_and_record_nothing(make_app: AppFactory) -> None:
    app, db, meter = make_app()

    class Team(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "teams_a"
        id = sa.Column(sa.Integer, primary_key=True)

    class TEAM(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "teams_b"
        id = sa.Column(sa.Integer, primary_key=True)

    with app.app_context():
        with pytest.raises(InvalidUsage, match="matches the models TEAM, Team: it is ambiguous"):
            spend(meter, ("team", 1))
        assert meter.resolve_billable(("TEAM", 1)) == ("TEAM", "1")  # the exact name is not ambiguous
        assert meter.resolve_billable(Team(id=1)) == ("Team", "1")
        assert stored(meter, Usage) == []


def test_report_canonicalises_its_billable(make_app: AppFactory) -> None:
    app, db, meter = make_app()
    kept = models(db)  # mapped classes are weakly referenced by their registry: keep them alive
    with app.app_context():
        spend(meter, ("team", 1))
        outcome = app.test_cli_runner().invoke(
            args=["ai-metering", "report", "--billable", "team:1", "--format", "json"]
        )
        assert outcome.exit_code == 0, outcome.output
        report = json.loads(outcome.stdout)
        assert report["totals"]["calls"] == 1, report
        assert [row["billable"] for row in report["by_billable"]] == ["Team:1"] and kept
