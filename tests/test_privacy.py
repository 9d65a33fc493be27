"""Data protection: forget a billable, anonymize old usage, sanitize metadata, never keep prompts."""

from __future__ import annotations

import datetime as dt
import logging
import typing as t
from decimal import Decimal

import sqlalchemy as sa

from flask_ai_metering.metering import holds
from flask_ai_metering.metering.spec import CallSpec
from flask_ai_metering.metering.spec import Hold
from flask_ai_metering.models import Base
from flask_ai_metering.models import Budget
from flask_ai_metering.models import BudgetCounter
from flask_ai_metering.models import Counter
from flask_ai_metering.models import CreditTransaction
from flask_ai_metering.models import CreditWallet
from flask_ai_metering.models import Overage
from flask_ai_metering.models import Reservation
from flask_ai_metering.models import Subscription
from flask_ai_metering.models import Usage
from flask_ai_metering.models import UsageBillableRollup
from flask_ai_metering.models import UsageRollup
from flask_ai_metering.ops import privacy
from flask_ai_metering.ops import reports
from flask_ai_metering.ops.reconcile import reconcile
from flask_ai_metering.reporting.rollups import aggregate
from tests.conftest import add_plan
from tests.test_rollups import assert_rollups_match_ledger

UTC = dt.timezone.utc
ALICE = ("User", "alice")
BOB = ("User", "bob")


def rows(meter: t.Any, model: t.Any, **where: t.Any) -> list[t.Any]:
    table = model.__table__
    with meter.runtime().store.engine.connect() as conn:
        stmt = sa.select(table).where(*(table.c[k] == v for k, v in where.items())).order_by(*table.primary_key.columns)
        return list(conn.execute(stmt))


def snapshot(meter: t.Any) -> dict[str, list[t.Any]]:
    return {table.name: [tuple(r) for r in rows(meter, _model(table))] for table in Base.metadata.sorted_tables}


def _model(table: sa.Table) -> t.Any:
    return next(m.class_ for m in Base.registry.mappers if m.local_table is table)


def use(meter: t.Any, billable: tuple[str, str], n: int, **kw: t.Any) -> None:
    for i in range(n):
        meter.call(
            lambda: "ok",
            billable=billable,
            provider="manual",
            model="gpt-4o-mini",
            usage={"input_tokens": 100 + i, "output_tokens": 10},
            idempotency_key=f"k{i}",
            **kw,
        )


def test_forget_erases_usage_and_keeps_financial_records_under_a_pseudonym(make_app):
    app, db, meter = make_app(
        SECRET_KEY="s3cret-long-enough-key", AI_METERING_OVERAGE_BEHAVIOR="charge", AI_METERING_AGGREGATION_TABLES=True
    )
    with app.app_context():
        add_plan(db, slug="pro", token_limit=150, overage_price_per_1k_tokens=Decimal("0.5"))
        meter.subscribe(ALICE, "pro", stripe_customer_id="cus_1")
        meter.wallet(ALICE).add_credits(Decimal("10"), reason="top-up")
        meter.add_budget(ALICE, user=ALICE, period="day", token_limit=10**6)  # a budget names a user
        use(meter, ALICE, 3, user=ALICE, meta={"ticket": 1})
        use(meter, BOB, 2)
        rt = meter.runtime()
        # A call of Alice's still in flight holds quota and credits.
        hold = holds.reserve(rt, CallSpec(billable=ALICE, provider="manual", max_tokens=5, billing_mode="credits"))
        assert isinstance(hold, Hold)
        aggregate(rt)
        bob_before = {name: [r for r in table_rows if "bob" in r] for name, table_rows in snapshot(meter).items()}
        report_before = reports.build_report(rt, dt.date.today().replace(day=1), billable=BOB)

        before = snapshot(meter)
        planned = privacy.forget(rt, ALICE, dry_run=True)
        assert snapshot(meter) == before
        assert planned == {
            "reservations": 4,
            "usage rows": 3,
            "failure rows": 0,
            "rollup rows": 1,
            "billable rollup rows": 1,
            "counters": 1,
            "alert events": 0,
            "subscriptions (pseudonymized)": 1,
            "credit wallets (pseudonymized)": 1,
            "overages (pseudonymized)": 2,
            "budget counters": 1,
            "budgets": 1,
        }
        assert privacy.forget(rt, ALICE) == planned

        alias = privacy.pseudonym(rt, ALICE)
        assert alias.startswith("forgotten-") and "alice" not in alias
        for model in (
            Usage,
            Reservation,
            Counter,
            UsageRollup,
            UsageBillableRollup,
            Subscription,
            CreditWallet,
            Overage,
            Budget,
        ):
            assert rows(meter, model, billable_id="alice") == []
        assert rows(meter, BudgetCounter) == []
        # The totals across billables lost Alice's share too: every rollup equals the ledger.
        assert_rollups_match_ledger(rt.store.engine)
        [sub] = rows(meter, Subscription, billable_id=alias)
        assert sub.stripe_customer_id == "cus_1"  # overage can still be invoiced
        assert len(rows(meter, Overage, billable_id=alias)) == 2
        [wallet] = rows(meter, CreditWallet, billable_id=alias)
        assert wallet.balance == Decimal("10") and wallet.held == 0
        assert sum(r.amount for r in rows(meter, CreditTransaction, wallet_id=wallet.id)) == wallet.balance
        # Nobody else is touched, and every ledger still reconciles.
        after = {name: [r for r in table_rows if "bob" in r] for name, table_rows in snapshot(meter).items()}
        assert after == bob_before
        assert reports.build_report(rt, dt.date.today().replace(day=1), billable=BOB) == report_before
        assert reconcile(rt) == []
        # The billable comes back, and is forgotten again: its rows get a pseudonym of their own.
        meter.subscribe(ALICE, "pro")
        privacy.forget(rt, ALICE)
        assert len(rows(meter, Subscription)) == 2
        assert reconcile(rt) == []


def test_anonymize_clears_attribution_before_the_cutoff_only(make_app, backend):
    app, db, meter = make_app(AI_METERING_AGGREGATION_TABLES=True)
    with app.app_context():
        rt = meter.runtime()
        for day in (1, 2, 3):
            for tenant in ("acme", "globex"):
                meter.record(
                    billable=ALICE,
                    user=("User", "alice"),
                    tenant=("Tenant", tenant),
                    meta={"ip": "1.2.3.4"},
                    provider="openai",
                    model="gpt-4o-mini",
                    usage={"input_tokens": 1000, "output_tokens": day},
                    occurred_at=dt.datetime(2026, 1, day, 12, tzinfo=UTC),
                )
        meter.record(
            billable=BOB,
            provider="openai",
            model="gpt-4o-mini",
            usage={"input_tokens": 7},
            occurred_at=dt.datetime(2026, 1, 1, tzinfo=UTC),
        )
        aggregate(rt, now=dt.datetime(2026, 1, 4, tzinfo=UTC))
        counters_before = rows(meter, Counter)
        report_before = reports.build_report(rt, dt.date(2026, 1, 1))
        cutoff = dt.datetime(2026, 1, 3, tzinfo=UTC)

        before = snapshot(meter)
        assert privacy.anonymize(rt, cutoff, dry_run=True) == 4
        assert snapshot(meter) == before
        assert privacy.anonymize(rt, cutoff) == 4
        assert privacy.anonymize(rt, cutoff) == 0  # nothing left to do

        usage = rows(meter, Usage)
        old = [r for r in usage if r.occurred_at < cutoff]
        assert all(r.user_id is None and r.tenant_id is None and r.meta is None for r in old)
        kept = [r for r in usage if r.occurred_at >= cutoff]
        assert {r.tenant_id for r in kept} == {"acme", "globex"} and all(r.meta == {"ip": "1.2.3.4"} for r in kept)
        assert rows(meter, Counter) == counters_before
        assert reconcile(rt) == []
        # Totals are unchanged, and per-tenant reports from the rollups agree with the ledger.
        assert reports.build_report(rt, dt.date(2026, 1, 1)) == report_before
        rollup_tenants = {(r.day.day, r.tenant_id) for r in rows(meter, UsageRollup) if r.billable_id == "alice"}
        assert rollup_tenants == {(1, ""), (2, ""), (3, "acme"), (3, "globex")}
        assert_rollups_match_ledger(rt.store.engine)
        acme = reports.build_report(rt, dt.date(2026, 1, 1), tenant="acme")
        assert acme["totals"]["calls"] == 1


def test_metadata_sanitization_drops_secrets_and_prompts(make_app):
    meta = {
        "ticket": 7,
        "api_key": "sk-live",
        "Authorization": "Bearer x",
        "prompt": "tell me",
        "nested": {"password": "p", "session_token": "t", "ok": [1, 2]},
        "messages": [{"content": "hi"}],
    }
    app, _, meter = make_app()
    with app.app_context():
        meter.record(billable=ALICE, provider="openai", model="gpt-4o-mini", usage={"input_tokens": 1}, meta=meta)
        assert rows(meter, Usage)[0].meta == {"ticket": 7, "nested": {"ok": [1, 2]}}
    app, _, meter = make_app(AI_METERING_SANITIZE_METADATA=False)
    with app.app_context():
        meter.record(billable=ALICE, provider="openai", model="gpt-4o-mini", usage={"input_tokens": 1}, meta=meta)
        assert rows(meter, Usage)[-1].meta == meta


def test_prompts_and_completions_are_never_stored_or_logged(meter, fake_llm, openai_client, caplog):
    caplog.set_level(logging.DEBUG)
    fake_llm.chunk_text = "COMPLETION-SECRET "
    prompt = [{"role": "user", "content": "PROMPT-SECRET"}]
    meter.call(lambda: openai_client.chat.completions.create(model="gpt-4o-mini", messages=prompt), billable=ALICE)
    stream = meter.call(
        lambda: openai_client.chat.completions.create(model="gpt-4o-mini", messages=prompt, stream=True),
        billable=ALICE,
    )
    assert "COMPLETION-SECRET" in "".join(c.choices[0].delta.content or "" for c in stream.response if c.choices)
    fake_llm.fail_next(500, message="PROMPT-SECRET echoed by the provider")
    try:
        meter.call(lambda: openai_client.chat.completions.create(model="gpt-4o-mini", messages=prompt), billable=ALICE)
    except Exception as exc:
        assert "PROMPT-SECRET" in str(exc)  # the caller gets the provider's error untouched
    stored = repr(snapshot(meter))
    assert "SECRET" not in stored
    assert "SECRET" not in caplog.text
