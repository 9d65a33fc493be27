"""Bad input raises InvalidUsage naming the field, and records nothing."""

from __future__ import annotations

import math
from decimal import Decimal

import pytest
import sqlalchemy as sa

from flask_ai_metering import InvalidUsage
from flask_ai_metering.models import Base

TEAM = ("Team", "1")


def row_counts(db):
    with db.engine.connect() as conn:
        return {
            t.name: conn.execute(sa.select(sa.func.count()).select_from(t)).scalar()
            for t in Base.metadata.sorted_tables
        }


BAD_TOKENS = [-1, True, "10", 1.5, 10.0, math.nan, math.inf, 2**53, 2**63, 10**30, Decimal("1e-30"), None]


@pytest.mark.parametrize("value", BAD_TOKENS, ids=repr)
def test_bad_token_counts(meter, db, value):
    before = row_counts(db)
    ran = []
    with pytest.raises(InvalidUsage, match="usage.output_tokens"):
        meter.call(lambda: ran.append(1), billable=TEAM, provider="manual", usage={"output_tokens": value})
    with pytest.raises(InvalidUsage, match="output_tokens"):
        meter.record(billable=TEAM, usage={"input_tokens": 1, "output_tokens": value})
    assert ran == [] and row_counts(db) == before


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"max_tokens": -5}, "max_tokens"),
        ({"max_tokens": 2.0}, "max_tokens"),
        ({"billing_mode": "free"}, "billing_mode"),
        ({"feature": "bad name"}, "feature"),
        ({"feature": "x" * 101}, "feature"),
        ({"feature": "é"}, "feature"),
        ({"feature": "a\u202eb"}, "feature"),
        ({"meta": {"x": float("nan")}}, "meta"),
        ({"meta": {"x": object()}}, "meta"),
        ({"meta": {"blob": "x" * 9000}}, "meta"),
        ({"meta": ["not", "a", "dict"]}, "meta"),
        ({"meta": {1: "int key"}}, "meta"),
        ({"idempotency_key": ""}, "idempotency_key"),
        ({"idempotency_key": "k" * 256}, "idempotency_key"),
        ({"billable": ("Team",)}, "billable"),
        ({"billable": None}, "billable"),
        ({"provider": "nope"}, "provider"),
        ({"model": "a\nb"}, "model"),
        ({"usage": {"input_tokens": 1, "typo_tokens": 2}}, "unknown keys"),
        ({"usage": {"input_tokens": 1, "output_tokens": 1, "total_tokens": 5}}, "total_tokens"),
        ({"usage": {"input_tokens": 1, "cached_input_tokens": 2}}, "cached_input_tokens"),
    ],
)
def test_bad_options_name_the_field(meter, db, options, field):
    options.setdefault("billable", TEAM)
    before = row_counts(db)
    with pytest.raises(InvalidUsage, match=field):
        meter.call(lambda: None, **{"provider": "manual", **options})
    assert row_counts(db) == before


def test_invalid_usage_is_a_value_error():
    assert issubclass(InvalidUsage, ValueError)


def test_metadata_sanitised_and_bounded(make_app):
    app, db, meter = make_app(AI_METERING_MAX_META_BYTES=64)
    with app.app_context():
        result = meter.call(
            lambda: None,
            billable=TEAM,
            provider="manual",
            usage={"input_tokens": 1},
            meta={"ticket": 7, "api_key": "sk-secret", "prompt": "tell me", "nested": {"password": "x", "ok": 1}},
        )
        with db.engine.connect() as conn:
            meta = conn.execute(sa.text("select meta from ai_metering_usage")).scalar()
        assert "sk-secret" not in str(meta) and "tell me" not in str(meta)
        assert result.usage_id is not None
        with pytest.raises(InvalidUsage, match="AI_METERING_MAX_META_BYTES"):
            meter.call(lambda: None, billable=TEAM, provider="manual", meta={"k": "v" * 100})


def test_model_instance_billable_and_attribution(meter, db):
    from flask_ai_metering.models import Plan

    plan = Plan(name="P", slug="p")
    db.session.add(plan)
    db.session.commit()
    meter.call(lambda: None, billable=plan, user=plan, tenant=("Org", 9), provider="manual", usage={"input_tokens": 1})
    with db.engine.connect() as conn:
        row = conn.execute(
            sa.text("select billable_type, billable_id, user_id, tenant_id from ai_metering_usage")
        ).one()
    assert tuple(row) == ("Plan", str(plan.id), str(plan.id), "9")
    with pytest.raises(InvalidUsage, match="no primary key"):
        meter.call(lambda: None, billable=Plan(name="unsaved", slug="u"), provider="manual")
