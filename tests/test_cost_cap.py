"""Per-call cost cap (issue 12): ``max_cost=`` and ``AI_METERING_MAX_COST_PER_CALL``.

A call whose worst-case hold (``max_tokens`` at the model's highest price) is
above its cap is refused with ``CostCapExceeded`` (HTTP 422) before the provider
runs: nothing is recorded and nothing stays held.
"""

from __future__ import annotations

import asyncio
import typing as t
from decimal import Decimal

import pytest
import sqlalchemy as sa

from flask_ai_metering import AiMeteringError
from flask_ai_metering import ConfigurationError
from flask_ai_metering import CostCapExceeded
from flask_ai_metering import InvalidUsage
from flask_ai_metering.models import Counter
from flask_ai_metering.models import Reservation
from flask_ai_metering.models import Usage
from flask_ai_metering.ops.reconcile import reconcile
from tests.conftest import add_plan

TEAM = ("Team", "7")
GPT = "gpt-4o-mini"
#: 1,000 tokens of gpt-4o-mini at its higher (output) price, $0.60/M.
WORST_1000 = Decimal("0.0006")


def rows(db: t.Any, model: t.Any) -> list[t.Any]:
    with db.engine.connect() as conn:
        return list(conn.execute(sa.select(model.__table__)))


def assert_nothing_left(db: t.Any, meter: t.Any) -> None:
    assert rows(db, Usage) == [] and rows(db, Reservation) == []
    assert all(c.reserved_tokens == 0 and c.reserved_cost_units == 0 for c in rows(db, Counter))
    assert reconcile(meter.runtime()) == []


class Provider:
    """A provider callable that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


def gpt_call(meter: t.Any, fn: t.Any, **kw: t.Any) -> t.Any:
    kw.setdefault("billable", TEAM)
    kw.setdefault("max_tokens", 1000)
    return meter.call(fn, provider="openai", model=GPT, usage={"input_tokens": 10, "output_tokens": 5}, **kw)


def test_a_call_above_its_cap_is_refused_before_the_provider_runs(backend, meter, db):
    add_plan(db, slug="p", token_limit=100_000)
    meter.subscribe(TEAM, "p")
    provider = Provider()
    with pytest.raises(CostCapExceeded) as info:
        gpt_call(meter, provider, max_cost=Decimal("0.00059"))
    assert provider.calls == 0
    error = info.value
    assert isinstance(error, AiMeteringError) and error.code == 422
    assert error.max_cost == Decimal("0.00059") and error.worst_case_cost == WORST_1000
    assert error.tokens == 1000 and error.model == GPT
    assert "0.0006" in str(error) and "0.00059" in str(error)
    assert_nothing_left(db, meter)


def test_a_worst_case_equal_to_the_cap_runs(backend, meter, db):
    provider = Provider()
    result = gpt_call(meter, provider, max_cost=WORST_1000)
    assert provider.calls == 1 and result.usage.total_tokens == 15
    assert reconcile(meter.runtime()) == []


def test_the_configured_default_applies_and_a_call_can_raise_it(make_app):
    app, db, meter = make_app(AI_METERING_MAX_COST_PER_CALL="0.0001")
    with app.app_context():
        assert meter.settings().max_cost_per_call == Decimal("0.0001")
        provider = Provider()
        with pytest.raises(CostCapExceeded):
            gpt_call(meter, provider)
        assert provider.calls == 0
        # 100 tokens: worst case 0.00006, under the default.
        gpt_call(meter, provider, max_tokens=100)
        # A call's own cap replaces the default, up or down.
        gpt_call(meter, provider, max_cost=Decimal("0.001"))
        with pytest.raises(CostCapExceeded):
            gpt_call(meter, provider, max_tokens=100, max_cost=Decimal("0.00001"))
        assert provider.calls == 2
        # No model before the call: the default cannot be applied, and is not.
        meter.call(provider, billable=TEAM, provider="manual", usage={"output_tokens": 5})
        assert provider.calls == 3
        assert reconcile(meter.runtime()) == []


def test_a_cap_passed_with_no_model_is_refused_as_unenforceable(meter, db):
    provider = Provider()
    with pytest.raises(InvalidUsage, match="max_cost needs the model"):
        meter.call(provider, billable=TEAM, provider="openai", max_cost=Decimal("1"))
    assert provider.calls == 0
    assert_nothing_left(db, meter)


def test_an_unpriced_model_costs_nothing_before_or_after_so_a_cap_lets_it_run(meter, db):
    provider = Provider()
    meter.call(
        provider,
        billable=TEAM,
        provider="openai",
        model="no-such-model-x",
        usage={"output_tokens": 5},
        max_cost=Decimal("0.000001"),
    )
    assert provider.calls == 1


@pytest.mark.parametrize("bad", [Decimal("0"), Decimal("-1"), 0, -5, 0.5, True, "abc", "NaN", Decimal("Infinity"), [1]])
def test_a_bad_cap_names_the_field_and_records_nothing(meter, db, bad):
    provider = Provider()
    with pytest.raises(InvalidUsage, match="max_cost"):
        gpt_call(meter, provider, max_cost=bad)
    assert provider.calls == 0
    assert_nothing_left(db, meter)


@pytest.mark.parametrize("bad", ["0", "-1", 0.5, "abc"])
def test_a_bad_default_names_the_key(make_app, bad):
    with pytest.raises(ConfigurationError, match="AI_METERING_MAX_COST_PER_CALL"):
        make_app(AI_METERING_MAX_COST_PER_CALL=bad)


def test_a_cap_given_as_int_or_str_is_exact(meter, db):
    provider = Provider()
    with pytest.raises(CostCapExceeded):
        gpt_call(meter, provider, max_cost="0.0005")
    gpt_call(meter, provider, max_cost=1)
    assert provider.calls == 1


def test_fluent_and_async_forms(meter, db):
    provider = Provider()
    fluent = meter.billable(TEAM).using_provider("openai", GPT).with_max_tokens(1000).with_manual_usage(output_tokens=5)
    with pytest.raises(CostCapExceeded):
        fluent.with_max_cost(Decimal("0.0001")).call(provider)
    fluent.with_max_cost(Decimal("0.001")).call(provider)
    assert provider.calls == 1

    async def coro() -> None:
        provider()

    with pytest.raises(CostCapExceeded):
        asyncio.run(fluent.with_max_cost(Decimal("0.0001")).acall(coro))
    with pytest.raises(CostCapExceeded):
        asyncio.run(
            meter.acall(coro, billable=TEAM, provider="openai", model=GPT, max_tokens=1000, max_cost=Decimal("0.0001"))
        )
    assert provider.calls == 1
    assert reconcile(meter.runtime()) == []


def test_a_refusal_in_a_view_is_a_422_json_answer(app, meter, db):
    @app.post("/ai")
    def view() -> str:
        gpt_call(meter, Provider(), max_cost=Decimal("0.0001"))
        return "ran"

    response = app.test_client().post("/ai")
    assert response.status_code == 422
    assert response.headers["Content-Type"] == "application/json"
    body = response.get_json()
    assert body["error"] == "cost_cap_exceeded"
    assert body["max_cost"] == "0.0001" and Decimal(body["worst_case_cost"]) == WORST_1000
    assert body["max_tokens"] == 1000 and body["model"] == GPT


def test_an_instrumented_client_passes_its_cap_through(meter, db, fake_llm, openai_client):
    oai = meter.instrument(openai_client, billable=TEAM, max_cost=Decimal("0.0001"))
    with pytest.raises(CostCapExceeded):
        oai.chat.completions.create(model=GPT, messages=[{"role": "user", "content": "hi"}], max_tokens=1000)
    assert fake_llm.requests == []
    assert_nothing_left(db, meter)
    with pytest.raises(InvalidUsage, match="max_cost"):
        meter.instrument(openai_client, billable=TEAM, max_cost=0.1)
