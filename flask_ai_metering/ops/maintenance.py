"""``flask ai-metering cleanup``: prune old ledger rows and finished reservations, in batches.

What goes: usage rows and failure rows older than the retention window, and reservations that are
finished (``committed``, ``released`` or ``expired`` — an idempotency claim is a
reservation, so expired claims go with them) and older than the same cutoff.
Delivered alert events older than the cutoff go too.
What stays: rollups (they are the long-term history), counters, pending
reservations (an outbox payload may still be waiting in one), undelivered alerts,
wallets, overages.

The cutoff never reaches into a period that is still running, and cleanup records
it (``pruned_before``) so ``reconcile`` checks exactly the periods whose usage is
whole: counters keep equalling the ledger (invariant 8). Rows are deleted
``AI_METERING_BATCH_SIZE`` at a time, each batch its own short transaction, so a
prune of millions of rows never holds a long lock.
"""

from __future__ import annotations

import datetime as dt
import logging
import typing as t

import sqlalchemy as sa

from ..models import AggregationState
from ..models import AlertEvent
from ..models import Counter
from ..models import Failure
from ..models import Reservation
from ..models import Usage
from ..models import utcnow
from .reconcile import PRUNED_BEFORE

if t.TYPE_CHECKING:
    from ..reporting.rollups import Progress
    from ..runtime import Runtime

log = logging.getLogger("flask_ai_metering")

usage = t.cast(sa.Table, Usage.__table__)
reservations = t.cast(sa.Table, Reservation.__table__)
counters = t.cast(sa.Table, Counter.__table__)
state = t.cast(sa.Table, AggregationState.__table__)
failures = t.cast(sa.Table, Failure.__table__)
alert_events = t.cast(sa.Table, AlertEvent.__table__)

FINISHED = ("committed", "released", "expired")


def prune_cutoff(rt: Runtime, days: int | None, now: dt.datetime) -> dt.datetime:
    """The instant before which rows may go: ``days`` (default the setting) ago, never inside a running period.

    A running period (a yearly plan, say) can start before the cutoff; its
    counter must keep equalling the ledger, so the cutoff stops at its start.
    """
    keep = rt.settings.prune_after_days if days is None else days
    cutoff = now - dt.timedelta(days=keep)
    with rt.store.engine.connect() as conn:
        running = conn.execute(
            sa.select(sa.func.min(counters.c.period_start)).where(counters.c.period_end > now)
        ).scalar()
    if running is not None and running < cutoff:
        cutoff = running
    return cutoff


def _mark_pruned(rt: Runtime, cutoff: dt.datetime) -> None:
    """Record that no usage before ``cutoff`` is kept, so ``reconcile`` checks only whole periods."""

    def work(conn: sa.Connection) -> None:
        current = conn.execute(
            sa.select(state.c.marked_at).where(state.c.name == PRUNED_BEFORE).with_for_update()
        ).first()
        if current is None:
            conn.execute(
                sa.insert(state).values(name=PRUNED_BEFORE, last_usage_id=0, marked_at=cutoff, updated_at=utcnow())
            )
        elif current.marked_at is None or current.marked_at < cutoff:
            conn.execute(
                sa.update(state).where(state.c.name == PRUNED_BEFORE).values(marked_at=cutoff, updated_at=utcnow())
            )

    rt.store.run(work)


def _delete_in_batches(
    rt: Runtime,
    table: sa.Table,
    where: sa.ColumnElement[bool],
    *,
    dry_run: bool,
    progress: Progress | None,
) -> int:
    with rt.store.engine.connect() as conn:
        total = int(conn.execute(sa.select(sa.func.count()).select_from(table).where(where)).scalar_one())
    if dry_run or total == 0:
        return total
    if progress is not None:
        progress.start(total)
    size = rt.settings.batch_size
    deleted = 0

    def batch(conn: sa.Connection) -> int:
        # Select the ids first: MySQL refuses LIMIT inside a DELETE's IN subquery.
        ids = list(conn.execute(sa.select(table.c.id).where(where).order_by(table.c.id).limit(size)).scalars())
        if not ids:
            return 0
        conn.execute(sa.delete(table).where(table.c.id.in_(ids)))
        return len(ids)

    while True:
        n = rt.store.run(batch)
        deleted += n
        if progress is not None and n:
            progress.update(n)
        if n < size:
            return deleted


def cleanup(
    rt: Runtime,
    *,
    days: int | None = None,
    dry_run: bool = False,
    progress: Progress | None = None,
    now: dt.datetime | None = None,
) -> dict[str, int]:
    """Delete (or with ``dry_run`` count) what is past retention; return rows per table label."""
    now = now or utcnow()
    cutoff = prune_cutoff(rt, days, now)
    if not dry_run:
        _mark_pruned(rt, cutoff)  # before deleting: a crash mid-way must not leave reconcile blind
    return {
        "usage rows": _delete_in_batches(rt, usage, usage.c.occurred_at < cutoff, dry_run=dry_run, progress=progress),
        "finished reservations": _delete_in_batches(
            rt,
            reservations,
            sa.and_(reservations.c.status.in_(FINISHED), reservations.c.created_at < cutoff),
            dry_run=dry_run,
            progress=None,
        ),
        "failure rows": _delete_in_batches(
            rt, failures, failures.c.occurred_at < cutoff, dry_run=dry_run, progress=None
        ),
        # Only delivered alerts: an undelivered one is still owed to the receiver.
        "delivered alerts": _delete_in_batches(
            rt,
            alert_events,
            sa.and_(alert_events.c.delivered_at.is_not(None), alert_events.c.delivered_at < cutoff),
            dry_run=dry_run,
            progress=None,
        ),
    }
