"""``reconcile`` checks of overage against what was synced.

* Per billable and currency, the minor units billed equal the exact total of the
  overages priced so far, rounded down: ``B == floor(E)``, the carry invariant of
  :mod:`.sync`. A difference means money billed twice or lost.
* A synced overage that billed something names its remote item.
* No overage is left in ``syncing`` by a sync that died: its claim lock is free
  (:mod:`.locks`), so no live sync holds it; the next sync looks it up remotely
  and finishes it.

None of these is changed by ``--fix``: what was sent to the payment provider
cannot be corrected from our side alone, so the lines say what to look at.
"""

from __future__ import annotations

import datetime as dt
import typing as t

import sqlalchemy as sa

from ..models import Overage
from ..models import table
from .locks import ClaimLocks
from .overages import floor_minor

if t.TYPE_CHECKING:
    from ..runtime import Runtime

overages = table(Overage)
_amount = sa.type_coerce(overages.c.amount, sa.BigInteger)


def check_overages(rt: Runtime, conn: sa.Connection, *, fix: bool = False, now: dt.datetime | None = None) -> list[str]:
    """One line per overage problem found (``fix`` changes nothing here; see the module doc)."""
    problems = []
    priced = conn.execute(
        sa.select(
            overages.c.billable_type,
            overages.c.billable_id,
            overages.c.currency,
            sa.func.sum(_amount),
            sa.func.sum(overages.c.synced_amount_minor),
        )
        .where(overages.c.synced_amount_minor.is_not(None))
        .group_by(overages.c.billable_type, overages.c.billable_id, overages.c.currency)
    )
    for billable_type, billable_id, currency, exact, billed in priced:
        want = floor_minor(int(exact), currency)
        if int(billed) != want:
            problems.append(
                f"overages of {billable_type}:{billable_id} ({currency}): {int(billed)} minor units priced for"
                f" billing, but their exact total rounds down to {want}; compare with the invoice items"
            )
    unnamed = conn.execute(
        sa.select(overages.c.id).where(
            overages.c.status == "synced", overages.c.synced_amount_minor != 0, overages.c.stripe_id.is_(None)
        )
    )
    for (overage_id,) in unnamed:
        problems.append(f"overage {overage_id} is synced with an amount but names no remote item")
    syncing = conn.execute(
        sa.select(overages.c.id, overages.c.sync_started_at).where(overages.c.status == "syncing")
    ).all()
    if syncing:
        with ClaimLocks(rt.store) as locks:
            for overage_id, started in syncing:
                if not locks.try_acquire(int(overage_id)):
                    continue  # a live sync is on it
                locks.release(int(overage_id))
                since = f" since {started:%Y-%m-%d %H:%M} UTC" if started is not None else ""
                problems.append(
                    f"overage {overage_id} was left syncing{since} by a sync that died;"
                    " run sync-stripe-overages to finish it"
                )
    return problems
