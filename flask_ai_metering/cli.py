"""``flask ai-metering …``: thin click wrappers over plain functions.

Data goes to stdout, logs and progress to stderr, so ``--format json`` output
parses; progress bars show only on a terminal. Bad arguments exit 2 with a
message and change nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import sys
import typing as t

import click
from flask import current_app
from flask.cli import AppGroup

from .alerts.delivery import deliver_due
from .errors import ConfigurationError
from .errors import InvalidUsage
from .ops import schema as migrations
from .ops.health import notes as validation_notes
from .ops.health import validate
from .ops.maintenance import cleanup
from .ops.privacy import anonymize
from .ops.privacy import forget
from .ops.privacy import latest_anonymizable
from .ops.privacy import require_secret_key
from .ops.reconcile import reconcile
from .ops.reports import build_report
from .ops.reports import parse_month
from .ops.reports import plans_table
from .ops.reports import render
from .ops.reprice import reprice
from .queueing import flush_outbox
from .reporting.budgets import budget_usage
from .reporting.budgets import budgets_table
from .reporting.rollups import aggregate

cli = AppGroup("ai-metering", help="AI usage metering, quotas and billing.")


def _meter() -> t.Any:
    return current_app.extensions["ai_metering"]


def parse_billable(value: str) -> tuple[str, str]:
    kind, sep, ident = value.partition(":")
    if not sep or not kind or not ident:
        raise click.BadParameter(f"expected TYPE:ID (e.g. Team:42), got {value!r}")
    return kind, ident


class _Billable(click.ParamType):  # type: ignore[type-arg]
    name = "TYPE:ID"

    def convert(self, value: t.Any, param: t.Any, ctx: t.Any) -> tuple[str, str]:
        try:
            return parse_billable(value)
        except click.BadParameter as exc:
            self.fail(exc.message, param, ctx)


BILLABLE = _Billable()

#: The largest ``--days`` (a century): more is a typo, and would overflow the calendar.
MAX_DAYS = 36_600
#: The largest ``--limit`` of a sync: beyond what any database's LIMIT accepts is a typo.
MAX_LIMIT = 2**31 - 1


class Progress:
    """A progress bar on stderr when it is a terminal; silent in pipes and tests."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._bar: t.Any = None
        self._stack = contextlib.ExitStack()

    def start(self, total: int) -> None:
        if sys.stderr.isatty() and total:
            self._bar = self._stack.enter_context(click.progressbar(length=total, label=self.label, file=sys.stderr))

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


def _status(message: str, **style: t.Any) -> None:
    click.secho(message, err=True, **style)


def _interactive() -> bool:
    """True when a person can answer a question (stdin is a terminal)."""
    try:
        return sys.stdin.isatty()
    except (AttributeError, ValueError):
        return False


#: The ``--yes/-y`` flag of every destructive command.
yes_option = click.option("--yes", "-y", is_flag=True, help="Do it without asking (required when not on a terminal).")


def confirm_destructive(yes: bool, question: str) -> None:
    """Go on when ``--yes`` was given or a person on a terminal says yes; else exit.

    Off a terminal (cron, CI, a pipe) nobody can answer, so the command refuses
    with exit code 2 rather than guess; a "no" on a terminal aborts with 1.
    """
    if yes:
        return
    if _interactive():
        click.confirm(question, abort=True, err=True)
        return
    raise click.UsageError(f"{question} Refusing without confirmation: pass --yes to run it non-interactively.")


@cli.command("expire-reservations")
def expire_reservations_command() -> None:
    """Release reservations whose calls never committed, write queued rows whose task was lost, send trial notices.

    Safe to run from cron while traffic flows.
    """
    released = _meter().expire_reservations()
    rt = _meter().runtime()
    # The safety net of queued recording: rows whose task was lost are written here.
    written = flush_outbox(rt, older_than=dt.timedelta(seconds=rt.settings.reservation_ttl))
    trials = _meter().check_trials()
    _status(
        f"Released {released} expired reservation(s); wrote {written} queued usage row(s);"
        f" sent {trials.ending} trial_ending and {trials.ended} trial_ended notice(s).",
        fg="green",
    )


@cli.command("reprice")
@click.option("--model", help="Only calls to this model (as the ledger names it).")
@click.option("--since", help="Only calls on or after this day (YYYY-MM-DD, UTC).")
@click.option("--dry-run", is_flag=True, help="Say what would be repriced; write nothing.")
def reprice_command(model: str | None, since: str | None, dry_run: bool) -> None:
    """Price unpriced and estimated calls once a price exists, through ledger adjustments."""
    start = None
    if since is not None:
        try:
            start = dt.datetime.combine(dt.date.fromisoformat(since), dt.time(), dt.timezone.utc)
        except ValueError:
            raise click.BadParameter(f"expected YYYY-MM-DD, got {since!r}", param_hint="--since") from None
    with Progress("Repricing usage") as progress:
        report = reprice(_meter().runtime(), model=model, since=start, dry_run=dry_run, progress=progress)
    _status(str(report), fg="green")


@cli.command("reconcile")
@click.option("--fix", is_flag=True, help="Repair the drift found (counters are set from the ledger).")
def reconcile_command(fix: bool) -> None:
    """Check counters against the ledger and reservations; exit 1 on drift (unless --fix)."""
    problems = reconcile(_meter().runtime(), fix=fix)
    for problem in problems:
        click.echo(problem)
    if problems and not fix:
        raise SystemExit(1)
    _status("Fixed." if problems else "No drift.", fg="green")


@cli.command("plans")
def plans_command() -> None:
    """List the plans with their limits and subscriber counts."""
    click.echo(plans_table(_meter().runtime()))


@cli.command("migrate-plan")
@click.argument("billable", type=BILLABLE)
@click.argument("plan_slug")
@click.option("--from-plan", help="Only move the billable if it is on this plan now.")
def migrate_plan_command(billable: tuple[str, str], plan_slug: str, from_plan: str | None) -> None:
    """Move BILLABLE (TYPE:ID) to the plan PLAN_SLUG from now on (fires plan_changed)."""
    try:
        _meter().subscribe(billable, plan_slug, from_plan=from_plan)
    except InvalidUsage as exc:
        raise click.UsageError(str(exc)) from None
    _status(f"{billable[0]}:{billable[1]} is on plan {plan_slug!r}.", fg="green")


@cli.command("report")
@click.option("--month", metavar="YYYY-MM", help="The month to report (default: this month).")
@click.option("--billable", type=BILLABLE, help="Only this billable (TYPE:ID).")
@click.option("--tenant", help="Only this tenant id.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@click.option("--forecast", is_flag=True, help="Add the projected month total per billable (weighted run rate).")
@click.option("--budgets", is_flag=True, help="Add each budget's usage in the month, from its counters (by_budget).")
def report_command(
    month: str | None, billable: tuple[str, str] | None, tenant: str | None, fmt: str, forecast: bool, budgets: bool
) -> None:
    """Tokens, cost and calls for a month, by billable, provider, model and feature (and budget)."""
    try:
        start = parse_month(month)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--month") from None
    if billable is not None:  # ``team:42`` reports on Team:42, as the metered calls stored it
        try:
            billable = _meter().resolve_billable(billable)
        except InvalidUsage as exc:
            raise click.BadParameter(str(exc), param_hint="--billable") from None
    rt = _meter().runtime()
    report = build_report(rt, start, billable=billable, tenant=tenant, forecast=forecast, budgets=budgets)
    click.echo(render(report, fmt))


@cli.command("budgets")
@click.option("--billable", type=BILLABLE, help="Only this billable's budgets (TYPE:ID).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def budgets_command(billable: tuple[str, str] | None, fmt: str) -> None:
    """List the live budgets with their scope, period, limits, usage this period and reset time."""
    if billable is not None:  # ``team:42`` lists Team:42's budgets, as add_budget stored them
        try:
            billable = _meter().resolve_billable(billable)
        except InvalidUsage as exc:
            raise click.BadParameter(str(exc), param_hint="--billable") from None
    rt = _meter().runtime()
    rows = budget_usage(rt, billable)
    if fmt == "json":
        click.echo(json.dumps([row.as_dict() for row in rows], indent=2))
    else:
        click.echo(budgets_table(rows, _local_time(rt.settings.timezone)))


def _local_time(timezone: str) -> t.Callable[[dt.datetime], str]:
    """Times as the dashboard shows them: minutes, in ``AI_METERING_TIMEZONE``, with its name."""
    from zoneinfo import ZoneInfo

    zone = ZoneInfo(timezone)
    return lambda at: f"{at.astimezone(zone):%Y-%m-%d %H:%M} {timezone}"


@cli.command("validate")
def validate_command() -> None:
    """Check configuration, database and data integrity; exit 1 with one line per problem."""
    problems = validate(current_app)
    for note in validation_notes(current_app):
        _status(note)
    for problem in problems:
        click.echo(problem)
    if problems:
        raise SystemExit(1)
    _status("Everything checks out.", fg="green")


@cli.command("cleanup")
@click.option(
    "--days",
    type=click.IntRange(min=1, max=MAX_DAYS),
    help="Keep this many days (default AI_METERING_PRUNE_AFTER_DAYS).",
)
@click.option("--dry-run", is_flag=True, help="Say what would be deleted; delete nothing.")
@yes_option
def cleanup_command(days: int | None, dry_run: bool, yes: bool) -> None:
    """Prune old usage, finished reservations, expired idempotency claims and delivered alerts (never rollups)."""

    if not dry_run:
        kept = _meter().runtime().settings.prune_after_days if days is None else days
        confirm_destructive(yes, f"Delete usage rows and finished reservations older than {kept} day(s)?")
    with Progress("Pruning usage") as progress:
        counts = cleanup(_meter().runtime(), days=days, dry_run=dry_run, progress=progress)
    verb = "Would delete" if dry_run else "Deleted"
    for table, count in counts.items():
        click.echo(f"{verb} {count} {table}")


@cli.command("aggregate")
@click.option("--period", type=click.Choice(["day", "week", "month"]), default="day", show_default=True)
def aggregate_command(period: str) -> None:
    """Fill the daily rollup tables from the ledger (incremental, safe to re-run)."""
    with Progress("Aggregating usage") as progress:
        rows = aggregate(_meter().runtime(), period=period, progress=progress)
    _status(f"Aggregated {rows} rollup row(s).", fg="green")


@cli.command("sync-stripe-overages")
@click.option("--limit", type=click.IntRange(min=1, max=MAX_LIMIT), help="Sync at most this many overages.")
def sync_overages_command(limit: int | None) -> None:
    """Send pending overages to the billing driver, each exactly once."""
    with Progress("Syncing overages") as progress:
        report = _meter().runtime().billing.sync_overages(limit=limit, progress=progress)
    if report is None:
        _status("The null billing driver syncs nothing.", fg="yellow")
        return
    if not getattr(report, "ok", True):
        for error in getattr(report, "errors", []):
            click.echo(str(error), err=True)
        _status(str(report), fg="red")
        raise SystemExit(1)
    _status(str(report), fg="green")


@cli.command("deliver-alerts")
@click.option("--retry-failed", is_flag=True, help="First give alerts that used up their attempts a fresh set.")
def deliver_alerts_command(retry_failed: bool) -> None:
    """Send the alerts that are due to the webhook; exit 1 while any is out of attempts.

    Safe beside the background thread and other runs: each alert is claimed before it is sent.
    """
    rt = _meter().runtime()
    if not rt.settings.alert_webhook_url:
        _status("No AI_METERING_ALERT_WEBHOOK_URL is set: alerts are only signals.", fg="yellow")
    report = deliver_due(rt, limit=None, retry_failed=retry_failed)
    click.echo(json.dumps(dataclasses.asdict(report)))
    if not report.ok:
        _status(f"{report} Fix the receiver, then run deliver-alerts --retry-failed.", fg="red")
        raise SystemExit(1)
    _status(str(report), fg="green")


@cli.command("forget")
@click.argument("billable", type=BILLABLE)
@click.option("--dry-run", is_flag=True, help="Say what would be deleted; delete nothing.")
@yes_option
def forget_command(billable: tuple[str, str], dry_run: bool, yes: bool) -> None:
    """Delete a billable's usage and claims; keep financial records, anonymized."""

    if not dry_run:
        try:
            require_secret_key(current_app)
        except ConfigurationError as exc:
            raise click.UsageError(str(exc)) from None
        confirm_destructive(yes, f"Delete the usage of {billable[0]}:{billable[1]} and pseudonymize its records?")
    for table, count in forget(_meter().runtime(), billable, dry_run=dry_run).items():
        click.echo(f"{'Would change' if dry_run else 'Changed'} {count} {table}")


@cli.command("anonymize")
@click.option("--before", required=True, metavar="YYYY-MM-DD", help="Anonymize usage that happened before this day.")
@click.option("--dry-run", is_flag=True, help="Say what would change; change nothing.")
@yes_option
def anonymize_command(before: str, dry_run: bool, yes: bool) -> None:
    """Clear user, tenant and meta on usage older than --before (a day before every running period)."""

    try:
        day = dt.date.fromisoformat(before)
    except ValueError:
        raise click.BadParameter(f"expected YYYY-MM-DD, got {before!r}", param_hint="--before") from None
    cutoff = dt.datetime.combine(day, dt.time(), dt.timezone.utc)
    rt = _meter().runtime()
    latest = latest_anonymizable(rt)
    if cutoff > latest:
        raise click.BadParameter(
            f"{before} is in the future or inside a running period; the latest allowed is {latest:%Y-%m-%d}"
            " (counters of running periods are checked against their usage)",
            param_hint="--before",
        )
    if not dry_run:
        confirm_destructive(yes, f"Clear user, tenant and meta of usage before {before}?")
    count = anonymize(rt, cutoff, dry_run=dry_run)
    click.echo(f"{'Would anonymize' if dry_run else 'Anonymized'} {count} usage row(s)")


@cli.group("db")
def db_group() -> None:
    """Run flask_ai_metering's own migrations (separate from the app's)."""


def _check_revision(revision: str) -> None:
    """Exit 2 unless ``revision`` names one of the shipped scripts (or head, base, +N, -N)."""
    import re

    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    if revision in ("head", "heads", "base") or re.fullmatch(r"[+-][0-9]{1,4}", revision):
        return
    try:
        found = ScriptDirectory.from_config(migrations.config()).get_revisions(revision)
    except CommandError:
        found = ()
    if not found:
        raise click.BadParameter(f"no such metering revision: {revision!r}", param_hint="REVISION")


def _migrate(step: t.Callable[[t.Any, str], None], revision: str) -> None:
    """Run an Alembic step; a revision Alembic cannot reach from here exits 2 with its message."""
    from alembic.util import CommandError

    engine = _meter().runtime().store.engine
    try:
        step(engine, revision)
    except CommandError as exc:
        raise click.UsageError(f"cannot migrate to {revision!r}: {exc}") from None
    _status(f"Metering schema at {migrations.current(engine)}.", fg="green")


@db_group.command("upgrade")
@click.argument("revision", default="head")
def db_upgrade(revision: str) -> None:
    """Upgrade the metering tables to REVISION (default: head)."""

    _check_revision(revision)
    _migrate(migrations.upgrade, revision)


@db_group.command("downgrade")
@click.argument("revision")
@yes_option
def db_downgrade(revision: str, yes: bool) -> None:
    """Downgrade the metering tables to REVISION ('base' drops them all, with their data).

    REVISION is required, and so is --yes (or a "yes" on a terminal): a downgrade
    drops tables and columns, and what they held is gone.
    """

    _check_revision(revision)
    current = migrations.current(_meter().runtime().store.engine)
    confirm_destructive(
        yes, f"Downgrade the metering schema from {current} to {revision}? Dropped tables and columns lose their data."
    )
    _migrate(migrations.downgrade, revision)


@db_group.command("current")
def db_current() -> None:
    """Print the metering schema's current revision."""
    revision = migrations.current(_meter().runtime().store.engine)
    click.echo(json.dumps({"current": revision, "head": migrations.head()}))
