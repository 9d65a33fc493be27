"""Data protection: ``forget`` a billable, ``anonymize`` old usage.

``forget`` erases what identifies a billable's activity: its usage and failure rows, its
reservations (which carry idempotency keys and queued usage), its counters and
its rollup rows. Financial records that bookkeeping law requires us to keep
(overages, credit wallets and their transactions, and the subscription that
says where overage is billed) are kept, with the billable id replaced by a
pseudonym: an HMAC of ``TYPE:ID`` keyed by the app's ``SECRET_KEY``, stable so
an accountant can still tie an invoice to its wallet, and not reversible by
enumerating ids while the key stays secret. Calls of the billable still in
flight are released first, so counters and wallets keep equalling their ledgers
(``reconcile`` is clean after); such a call's later commit fails.

``anonymize`` clears ``user_id``, ``tenant_id`` and ``meta`` on usage older than
a cutoff. Tokens and cost are untouched, so counters stay as they are; detailed
rollup rows of whole days before the cutoff are folded into their tenant-less row
and those days' other rollups re-derived from them, so per-tenant reports and the
dashboard agree with the ledger.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import typing as t
from zoneinfo import ZoneInfo

import sqlalchemy as sa

from ..errors import ConfigurationError
from ..metering.holds import release_reservation
from ..models import TOKEN_COLUMNS
from ..models import AlertEvent
from ..models import Counter
from ..models import CreditWallet
from ..models import Failure
from ..models import Overage
from ..models import Reservation
from ..models import Subscription
from ..models import Usage
from ..models import utcnow
from ..quota.budgets import budget_counters
from ..quota.budgets import budgets
from ..quota.periods import period_for
from ..reporting.rollups import BILLABLES
from ..reporting.rollups import DERIVED
from ..reporting.rollups import DETAILED
from ..reporting.rollups import TOTALS
from ..reporting.rollups import RollupSpec
from ..reporting.rollups import as_date
from ..reporting.rollups import day_bounds
from ..reporting.rollups import lock_watermark
from ..reporting.rollups import refill
from ..reporting.rollups import refill_latency
from .reconcile import retained_since

if t.TYPE_CHECKING:
    from ..quota.policy import Billable
    from ..runtime import Runtime

usage = t.cast(sa.Table, Usage.__table__)
reservations = t.cast(sa.Table, Reservation.__table__)
counters = t.cast(sa.Table, Counter.__table__)
rollups = DETAILED.table
overages = t.cast(sa.Table, Overage.__table__)
_DELETED = (
    ("reservations", reservations),
    ("usage rows", usage),
    ("failure rows", t.cast(sa.Table, Failure.__table__)),
    ("rollup rows", rollups),
    ("billable rollup rows", BILLABLES.table),
    ("counters", counters),
    ("alert events", t.cast(sa.Table, AlertEvent.__table__)),
)
_KEPT = (
    ("subscriptions (pseudonymized)", t.cast(sa.Table, Subscription.__table__)),
    ("credit wallets (pseudonymized)", t.cast(sa.Table, CreditWallet.__table__)),
    ("overages (pseudonymized)", overages),
)
_ROLLUP_MEASURES = ("calls", *TOKEN_COLUMNS, "total_cost", "unpriced_calls", "refunds", "refunded_cost")


#: ``SECRET_KEY`` values seen in tutorials and templates: as good as no key.
_PLACEHOLDER_KEYS = {"dev", "development", "secret", "secret-key", "secret_key", "changeme", "change-me", "test"}
#: The shortest ``SECRET_KEY`` a pseudonym may be keyed with.
MIN_SECRET_KEY_LENGTH = 16


def secret_key_problem(app: t.Any) -> str | None:
    """Why the app's ``SECRET_KEY`` cannot key pseudonyms (None when it can)."""
    key = app.config.get("SECRET_KEY")
    if not key:
        return "SECRET_KEY is not set: forget's pseudonyms could be reversed by trying ids"
    raw = key if isinstance(key, bytes) else str(key).encode()
    if len(raw) < MIN_SECRET_KEY_LENGTH or raw.decode(errors="replace").strip().lower() in _PLACEHOLDER_KEYS:
        return (
            f"SECRET_KEY is weak (a placeholder or under {MIN_SECRET_KEY_LENGTH} bytes):"
            " forget's pseudonyms could be reversed by trying ids"
        )
    return None


def require_secret_key(app: t.Any) -> None:
    """:raises ConfigurationError: ``SECRET_KEY`` is unset or weak (see :func:`secret_key_problem`)."""

    problem = secret_key_problem(app)
    if problem is not None:
        raise ConfigurationError(problem + "; set a long random SECRET_KEY first")


def latest_anonymizable(rt: Runtime, now: dt.datetime | None = None) -> dt.datetime:
    """The latest ``anonymize`` cutoff allowed: the start of the earliest running period.

    Usage of a running period is what its counter and limit checks are explained
    by, so it keeps its attribution until the period ends; so does the default
    calendar period of billables without a subscription, and the future.
    """

    at = now or utcnow()
    latest = period_for(
        at, period_type=rt.settings.period_type, alignment="calendar", timezone=rt.settings.timezone
    ).start
    with rt.store.engine.connect() as conn:
        running = conn.execute(
            sa.select(sa.func.min(counters.c.period_start)).where(counters.c.period_end > at)
        ).scalar()
    return min(latest, running) if running is not None else latest


def pseudonym(rt: Runtime, billable: Billable) -> str:
    """The stable id a forgotten billable's financial records carry from now on."""
    key = str(rt.app.secret_key or "").encode()
    digest = hmac.new(key, f"{billable[0]}:{billable[1]}".encode(), hashlib.sha256).hexdigest()
    return f"forgotten-{digest[:32]}"


def _of(table: sa.Table, billable: Billable) -> sa.ColumnElement[bool]:
    return sa.and_(table.c.billable_type == billable[0], table.c.billable_id == billable[1])


def forget(rt: Runtime, billable: Billable, dry_run: bool = False) -> dict[str, int]:
    """Erase ``billable``'s usage and claims; keep its financial records under a pseudonym.

    Returns rows per kind (what would change, with ``dry_run``). One transaction:
    a failure changes nothing.

    :raises ConfigurationError: (unless ``dry_run``) the app's ``SECRET_KEY`` is
        unset or weak, so the pseudonyms could be reversed.
    """
    if not dry_run:
        require_secret_key(rt.app)
    alias = pseudonym(rt, billable)

    def work(conn: sa.Connection) -> dict[str, int]:
        counts = {
            label: int(
                conn.execute(sa.select(sa.func.count()).select_from(table).where(_of(table, billable))).scalar_one()
            )
            for label, table in _DELETED + _KEPT
        }
        # Budgets name users; their counters hang off them (no billable columns of their own).
        of_budgets = sa.select(budgets.c.id).where(_of(budgets, billable))
        counts["budget counters"] = int(
            conn.execute(sa.select(sa.func.count()).where(budget_counters.c.budget_id.in_(of_budgets))).scalar_one()
        )
        counts["budgets"] = int(conn.execute(sa.select(sa.func.count()).where(_of(budgets, billable))).scalar_one())
        if dry_run:
            return counts
        lock_watermark(conn, rt.settings.timezone)
        _release_pending(rt, conn, billable)
        days = {
            as_date(day)
            for rows in (rollups, BILLABLES.table)
            for day in conn.execute(sa.select(rows.c.day).where(_of(rows, billable)).distinct()).scalars()
        }
        for _, table in _DELETED:
            conn.execute(sa.delete(table).where(_of(table, billable)))
        conn.execute(sa.delete(budget_counters).where(budget_counters.c.budget_id.in_(of_budgets)))
        conn.execute(sa.delete(budgets).where(_of(budgets, billable)))
        _rederive(conn, rt, days, (TOTALS,))
        _recount_latency(conn, rt, days)
        for _, table in _KEPT:
            _rename(conn, table, billable, alias)
        return counts

    return rt.store.run(work, write=not dry_run)


def _release_pending(rt: Runtime, conn: sa.Connection, billable: Billable) -> None:
    """Return the holds of calls in flight, as the sweeper would, before their rows go."""
    now = utcnow()
    pending = conn.execute(
        sa.select(reservations.c.id).where(_of(reservations, billable), reservations.c.status == "pending")
    ).scalars()
    for reservation_id in list(pending):
        release_reservation(rt, conn, reservation_id, "released", now)


def _rename(conn: sa.Connection, table: sa.Table, billable: Billable, alias: str) -> None:
    """Give the billable's rows the pseudonym, and drop their free-form metadata."""
    values: dict[str, t.Any] = {"billable_id": alias}
    if "meta" in table.c:
        values["meta"] = sa.null()
    if table is not overages and conn.execute(sa.select(table.c.id).where(_of(table, (billable[0], alias)))).first():
        # One row per billable there, and a billable forgotten before already holds the
        # pseudonym: this later row is told apart by its own id.
        row_id = conn.execute(sa.select(table.c.id).where(_of(table, billable))).scalar()
        values["billable_id"] = f"{alias}-{row_id}"
    conn.execute(sa.update(table).where(_of(table, billable)).values(values))


def _identifying(before: dt.datetime) -> sa.ColumnElement[bool]:
    # A JSON column holds the JSON literal null for a Python None: that is not metadata.
    has_meta = sa.and_(usage.c.meta.is_not(None), sa.cast(usage.c.meta, sa.Text) != "null")
    return sa.and_(
        usage.c.occurred_at < before,
        sa.or_(usage.c.user_id.is_not(None), usage.c.tenant_id.is_not(None), has_meta),
    )


def anonymize(rt: Runtime, before: dt.datetime, dry_run: bool = False) -> int:
    """Clear user, tenant and meta on usage that happened before ``before``; return how many rows.

    Works in transactions of ``AI_METERING_BATCH_SIZE`` rows, so it never holds
    long locks on a busy ledger; a re-run finds nothing left to do.
    """
    if before.tzinfo is None:
        raise ValueError(f"before must be a timezone-aware datetime, got {before!r}")
    where = _identifying(before)
    if dry_run:
        with rt.store.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(usage).where(where)).scalar_one())
    size = rt.settings.batch_size

    def batch(conn: sa.Connection) -> int:
        ids = list(conn.execute(sa.select(usage.c.id).where(where).order_by(usage.c.id).limit(size)).scalars())
        if ids:
            conn.execute(
                sa.update(usage).where(usage.c.id.in_(ids)).values(user_id=None, tenant_id=None, meta=sa.null())
            )
        return len(ids)

    total = 0
    while True:
        done = rt.store.run(batch)
        total += done
        if done < size:
            break
    first_kept_day = before.astimezone(ZoneInfo(rt.settings.timezone)).date()
    rt.store.run(lambda conn: _fold_rollup_tenants(conn, rt, first_kept_day))
    return total


def _recount_latency(conn: sa.Connection, rt: Runtime, days: t.Iterable[dt.date]) -> None:
    """Re-group the latency rollup of ``days`` from the ledger, for the days ``cleanup`` left whole.

    It has no billable to delete by; its rows of pruned days keep the forgotten calls'
    counts, which say nothing about who made them.
    """
    zone = ZoneInfo(rt.settings.timezone)
    kept = retained_since(conn)
    for day in sorted(days):
        if kept is None or day_bounds(day, zone)[0] >= kept:
            refill_latency(conn, day, zone)


def _rederive(conn: sa.Connection, rt: Runtime, days: t.Iterable[dt.date], specs: t.Sequence[RollupSpec]) -> None:
    """Rebuild ``specs`` (rollups derived from the detailed one) for ``days``, after it changed in place."""
    zone = ZoneInfo(rt.settings.timezone)
    for day in sorted(days):
        refill(conn, day, zone, specs)


def _fold_rollup_tenants(conn: sa.Connection, rt: Runtime, first_kept_day: dt.date) -> None:
    """Move detailed rollup rows of days before ``first_kept_day`` into their tenant-less row."""
    lock_watermark(conn, rt.settings.timezone)
    key = ("day", "billable_type", "billable_id", "provider", "model", "feature")
    rows = conn.execute(sa.select(rollups).where(rollups.c.day < first_kept_day, rollups.c.tenant_id != "")).all()
    for row in rows:
        target = sa.and_(*(rollups.c[k] == getattr(row, k) for k in key), rollups.c.tenant_id == "")
        adds = {m: sa.type_coerce(rollups.c[m], sa.BigInteger) + _raw(row, m) for m in _ROLLUP_MEASURES}
        if conn.execute(sa.update(rollups).where(target).values(adds)).rowcount:
            conn.execute(sa.delete(rollups).where(rollups.c.id == row.id))
        else:
            conn.execute(sa.update(rollups).where(rollups.c.id == row.id).values(tenant_id=""))
    _rederive(conn, rt, {as_date(row.day) for row in rows}, DERIVED)


def _raw(row: t.Any, name: str) -> int:
    """A rollup measure as the raw integer SQL adds (money columns read as ``Decimal``)."""
    value = getattr(row, name)
    return int(value.scaleb(12)) if name in ("total_cost", "refunded_cost") else int(value)
