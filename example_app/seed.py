"""``flask seed-demo``: plans, subscriptions, a wallet and ~90 days of realistic usage.

Idempotent: plans are created once, subscriptions are moved onto the same plan,
the top-up and every usage row carry idempotency keys, so a second run adds nothing.
"""

from __future__ import annotations

import datetime as dt
import random
import typing as t
from decimal import Decimal

import click
import sqlalchemy as sa
from flask.cli import with_appcontext

from flask_ai_metering.models import Plan

#: (provider, model, weight, typical input, typical output)
MODELS = [
    ("openai", "gpt-4o-mini", 50, 1200, 300),
    ("openai", "gpt-4o", 12, 2500, 600),
    ("openai", "o3-mini", 6, 1500, 2200),
    ("anthropic", "claude-sonnet-4-5", 18, 3000, 700),
    ("anthropic", "claude-haiku-4-5", 10, 900, 250),
    ("manual", "demo-small", 4, 1200, 150),
]
FEATURES = [("chat", 50), ("summary", 25), ("search", 15), ("import", 10)]
BILLABLES = [("User", "1"), ("User", "2"), ("User", "3"), ("Team", "acme"), ("Team", "globex"), ("Team", "initech")]
PLANS = [
    {"name": "Free", "slug": "free", "token_limit": 150_000, "cost_limit": Decimal("2")},
    {
        "name": "Pro",
        "slug": "pro",
        "token_limit": 5_000_000,
        "cost_limit": Decimal("60"),
        "overage_price_per_1k_tokens": Decimal("0.01"),
    },
    {
        "name": "Team",
        "slug": "team",
        "token_limit": None,
        "cost_limit": Decimal("500"),
        "features": ["chat", "summary", "search", "import"],
    },
]
SUBSCRIPTIONS = {
    ("User", "1"): "pro",
    ("User", "2"): "free",
    ("User", "3"): "free",
    ("Team", "acme"): "team",
    ("Team", "globex"): "pro",
    ("Team", "initech"): "team",
}
DAYS = 90


def ensure_plans(db: t.Any) -> None:
    existing = set(db.session.execute(sa.select(Plan.slug)).scalars())
    for fields in PLANS:
        if fields["slug"] not in existing:
            db.session.add(Plan(**fields))
    db.session.commit()
    db.session.remove()


def usage_rows(now: dt.datetime) -> list[dict[str, t.Any]]:
    weights = [1.0, 0.5, 0.35, 2.5, 1.2, 0.8]
    rows = []
    for day in range(DAYS, -1, -1):
        base = now - dt.timedelta(days=day)
        # One generator per calendar day: a re-run on a later day recreates the same rows.
        rng = random.Random(base.date().toordinal())
        growth = 0.6 + 0.4 * (DAYS - day) / DAYS
        weekday = 0.55 if base.weekday() >= 5 else 1.0
        for i in range(int(rng.uniform(25, 45) * growth * weekday)):
            provider, model, _, inp, out = rng.choices(MODELS, weights=[m[2] for m in MODELS])[0]
            billable = rng.choices(BILLABLES, weights=weights)[0]
            input_tokens = max(10, int(rng.lognormvariate(0, 0.6) * inp))
            output_tokens = max(5, int(rng.lognormvariate(0, 0.5) * out))
            cached = int(input_tokens * rng.choice([0, 0, 0.3, 0.6])) if provider != "manual" else 0
            reasoning = int(output_tokens * 0.7) if model.startswith("o3") else 0
            occurred = base.replace(hour=0, minute=0, second=0, microsecond=0) + dt.timedelta(
                seconds=rng.randint(0, 86399)
            )
            if occurred > now:
                continue
            rows.append(
                {
                    "billable": billable,
                    "user": ("User", billable[1]) if billable[0] == "User" else None,
                    "tenant": ("Org", "north") if i % 3 else ("Org", "south"),
                    "provider": provider,
                    "model": model,
                    "feature": rng.choices([f[0] for f in FEATURES], weights=[f[1] for f in FEATURES])[0],
                    "usage": {
                        "input_tokens": input_tokens,
                        "output_tokens": output_tokens,
                        "cached_input_tokens": cached,
                        "reasoning_tokens": reasoning,
                    },
                    "occurred_at": occurred,
                    "idempotency_key": f"seed-{occurred:%Y%m%d}-{i}",
                }
            )
    return rows


@click.command("seed-demo")
@with_appcontext
def seed_demo_command() -> None:
    """Insert demo plans, subscriptions, a wallet and ~90 days of usage (safe to re-run)."""
    from flask import current_app

    meter = current_app.extensions["ai_metering"]
    db = current_app.extensions["sqlalchemy"]
    ensure_plans(db)
    for billable, slug in SUBSCRIPTIONS.items():
        started = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=DAYS + 1)
        if meter.subscription(billable) is None:
            meter.subscribe(billable, slug, started_at=started)
        db.session.remove()
    meter.wallet(("Team", "acme")).add_credits(Decimal("250"), reason="top-up", idempotency_key="seed-topup")
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    # Keys are per day and index: a re-run on a later day still finds yesterday's rows.
    results = meter.record_batch(usage_rows(now))
    added = sum(1 for r in results if not r.replayed)
    click.echo(f"Seeded {added} new usage row(s) ({len(results) - added} already there).")
