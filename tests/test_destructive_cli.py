"""Destructive commands (``db downgrade``, ``forget``, ``anonymize``, ``cleanup``) need an explicit yes.

Off a terminal they refuse (exit 2, nothing changed) unless ``--yes`` is given; on
a terminal they ask. ``--dry-run`` stays the safe preview, without asking.
"""

from __future__ import annotations

import datetime as dt
import typing as t

import pytest
import sqlalchemy as sa

from flask_ai_metering import cli as cli_module
from flask_ai_metering.models import Base
from flask_ai_metering.models import utcnow
from flask_ai_metering.ops import schema as migrations

UTC = dt.timezone.utc
TEAM = ("Team", "42")
SECRET = "a-long-random-secret-key-for-tests-0123456789"


@pytest.fixture
def runner(app: t.Any) -> t.Any:
    app.config["SECRET_KEY"] = SECRET
    return app.test_cli_runner()


def run(runner: t.Any, *args: str, input: str | None = None) -> t.Any:
    return runner.invoke(args=["ai-metering", *args], input=input)


def metering_tables(meter: t.Any) -> list[str]:
    names = sa.inspect(meter.runtime().store.engine).get_table_names()
    return sorted(n for n in names if n.startswith("ai_metering_") and "alembic" not in n)


def snapshot(meter: t.Any) -> dict[str, list[t.Any]]:
    with meter.runtime().store.engine.connect() as conn:
        return {
            table.name: [tuple(r) for r in conn.execute(sa.select(table).order_by(*table.primary_key.columns))]
            for table in Base.metadata.sorted_tables
        }


def record(meter: t.Any, when: dt.datetime, **kw: t.Any) -> None:
    meter.record(
        billable=TEAM,
        provider="openai",
        model="gpt-4o-mini",
        usage={"input_tokens": 10, "output_tokens": 5},
        occurred_at=when,
        **kw,
    )


@pytest.fixture
def on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_module, "_interactive", lambda: True)


# -- db downgrade ---------------------------------------------------------------------------------


def test_downgrade_without_a_revision_exits_2_and_drops_nothing(runner, meter):
    before = metering_tables(meter)
    assert len(before) >= 13
    result = run(runner, "db", "downgrade")
    assert result.exit_code == 2 and "REVISION" in result.stderr
    assert metering_tables(meter) == before
    assert migrations.current(meter.runtime().store.engine) == migrations.head()


def test_downgrade_off_a_terminal_needs_yes(runner, meter):
    before = metering_tables(meter)
    result = run(runner, "db", "downgrade", "base")
    assert result.exit_code == 2 and "--yes" in result.stderr
    assert metering_tables(meter) == before
    result = run(runner, "db", "downgrade", "base", "--yes")
    assert result.exit_code == 0 and "Metering schema at None" in result.stderr
    assert metering_tables(meter) == []
    assert run(runner, "db", "upgrade").exit_code == 0


def test_downgrade_on_a_terminal_asks(runner, meter, on_a_terminal):
    before = metering_tables(meter)
    result = run(runner, "db", "downgrade", "base", input="n\n")
    assert result.exit_code == 1 and "Downgrade the metering schema" in result.stderr
    assert metering_tables(meter) == before
    result = run(runner, "db", "downgrade", "base", input="y\n")
    assert result.exit_code == 0 and metering_tables(meter) == []
    assert run(runner, "db", "upgrade").exit_code == 0


@pytest.mark.parametrize("command", ["upgrade", "downgrade"])
def test_an_unknown_revision_exits_2_with_a_message(runner, meter, command):
    before = metering_tables(meter)
    extra = ["--yes"] if command == "downgrade" else []
    result = run(runner, "db", command, "nonsense", *extra)
    assert result.exit_code == 2 and "no such metering revision: 'nonsense'" in result.stderr
    assert "Traceback" not in result.output
    assert metering_tables(meter) == before


def test_an_unreachable_relative_revision_exits_2(runner, meter):
    result = run(runner, "db", "upgrade", "+5")
    assert result.exit_code == 2 and "cannot migrate to '+5'" in result.stderr
    assert migrations.current(meter.runtime().store.engine) == migrations.head()


# -- forget, anonymize, cleanup -------------------------------------------------------------------


def test_forget_needs_yes_off_a_terminal(runner, meter):
    record(meter, dt.datetime(2026, 1, 10, tzinfo=UTC))
    before = snapshot(meter)
    result = run(runner, "forget", "Team:42")
    assert result.exit_code == 2 and "--yes" in result.stderr
    assert snapshot(meter) == before
    assert run(runner, "forget", "Team:42", "--dry-run").exit_code == 0  # the preview never asks
    assert snapshot(meter) == before
    result = run(runner, "forget", "Team:42", "-y")
    assert result.exit_code == 0 and "Changed 1 usage rows" in result.stdout


def test_forget_on_a_terminal_asks(runner, meter, on_a_terminal):
    record(meter, dt.datetime(2026, 1, 10, tzinfo=UTC))
    before = snapshot(meter)
    result = run(runner, "forget", "Team:42", input="n\n")
    assert result.exit_code == 1 and snapshot(meter) == before
    result = run(runner, "forget", "Team:42", input="y\n")
    assert result.exit_code == 0 and "Changed 1 usage rows" in result.stdout


def test_anonymize_needs_yes_off_a_terminal(runner, meter):
    record(meter, dt.datetime(2026, 1, 1, tzinfo=UTC), user=("User", "1"))
    before = snapshot(meter)
    result = run(runner, "anonymize", "--before", "2026-01-02")
    assert result.exit_code == 2 and "--yes" in result.stderr
    assert snapshot(meter) == before
    result = run(runner, "anonymize", "--before", "2026-01-02", "--yes")
    assert result.exit_code == 0 and result.stdout.strip() == "Anonymized 1 usage row(s)"


@pytest.mark.parametrize("dry_run", [False, True])
def test_anonymize_refuses_the_future_and_running_periods(runner, meter, dry_run):
    now = utcnow()
    record(meter, now - dt.timedelta(seconds=5), user=("User", "1"))
    before = snapshot(meter)
    extra = ["--dry-run"] if dry_run else ["--yes"]
    for day in (now + dt.timedelta(days=400), now + dt.timedelta(days=1), now):
        result = run(runner, "anonymize", "--before", f"{day:%Y-%m-%d}", *extra)
        assert result.exit_code == 2 and "inside a running period" in result.stderr, result.output
    assert snapshot(meter) == before


def test_cleanup_needs_yes_off_a_terminal(runner, meter):
    record(meter, utcnow() - dt.timedelta(days=800))
    before = snapshot(meter)
    result = run(runner, "cleanup")
    assert result.exit_code == 2 and "--yes" in result.stderr
    assert snapshot(meter) == before
    dry = run(runner, "cleanup", "--dry-run")
    assert dry.exit_code == 0 and "Would delete 1 usage rows" in dry.stdout
    done = run(runner, "cleanup", "--yes")
    assert done.exit_code == 0 and "Deleted 1 usage rows" in done.stdout


@pytest.mark.parametrize("days", ["99999999999999999999", "1000000", "0", "-3"])
def test_cleanup_days_out_of_range_exit_2(runner, meter, days):
    result = run(runner, "cleanup", "--days", days, "--dry-run")
    assert result.exit_code == 2 and "--days" in result.stderr and "Traceback" not in result.output


def test_sync_limit_out_of_range_exits_2(runner, meter):
    result = run(runner, "sync-stripe-overages", "--limit", "99999999999999999999")
    assert result.exit_code == 2 and "--limit" in result.stderr
