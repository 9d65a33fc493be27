"""Every ``flask ai-metering`` command and option of operations, through the registered CLI group."""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import io
import json
import typing as t
from decimal import Decimal

import pytest
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_ai_metering import AiMetering
from flask_ai_metering import signals
from flask_ai_metering.metering import holds
from flask_ai_metering.metering.spec import CallSpec
from flask_ai_metering.models import Base
from flask_ai_metering.models import Counter
from flask_ai_metering.models import Plan
from flask_ai_metering.models import Usage
from flask_ai_metering.ops import schema as migrations
from tests.conftest import add_plan

UTC = dt.timezone.utc
TEAM = ("Team", "42")


@pytest.fixture
def runner(app: t.Any) -> t.Any:
    return app.test_cli_runner()


def run(runner: t.Any, *args: str) -> t.Any:
    return runner.invoke(args=["ai-metering", *args])


def snapshot(meter: t.Any) -> dict[str, list[t.Any]]:
    with meter.runtime().store.engine.connect() as conn:
        return {
            table.name: [tuple(r) for r in conn.execute(sa.select(table).order_by(*table.primary_key.columns))]
            for table in Base.metadata.sorted_tables
        }


def record(meter: t.Any, billable: tuple[str, str] = TEAM, **kw: t.Any) -> None:
    kw.setdefault("occurred_at", dt.datetime(2026, 1, 10, tzinfo=UTC))
    meter.record(
        billable=billable,
        provider="openai",
        model="gpt-4o-mini",
        usage={"input_tokens": 1000, "output_tokens": 100},
        **kw,
    )


# -- db -------------------------------------------------------------------------------------


def test_db_current_downgrade_upgrade(runner, meter):
    result = run(runner, "db", "current")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == {"current": migrations.head(), "head": migrations.head()}
    result = run(runner, "db", "downgrade", "base", "--yes")
    assert result.exit_code == 0 and "Metering schema at None" in result.stderr
    assert json.loads(run(runner, "db", "current").stdout)["current"] is None
    result = run(runner, "db", "upgrade")
    assert result.exit_code == 0 and f"Metering schema at {migrations.head()}" in result.stderr
    assert run(runner, "ai-metering-typo").exit_code == 2


# -- expire-reservations, reconcile ----------------------------------------------------------


def test_expire_reservations(runner, meter):
    rt = meter.runtime()
    past = dt.datetime.now(UTC) - dt.timedelta(hours=1)
    holds.reserve(rt, CallSpec(billable=TEAM, provider="manual", max_tokens=50), now=past)
    holds.reserve(rt, CallSpec(billable=TEAM, provider="manual", max_tokens=50))  # still live
    result = run(runner, "expire-reservations")
    assert result.exit_code == 0 and "Released 1 expired reservation(s); wrote 0 queued usage row(s);" in result.stderr
    assert meter.check(TEAM).reserved_tokens == 50
    assert "Released 0" in run(runner, "expire-reservations").stderr


def test_reconcile_reports_drift_and_fix_repairs_it(runner, meter):
    record(meter, occurred_at=None)
    assert run(runner, "reconcile").exit_code == 0
    with meter.runtime().store.engine.begin() as conn:
        conn.execute(sa.update(Counter).values(used_tokens=Counter.used_tokens + 5))
    result = run(runner, "reconcile")
    assert result.exit_code == 1 and "used_tokens 1105 != ledger 1100" in result.stdout
    result = run(runner, "reconcile", "--fix")
    assert result.exit_code == 0 and "Fixed." in result.stderr
    result = run(runner, "reconcile")
    assert result.exit_code == 0 and result.stdout == "" and "No drift." in result.stderr


# -- plans, migrate-plan ----------------------------------------------------------------------


def test_plans(runner, meter, db):
    add_plan(db, slug="pro", token_limit=1000, cost_limit=Decimal("5"))
    meter.subscribe(TEAM, "pro")
    result = run(runner, "plans")
    assert result.exit_code == 0
    assert result.stdout.splitlines()[1].split() == [
        *["pro", "Pro", "1,000", "5.00", "monthly", "-", "all", "yes", "-", "1", "0"]
    ]


def test_migrate_plan_moves_the_billable_and_fires_plan_changed(runner, meter, db):
    add_plan(db, slug="free", token_limit=100)
    add_plan(db, slug="pro", token_limit=10_000)
    meter.subscribe(TEAM, "free")
    changes: list[dict[str, t.Any]] = []

    def on_change(sender: t.Any, **kw: t.Any) -> None:
        changes.append(kw)

    with signals.plan_changed.connected_to(on_change):
        result = run(runner, "migrate-plan", "Team:42", "pro", "--from-plan", "free")
    assert result.exit_code == 0 and "Team:42 is on plan 'pro'." in result.stderr
    assert [(c["billable"], c["old_plan"], c["new_plan"]) for c in changes] == [(TEAM, "free", "pro")]
    assert meter.subscription(TEAM).plan.slug == "pro"
    assert meter.check(TEAM).token_limit == 10_000
    result = run(runner, "migrate-plan", "Team:7", "pro")  # no plan yet: subscribes
    assert result.exit_code == 0 and meter.subscription(("Team", "7")).plan.slug == "pro"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["Team:42", "pro", "--from-plan", "enterprise"], "is on plan 'free', not 'enterprise'"),
        (["Team:42", "nope"], "plan 'nope' does not exist"),
        (["Team42", "pro"], "expected TYPE:ID"),
        (["Team:", "pro"], "expected TYPE:ID"),
        (["Team:42"], "Missing argument 'PLAN_SLUG'"),
        (["Team:42", "pro", "--from-plan"], "requires an argument"),
        (["Team:42", "pro", "--bogus"], "No such option"),
    ],
)
def test_migrate_plan_bad_arguments_exit_2_and_change_nothing(runner, meter, db, args, message):
    add_plan(db, slug="free")
    add_plan(db, slug="pro")
    meter.subscribe(TEAM, "free")
    before = snapshot(meter)
    result = run(runner, "migrate-plan", *args)
    assert result.exit_code == 2 and message in result.stderr
    assert snapshot(meter) == before


# -- report -----------------------------------------------------------------------------------


def test_report_formats_and_filters(runner, meter):
    record(meter, tenant=("Tenant", "acme"), feature="chat")
    record(meter, billable=("Team", "7"))
    result = run(runner, "report", "--month", "2026-01", "--format", "json")
    assert result.exit_code == 0 and result.stderr == ""
    report = json.loads(result.stdout)
    assert report["totals"] == {
        "calls": 2,
        "input_tokens": 2000,
        "output_tokens": 200,
        "total_tokens": 2200,
        "total_cost": "0.000420000000",
        "refunded_cost": "0.000000000000",
    }
    one = json.loads(run(runner, "report", "--month", "2026-01", "--billable", "Team:7", "--format", "json").stdout)
    assert [r["billable"] for r in one["by_billable"]] == ["Team:7"]
    acme = json.loads(run(runner, "report", "--month", "2026-01", "--tenant", "acme", "--format", "json").stdout)
    assert acme["totals"]["calls"] == 1 and acme["by_feature"][0]["feature"] == "chat"
    rows = list(csv.DictReader(io.StringIO(run(runner, "report", "--month", "2026-01", "--format", "csv").stdout)))
    assert rows[0]["section"] == "totals" and rows[0]["total_cost"] == "0.000420000000"
    table = run(runner, "report", "--month", "2026-01")
    assert table.exit_code == 0 and "By billable" in table.stdout and "Team:7" in table.stdout
    this_month = json.loads(run(runner, "report", "--format", "json").stdout)
    assert this_month["totals"]["calls"] == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--month", "2026-13"], "expected YYYY-MM"),
        (["--month", "Jan"], "expected YYYY-MM"),
        (["--billable", "Team"], "expected TYPE:ID"),
        (["--format", "xml"], "'xml' is not one of"),
        (["--month"], "requires an argument"),
        (["extra"], "unexpected extra argument"),
    ],
)
def test_report_bad_arguments_exit_2(runner, meter, args, message):
    result = run(runner, "report", *args)
    assert result.exit_code == 2 and message in result.stderr and result.stdout == ""


# -- validate ---------------------------------------------------------------------------------


def test_validate_passes_on_a_healthy_install(runner, meter):
    record(meter)
    result = run(runner, "validate")
    assert result.exit_code == 0 and result.stdout == "" and "Everything checks out." in result.stderr


def test_validate_lists_one_line_per_problem(make_app):
    app, db, meter = make_app(AI_METERING_PRORIDERS={})
    with app.app_context():
        add_plan(db, slug="gone")
        meter.subscribe(TEAM, "gone")
        meter.record(billable=TEAM, provider="openai", model="gpt-unknown-9", usage={"input_tokens": 3})
        rt = meter.runtime()
        holds.reserve(
            rt,
            CallSpec(billable=("Team", "1"), provider="manual", max_tokens=5),
            now=dt.datetime.now(UTC) - dt.timedelta(hours=1),
        )
        with rt.store.engine.begin() as conn:
            conn.execute(sa.update(Counter).where(Counter.billable_id == "42").values(calls=9))
            conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
            conn.execute(sa.delete(Plan.__table__))
        app.config["AI_METERING_OVERAGE_BEHAVIOR"] = "sometimes"
        result = app.test_cli_runner().invoke(args=["ai-metering", "validate"])
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert lines[0] == "config: unknown key AI_METERING_PRORIDERS; did you mean AI_METERING_PROVIDERS?"
    assert lines[1].startswith("config: AI_METERING_OVERAGE_BEHAVIOR must be one of block, allow, charge")
    assert any(line.startswith("ledger: counter ") and "calls 9 != ledger 1" in line for line in lines)
    assert any(
        line.startswith("data: subscription ") and "(1 usage row(s) counted under an unknown plan)" in line
        for line in lines
    )
    assert "pricing: 1 usage row(s) of openai/gpt-unknown-9 are unpriced" in result.stdout
    assert "reservations: 1 past their expiry still hold quota" in result.stdout
    assert len(lines) == 6


def test_validate_reports_an_unknown_billing_driver_and_a_missing_schema(make_app, tmp_path):
    from flask_ai_metering.ops.health import validate

    app, _, _ = make_app(AI_METERING_BILLING_DRIVER="nowhere.Driver")
    with app.app_context():
        [line] = validate(app)
    assert line.startswith("config: AI_METERING_BILLING_DRIVER: cannot import 'nowhere.Driver'")
    with app_on(f"sqlite:///{tmp_path}/empty.sqlite") as app:
        result = app.test_cli_runner().invoke(args=["ai-metering", "validate"])
    assert result.exit_code == 1
    assert result.stdout.startswith("database: the metering tables are not created in sqlite:///")
    with app_on("postgresql+psycopg://nobody:pw@127.0.0.1:9/x") as app:
        [line] = validate(app)
    assert line.startswith("database: cannot connect to postgresql+psycopg://nobody:***@127.0.0.1:9/x")


@contextlib.contextmanager
def app_on(url: str) -> t.Iterator[Flask]:
    """An app on a database the fixtures did not prepare."""
    app = Flask("elsewhere")
    app.config.update(SQLALCHEMY_DATABASE_URI=url, SECRET_KEY="a-long-random-secret-key-0123456789")
    db = SQLAlchemy(app)
    AiMetering(app, db=db)
    with app.app_context():
        yield app
        db.engine.dispose()


# -- forget, anonymize ------------------------------------------------------------------------


def test_forget_and_dry_run(runner, meter):
    record(meter)
    record(meter, billable=("Team", "7"))
    before = snapshot(meter)
    result = run(runner, "forget", "Team:42", "--dry-run")
    assert result.exit_code == 0 and "Would change 1 usage rows" in result.stdout
    assert snapshot(meter) == before
    result = run(runner, "forget", "Team:42", "--yes")
    assert result.exit_code == 0 and "Changed 1 usage rows" in result.stdout
    with meter.runtime().store.engine.connect() as conn:
        assert list(conn.execute(sa.select(Usage.billable_id)).scalars()) == ["7"]
    assert run(runner, "reconcile").exit_code == 0


def test_anonymize_and_dry_run(runner, meter):
    record(meter, user=("User", "1"), occurred_at=dt.datetime(2026, 1, 1, tzinfo=UTC))
    record(meter, user=("User", "1"), occurred_at=dt.datetime(2026, 1, 2, tzinfo=UTC))
    before = snapshot(meter)
    result = run(runner, "anonymize", "--before", "2026-01-02", "--dry-run")
    assert result.exit_code == 0 and result.stdout.strip() == "Would anonymize 1 usage row(s)"
    assert snapshot(meter) == before
    result = run(runner, "anonymize", "--before", "2026-01-02", "--yes")
    assert result.exit_code == 0 and result.stdout.strip() == "Anonymized 1 usage row(s)"
    with meter.runtime().store.engine.connect() as conn:
        assert list(conn.execute(sa.select(Usage.user_id).order_by(Usage.id)).scalars()) == [None, "1"]
    assert run(runner, "reconcile").exit_code == 0


@pytest.mark.parametrize(
    "args",
    [
        ["forget"],
        ["forget", "Team42"],
        ["forget", "Team:42", "--dry"],
        ["anonymize"],
        ["anonymize", "--before", "2026-13-01"],
        ["anonymize", "--before", "yesterday"],
        ["anonymize", "--before"],
    ],
)
def test_privacy_bad_arguments_exit_2_and_change_nothing(runner, meter, args):
    record(meter, user=("User", "1"))
    before = snapshot(meter)
    result = run(runner, *args)
    assert result.exit_code == 2 and "Error:" in result.stderr
    assert snapshot(meter) == before
