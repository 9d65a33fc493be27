"""Multi-tenancy without a tenancy package: a resolver, for_tenant, billing the tenant, scoped keys."""

from __future__ import annotations

import datetime as dt
import typing as t

import pytest
import sqlalchemy as sa
from flask import g

from flask_ai_metering import AiLimitExceeded
from flask_ai_metering.models import Usage
from flask_ai_metering.ops import reports
from flask_ai_metering.ops.reconcile import reconcile
from tests.conftest import add_plan

ACME = ("Tenant", "acme")
GLOBEX = ("Tenant", "globex")


def current_tenant() -> t.Any:
    """A tenant resolver as an app would write one: the tenant the request was routed to."""
    return g.get("tenant")


def usage_rows(meter: t.Any) -> list[t.Any]:
    with meter.runtime().store.engine.connect() as conn:
        return list(conn.execute(sa.select(Usage.__table__).order_by(Usage.id)))


def manual(meter: t.Any, **kw: t.Any) -> t.Any:
    kw.setdefault("usage", {"input_tokens": 10, "output_tokens": 5})
    return meter.call(lambda: "ok", provider="manual", **kw)


@pytest.mark.parametrize(
    "resolver", [current_tenant, "tests.test_tenancy:current_tenant", "tests.test_tenancy.current_tenant"]
)
def test_tenant_resolver_attributes_every_call(make_app, resolver):
    app, _, meter = make_app(AI_METERING_TENANT_RESOLVER=resolver)
    with app.test_request_context():
        g.tenant = ACME
        manual(meter, billable=("User", "1"))
        # for_tenant wins over the resolver
        meter.for_tenant(GLOBEX).billable(("User", "1")).using_provider("manual").with_manual_usage(
            input_tokens=1
        ).call(lambda: "ok")
        g.tenant = None
        manual(meter, billable=("User", "1"))
        assert [r.tenant_id for r in usage_rows(meter)] == ["acme", "globex", None]


def test_billing_the_tenant_instead_of_the_user(make_app):
    app, db, meter = make_app(AI_METERING_TENANT_RESOLVER=current_tenant)

    @meter.billable_resolver
    def bill_the_tenant() -> t.Any:
        return g.tenant

    with app.test_request_context():
        add_plan(db, slug="team", token_limit=40)
        meter.subscribe(ACME, "team")
        g.tenant = ACME
        manual(meter, user=("User", "1"))
        manual(meter, user=("User", "2"))
        # The quota is the tenant's, shared by its users: the third call does not fit.
        with pytest.raises(AiLimitExceeded):
            manual(meter, user=("User", "3"), max_tokens=15)
        g.tenant = GLOBEX  # another tenant's quota is its own
        manual(meter, user=("User", "3"))
        rows = usage_rows(meter)
        assert [(r.billable_type, r.billable_id, r.tenant_id, r.user_id) for r in rows] == [
            ("Tenant", "acme", "acme", "1"),
            ("Tenant", "acme", "acme", "2"),
            ("Tenant", "globex", "globex", "3"),
        ]
        assert meter.check(ACME).remaining_tokens == 10
        assert reconcile(meter.runtime()) == []


def test_reports_filter_by_tenant(meter):
    when = dt.datetime(2026, 3, 3, tzinfo=dt.timezone.utc)
    for tenant, tokens in ((ACME, 100), (ACME, 50), (GLOBEX, 7), (None, 1)):
        meter.record(
            billable=("User", "1"),
            tenant=tenant,
            provider="openai",
            model="gpt-4o-mini",
            usage={"input_tokens": tokens},
            occurred_at=when,
        )
    rt = meter.runtime()
    month = dt.date(2026, 3, 1)
    assert reports.build_report(rt, month, tenant="acme")["totals"]["input_tokens"] == 150
    assert reports.build_report(rt, month, tenant="globex")["totals"]["input_tokens"] == 7
    assert reports.build_report(rt, month)["totals"]["input_tokens"] == 158


def test_one_tenant_can_never_replay_anothers_key(make_app):
    app, _, meter = make_app(AI_METERING_TENANT_RESOLVER=current_tenant)

    @meter.billable_resolver
    def bill_the_tenant() -> t.Any:
        return g.tenant

    with app.test_request_context():
        g.tenant = ACME
        first = manual(meter, idempotency_key="req-1", usage={"input_tokens": 1000})
        g.tenant = GLOBEX
        other = manual(meter, idempotency_key="req-1", usage={"input_tokens": 3})
        assert not other.replayed and other.usage.input_tokens == 3  # not acme's usage
        g.tenant = ACME
        again = manual(meter, idempotency_key="req-1", usage={"input_tokens": 3})
        assert again.replayed and again.usage == first.usage
        assert [(r.billable_id, r.input_tokens) for r in usage_rows(meter)] == [("acme", 1000), ("globex", 3)]


def test_a_billable_shared_by_two_tenants_does_not_replay_across_them(meter):
    manual(meter, billable=("User", "1"), tenant=ACME, idempotency_key="req-1", usage={"input_tokens": 1000})
    other = manual(meter, billable=("User", "1"), tenant=GLOBEX, idempotency_key="req-1")
    assert not other.replayed
