"""Reports equal the ledger to the last digit, from the ledger and from the rollups, on every database."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import typing as t
from decimal import Decimal

import pytest
import sqlalchemy as sa

from flask_ai_metering.models import AggregationState
from flask_ai_metering.models import Usage
from flask_ai_metering.models import UsageRollup
from flask_ai_metering.ops import reports
from flask_ai_metering.reporting import rollups
from flask_ai_metering.reporting.rollups import state_name
from tests.conftest import add_plan

UTC = dt.timezone.utc
JAN = dt.date(2026, 1, 1)
#: Prices with 12 decimal places, so any rounding or float step shows in the last digit.
PRICES = {
    "openai": {"models": {"gpt-x": {"input_price_per_1k": "0.000123456789", "output_price_per_1k": "0.000987654321"}}},
    "anthropic": {"models": {"claude-y": {"input_price_per_1k": "0.003000000007", "output_price_per_1k": "0.015"}}},
}
BILLABLES = [("Team", "1"), ("Team", "2"), ("User", "7")]
MODELS = [("openai", "gpt-x"), ("anthropic", "claude-y"), ("openai", "unknown-model")]
FEATURES = ["chat", "summary", None]
TENANTS = ["acme", "globex", None]


def seed(meter: t.Any, n: int = 60, *, month: dt.date = JAN) -> None:
    """``n`` usages spread over billables, models, features and tenants, plus some outside the month."""
    rows = []
    for i in range(n):
        provider, model = MODELS[i % 3]
        rows.append(
            {
                "billable": BILLABLES[i % 3],
                "provider": provider,
                "model": model,
                "feature": FEATURES[(i // 3) % 3],
                "tenant": None if TENANTS[i % 2 + (i % 5 == 0)] is None else ("Tenant", TENANTS[i % 2 + (i % 5 == 0)]),
                "usage": {"input_tokens": 1_000 + 37 * i, "output_tokens": 11 * i},
                "occurred_at": dt.datetime.combine(month, dt.time(), UTC) + dt.timedelta(hours=11 * i + 1),
            }
        )
    rows.append({**rows[0], "occurred_at": dt.datetime(2025, 12, 31, 23, 59, 59, tzinfo=UTC)})
    rows.append({**rows[1], "occurred_at": dt.datetime(2026, 2, 1, tzinfo=UTC)})
    meter.record_batch(rows)


def ledger_totals(db: t.Any, **where: t.Any) -> dict[str, t.Any]:
    """The expected totals, summed in Python from the ledger's rows as Decimals."""
    begin, end = dt.datetime(2026, 1, 1, tzinfo=UTC), dt.datetime(2026, 2, 1, tzinfo=UTC)
    with db.engine.connect() as conn:
        rows = [
            r
            for r in conn.execute(sa.select(Usage.__table__))
            if begin <= r.occurred_at < end and all(getattr(r, k) == v for k, v in where.items())
        ]
    refunded = sum((-r.total_cost for r in rows if r.kind == "refund"), Decimal(0))
    return {
        "calls": len([r for r in rows if r.kind == "usage"]),
        "input_tokens": sum(r.input_tokens for r in rows),
        "output_tokens": sum(r.output_tokens for r in rows),
        "total_tokens": sum(r.total_tokens for r in rows),
        "total_cost": format(sum((r.total_cost for r in rows), Decimal(0)).quantize(Decimal("1e-12")), "f"),
        "refunded_cost": format(refunded.quantize(Decimal("1e-12")), "f"),
    }


def test_report_totals_equal_the_ledger_to_the_last_digit(make_app, backend):
    app, db, meter = make_app(AI_METERING_PROVIDERS=PRICES)
    with app.app_context():
        seed(meter)
        report = reports.build_report(meter.runtime(), JAN)
        expected = ledger_totals(db)
    assert report["period"] == {"start": "2026-01-01T00:00:00+00:00", "end": "2026-02-01T00:00:00+00:00"}
    assert report["totals"] == expected
    assert expected["calls"] == 60 and Decimal(expected["total_cost"]) != 0
    assert expected["total_cost"].split(".")[1][-1] != "0" or Decimal(expected["total_cost"]).as_tuple().exponent == -12
    for section in reports.GROUPS:
        rows = report[section]
        for measure in ("calls", "input_tokens", "output_tokens", "total_tokens"):
            assert sum(r[measure] for r in rows) == expected[measure], (section, measure)
        assert sum(Decimal(r["total_cost"]) for r in rows) == Decimal(expected["total_cost"])
    assert {r["billable"] for r in report["by_billable"]} == {"Team:1", "Team:2", "User:7"}
    assert {(r["provider"], r["model"]) for r in report["by_model"]} == set(MODELS)
    assert {r["feature"] for r in report["by_feature"]} == set(FEATURES)
    costs = [Decimal(r["total_cost"]) for r in report["by_model"]]
    assert costs == sorted(costs, reverse=True)
    unknown = next(r for r in report["by_model"] if r["model"] == "unknown-model")
    assert unknown["total_cost"] == "0.000000000000"


def test_billable_and_tenant_narrow_every_section(meter, db):
    seed(meter)
    rt = meter.runtime()
    by_team = reports.build_report(rt, JAN, billable=("Team", "2"))
    assert by_team["totals"] == ledger_totals(db, billable_type="Team", billable_id="2")
    assert [r["billable"] for r in by_team["by_billable"]] == ["Team:2"]
    by_tenant = reports.build_report(rt, JAN, tenant="acme")
    assert by_tenant["totals"] == ledger_totals(db, tenant_id="acme")
    both = reports.build_report(rt, JAN, billable=("Team", "2"), tenant="acme")
    assert both["totals"] == ledger_totals(db, billable_type="Team", billable_id="2", tenant_id="acme")
    empty = reports.build_report(rt, dt.date(2030, 1, 1))
    assert empty["totals"] == {
        "calls": 0,
        "input_tokens": 0,
        "output_tokens": 0,
        "total_tokens": 0,
        "total_cost": "0.000000000000",
        "refunded_cost": "0.000000000000",
    }
    assert empty["by_model"] == []


def test_month_follows_the_configured_timezone(make_app):
    app, _, meter = make_app(AI_METERING_TIMEZONE="America/New_York")
    with app.app_context():
        meter.record(
            billable=("Team", "1"),
            provider="openai",
            model="gpt-4o-mini",
            usage={"input_tokens": 5},
            occurred_at=dt.datetime(2026, 2, 1, 3, tzinfo=UTC),
        )
        report = reports.build_report(meter.runtime(), JAN)
    assert report["period"]["start"] == "2026-01-01T05:00:00+00:00"
    assert report["totals"]["calls"] == 1  # 22:00 on January 31st in New York


MEASURED = ("input_tokens", "output_tokens", "total_tokens", "total_cost")


def fill_rollups_by_hand(db: t.Any) -> int:
    """Roll the whole ledger up per UTC day, as ``aggregate`` does, and set the watermark; return it."""
    usage = Usage.__table__
    with db.engine.begin() as conn:
        rows = conn.execute(sa.select(usage)).all()
        groups: dict[tuple[t.Any, ...], dict[str, t.Any]] = {}
        for r in rows:
            key = (
                r.occurred_at.date(),
                r.billable_type,
                r.billable_id,
                r.tenant_id or "",
                r.provider,
                r.model or "",
                r.feature or "",
            )
            g = groups.setdefault(
                key, {"calls": 0, "input_tokens": 0, "output_tokens": 0, "total_tokens": 0, "total_cost": Decimal(0)}
            )
            g["calls"] += 1
            for name in ("input_tokens", "output_tokens", "total_tokens", "total_cost"):
                g[name] += getattr(r, name)
        names = ("day", "billable_type", "billable_id", "tenant_id", "provider", "model", "feature")
        detailed = [{**dict(zip(names, key, strict=True)), **sums} for key, sums in groups.items()]
        for row in detailed:
            conn.execute(sa.insert(UsageRollup.__table__).values(row))
        # ...and the two rollups derived from it, without the billable and per billable.
        for spec in rollups.DERIVED:
            derived: dict[tuple[t.Any, ...], dict[str, t.Any]] = {}
            for row in detailed:
                into = derived.setdefault(
                    (row["day"], *(row[k] for k in spec.keys)), dict.fromkeys(("calls", *MEASURED), 0)
                )
                for name in ("calls", *MEASURED):
                    into[name] += row[name]
            for key, sums in derived.items():
                conn.execute(sa.insert(spec.table).values({**dict(zip(("day", *spec.keys), key, strict=True)), **sums}))
        watermark = max(r.id for r in rows)
        conn.execute(sa.insert(AggregationState.__table__).values(name=state_name("UTC"), last_usage_id=watermark))
    return watermark


def test_rollups_plus_the_unaggregated_tail_equal_the_ledger(make_app, backend):
    app, db, ledger_meter = make_app(AI_METERING_PROVIDERS=PRICES)
    rolled_app, _, rolled_meter = make_app(AI_METERING_PROVIDERS=PRICES, AI_METERING_AGGREGATION_TABLES=True)
    with app.app_context():
        seed(ledger_meter, 45)
        fill_rollups_by_hand(db)
        # Usage written after the last aggregate run is read from the ledger.
        ledger_meter.record(
            billable=("Team", "1"),
            provider="openai",
            model="gpt-x",
            tenant=("Tenant", "acme"),
            usage={"input_tokens": 999, "output_tokens": 1},
            occurred_at=dt.datetime(2026, 1, 9, tzinfo=UTC),
        )
        from_ledger = reports.build_report(ledger_meter.runtime(), JAN)
        from_ledger_tenant = reports.build_report(ledger_meter.runtime(), JAN, tenant="acme", billable=("Team", "1"))
    with rolled_app.app_context():
        # Prove the rollups are really read: delete the aggregated usage of every day but
        # January 9th (which has a row newer than the rollups, so it is read from the ledger).
        jan9 = (dt.datetime(2026, 1, 9, tzinfo=UTC), dt.datetime(2026, 1, 10, tzinfo=UTC))
        with rolled_meter.runtime().store.engine.begin() as conn:
            watermark = conn.execute(sa.select(AggregationState.last_usage_id)).scalar_one()
            gone = conn.execute(
                sa.delete(Usage.__table__).where(
                    Usage.id <= watermark, sa.not_(sa.and_(Usage.occurred_at >= jan9[0], Usage.occurred_at < jan9[1]))
                )
            ).rowcount
        assert gone > 40
        assert reports.build_report(rolled_meter.runtime(), JAN) == from_ledger
        both = reports.build_report(rolled_meter.runtime(), JAN, tenant="acme", billable=("Team", "1"))
        assert both == from_ledger_tenant


def test_report_from_aggregate_equals_the_ledger(make_app, backend):
    from flask_ai_metering.reporting.rollups import aggregate

    app, _, ledger_meter = make_app(AI_METERING_PROVIDERS=PRICES)
    rolled_app, _, rolled_meter = make_app(AI_METERING_PROVIDERS=PRICES, AI_METERING_AGGREGATION_TABLES=True)
    with app.app_context():
        seed(ledger_meter, 45)
        aggregate(ledger_meter.runtime(), period="day")
        ledger_meter.record(
            billable=("Team", "1"),
            provider="openai",
            model="gpt-x",
            usage={"input_tokens": 3},
            occurred_at=dt.datetime(2026, 1, 9, tzinfo=UTC),
        )
        expected = reports.build_report(ledger_meter.runtime(), JAN)
    with rolled_app.app_context():
        assert reports.build_report(rolled_meter.runtime(), JAN) == expected


def test_render_json_csv_and_table(meter):
    meter.record(
        billable=("Team", "=cmd"),
        provider="openai",
        model="gpt-4o-mini",
        feature="chat",
        usage={"input_tokens": 1_000_000, "output_tokens": 2_000},
        occurred_at=dt.datetime(2026, 1, 5, tzinfo=UTC),
    )
    report = reports.build_report(meter.runtime(), JAN)
    assert json.loads(reports.render(report, "json")) == report
    assert set(report) == {"period", "totals", "by_billable", "by_provider", "by_model", "by_feature"}
    assert report["totals"]["total_cost"] == "0.151200000000"  # $0.15/M in, $0.60/M out

    parsed = list(csv.DictReader(io.StringIO(reports.render(report, "csv"))))
    assert [r["section"] for r in parsed] == ["totals", "by_billable", "by_provider", "by_model", "by_feature"]
    assert parsed[1]["billable_id"] == "'=cmd"  # a spreadsheet must not run it
    assert all(r["total_cost"] == "0.151200000000" for r in parsed)

    table = reports.render(report, "table")
    assert "Total" in table and "1,002,000" in table and "0.1512" in table and "By feature" in table
    with pytest.raises(ValueError, match="unknown report format"):
        reports.render(report, "xml")


@pytest.mark.parametrize("bad", ["2026-13", "2026-1", "26-01", "2026/01", "january", "2026-01-01", ""])
def test_parse_month_refuses_anything_but_yyyy_mm(bad):
    with pytest.raises(ValueError, match="expected YYYY-MM"):
        reports.parse_month(bad)


def test_parse_month():
    assert reports.parse_month("2026-02") == dt.date(2026, 2, 1)
    assert reports.parse_month(None) == dt.datetime.now(UTC).date().replace(day=1)


def test_plans_table_lists_limits_and_subscribers(meter, db):
    assert reports.plans_table(meter.runtime()) == "No plans yet."
    pro = add_plan(
        db,
        slug="pro",
        token_limit=1_000_000,
        cost_limit=Decimal("100"),
        overage_price_per_1k_tokens=Decimal("0.01"),
        features=["chat", "summary"],
    )
    add_plan(db, slug="free", period="daily")
    meter.subscribe(("Team", "1"), pro)
    meter.subscribe(("Team", "2"), "pro")
    meter.subscribe(("Team", "3"), "pro", ends_at=dt.datetime(2020, 1, 1, tzinfo=UTC))
    lines = reports.plans_table(meter.runtime()).splitlines()
    assert lines[0].split() == [
        "slug",
        "name",
        "tokens",
        "cost",
        "period",
        "overage/1k",
        "features",
        "active",
        "trial",
        "subscribers",
        "trialling",
    ]
    assert lines[1].split() == ["free", "Free", "unlimited", "unlimited", "daily", "-", "all", "yes", "-", "0", "0"]
    assert lines[2].split() == [
        *["pro", "Pro", "1,000,000", "100.00", "monthly", "0.01", "chat,", "summary", "yes", "-", "2", "0"]
    ]
