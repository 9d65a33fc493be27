"""``flask seed-demo``: plans, demo teams and users, members' daily budgets, a wallet and ~90 days of usage.

Idempotent: plans, teams and users are created once, subscriptions are moved onto the
same plan, the top-up and every usage row carry idempotency keys, so a second run adds
nothing.

Demo accounts: ``admin@example.com`` / ``admin-password`` (an admin: the dashboard
opens) and ``member@example.com`` / ``member-password``, both in the Acme team (Pro).
"""

from __future__ import annotations

import datetime as dt
import random
import secrets
import typing as t
from decimal import Decimal

import click
import sqlalchemy as sa
from flask.cli import with_appcontext

from flask_ai_metering.models import Plan

from .models import Team
from .models import User

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
#: (team id, name, plan, weight of its share of the seeded calls)
TEAMS = [
    ("acme", "Acme Corp", "pro", 2.5),
    ("globex", "Globex", "pro", 1.2),
    ("hooli", "Hooli", "pro", 1.0),
    ("initech", "Initech", "free", 0.5),
    ("umbrella", "Umbrella", "free", 0.35),
]
#: (email, name, password, is_admin, team). Only the first two passwords are documented.
USERS = [
    ("admin@example.com", "Ada Admin", "admin-password", True, "acme"),
    ("member@example.com", "Max Member", "member-password", False, "acme"),
    ("grace@globex.example", "Grace Globex", None, False, "globex"),
    ("hank@globex.example", "Hank Globex", None, False, "globex"),
    ("gavin@hooli.example", "Gavin Hooli", None, False, "hooli"),
    ("peter@initech.example", "Peter Initech", None, False, "initech"),
    ("alice@umbrella.example", "Alice Umbrella", None, False, "umbrella"),
]
BILLABLES = [("Team", team[0]) for team in TEAMS]
#: Each member's daily budget inside the team's plan (issue 15), by the team's plan. Pro's limits
#: stay under the plan's own (``flask ai-metering validate`` flags a budget the plan makes pointless);
#: Free's monthly tokens are few, so a Free member's day is limited in calls instead.
MEMBER_BUDGETS: dict[str, dict[str, t.Any]] = {
    "pro": {"token_limit": 100_000, "cost_limit": Decimal("5"), "request_limit": 200},
    "free": {"request_limit": 50},
}


def plan_fields(free_tokens: int = 5000) -> list[dict[str, t.Any]]:
    """Free (small, so a visitor reaches its limit by chatting) and Pro, with a 14-day trial."""
    return [
        {"name": "Free", "slug": "free", "token_limit": free_tokens, "cost_limit": Decimal("1")},
        {
            "name": "Pro",
            "slug": "pro",
            "token_limit": 2_000_000,
            "cost_limit": Decimal("50"),
            "overage_price_per_1k_tokens": Decimal("0.01"),
            "trial_days": 14,
        },
    ]


DAYS = 90


def ensure_plans(db: t.Any, free_tokens: int = 5000) -> None:
    """Create the Free and Pro plans unless they exist."""
    existing = set(db.session.execute(sa.select(Plan.slug)).scalars())
    for fields in plan_fields(free_tokens):
        if fields["slug"] not in existing:
            db.session.add(Plan(**fields))
    db.session.commit()
    db.session.remove()


def ensure_users(db: t.Any) -> None:
    """Create the demo teams and users unless they exist (passwords hashed by werkzeug)."""
    for team_id, name, _, _ in TEAMS:
        if db.session.get(Team, team_id) is None:
            db.session.add(Team(id=team_id, name=name))
    emails = set(db.session.execute(sa.select(User.email)).scalars())
    for email, name, password, is_admin, team_id in USERS:
        if email not in emails:
            user = User(email=email, name=name, is_admin=is_admin, team_id=team_id)
            user.set_password(password or secrets.token_urlsafe(16))
            db.session.add(user)
    db.session.commit()


def members(db: t.Any) -> dict[str, list[str]]:
    """Team id -> its members' user ids, for attributing the seeded calls."""
    rows = db.session.execute(sa.select(User.team_id, User.id).order_by(User.id)).all()
    out: dict[str, list[str]] = {}
    for team_id, user_id in rows:
        out.setdefault(team_id, []).append(str(user_id))
    return out


def ensure_member_budgets(meter: t.Any, team_id: str, user_ids: t.Iterable[str]) -> int:
    """Give each member a daily budget fit for the team's plan; replace one the plan no longer fits.

    A budget's limits never change (remove it and add another), so a plan change swaps the
    members' budgets. Returns how many budgets were added.
    """
    billable = ("Team", team_id)
    subscription = meter.subscription(billable)
    slug = subscription.plan.slug if subscription is not None else "free"
    want = MEMBER_BUDGETS.get(slug, MEMBER_BUDGETS["free"])
    limits = ("token_limit", "cost_limit", "request_limit")
    have = {b.user_id: b for b in meter.budgets(billable) if b.user_id is not None and b.period == "day"}
    added = 0
    for user_id in user_ids:
        budget = have.get(str(user_id))
        if budget is not None and all(getattr(budget, name) == want.get(name) for name in limits):
            continue
        if budget is not None:
            meter.remove_budget(budget.id)
        meter.add_budget(billable, user=("User", str(user_id)), period="day", **want)
        added += 1
    return added


def usage_rows(now: dt.datetime, team_members: dict[str, list[str]] | None = None) -> list[dict[str, t.Any]]:
    weights = [team[3] for team in TEAMS]
    team_members = team_members or {}
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
                    "user": ("User", rng.choice(team_members[billable[1]])) if team_members.get(billable[1]) else None,
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
    ensure_plans(db, current_app.config.get("EXAMPLE_FREE_TOKEN_LIMIT", 5000))
    ensure_users(db)
    team_members = members(db)
    db.session.remove()
    for team_id, _, slug, _ in TEAMS:
        billable = ("Team", team_id)
        started = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=DAYS + 1)
        if meter.subscription(billable) is None:
            # Hooli is still in its Pro trial: the dashboard and `plans` show it trialling.
            trial = {"trial_ends_at": started + dt.timedelta(days=DAYS + 8)} if team_id == "hooli" else {}
            meter.subscribe(billable, slug, started_at=started, **trial)
        db.session.remove()
    # Before the usage: today's seeded calls then count on the members' budgets, as live ones would.
    budgets = sum(ensure_member_budgets(meter, team_id, team_members.get(team_id, ())) for team_id, *_ in TEAMS)
    db.session.remove()
    meter.wallet(("Team", "acme")).add_credits(Decimal("250"), reason="top-up", idempotency_key="seed-topup")
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    # Keys are per day and index: a re-run on a later day still finds yesterday's rows.
    results = meter.record_batch(usage_rows(now, team_members))
    added = sum(1 for r in results if not r.replayed)
    # A refund, as support gives one for a bad answer: the newest seeded call gets its cost back
    # through a ledger adjustment (the key makes a re-run replay it rather than refund twice).
    recorded = [r.usage_id for r in results if r.usage_id is not None]
    if recorded:
        meter.refund(recorded[-1], reason="demo: the answer was wrong", idempotency_key="seed-refund")
    click.echo(
        f"Seeded {added} new usage row(s) ({len(results) - added} already there), {budgets} member budget(s),"
        " a trial and a refund."
    )
    click.echo("Log in as admin@example.com / admin-password (admin) or member@example.com / member-password.")
