"""Trial notices: ``trial_ending`` once, N days before a trial ends, and ``trial_ended`` once at its end.

Checked by ``expire-reservations`` (cron, every minute) and ``meter.check_trials()``.
Each notice is claimed by one guarded UPDATE (``… SET trial_ending_sent_at = now
WHERE id = ? AND trial_ending_sent_at IS NULL``) in its own transaction, and sent
only by the process whose UPDATE changed the row: however many processes check at
once, each notice of each trial fires once. A new trial clears both marks. A trial
whose end passed before any check saw it ending gets ``trial_ended`` only.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import typing as t

import sqlalchemy as sa

from .. import signals
from ..models import Plan
from ..models import Subscription
from ..models import table
from ..models import utcnow

if t.TYPE_CHECKING:
    from ..runtime import Runtime

subs = table(Subscription)
plans = table(Plan)


@dataclasses.dataclass
class TrialNotices:
    """What one check sent."""

    ending: int = 0
    ended: int = 0


def check_trials(rt: Runtime, *, now: dt.datetime | None = None) -> TrialNotices:
    """Send the trial notices that are due; see the module doc."""
    at = now or utcnow()
    soon = at + dt.timedelta(days=rt.settings.trial_ending_days)
    due = sa.or_(
        sa.and_(subs.c.trial_ended_sent_at.is_(None), subs.c.trial_ends_at <= at),
        sa.and_(subs.c.trial_ending_sent_at.is_(None), subs.c.trial_ends_at <= soon, subs.c.trial_ends_at > at),
    )
    rows = rt.store.run(
        lambda conn: conn.execute(
            sa.select(subs.c.id, subs.c.billable_type, subs.c.billable_id, subs.c.trial_ends_at, plans.c.slug)
            .join(plans, plans.c.id == subs.c.plan_id)
            .where(subs.c.trial_ends_at.is_not(None), due)
        ).all(),
        write=False,
    )
    sent = TrialNotices()
    for row in rows:
        billable = (row.billable_type, row.billable_id)
        details = {"subscription_id": int(row.id), "plan": row.slug, "trial_ends_at": row.trial_ends_at}
        if row.trial_ends_at <= at:
            # The ending notice is not sent late: a trial that is over gets trial_ended alone.
            if _claim(rt, row.id, "trial_ended_sent_at", at, ending=False):
                sent.ended += 1
                signals.trial_ended.send(rt.app, billable=billable, **details)
        elif _claim(rt, row.id, "trial_ending_sent_at", at, ending=True):
            sent.ending += 1
            signals.trial_ending.send(rt.app, billable=billable, days_left=(row.trial_ends_at - at).days, **details)
    return sent


def _claim(rt: Runtime, sub_id: int, mark: str, at: dt.datetime, *, ending: bool) -> bool:
    """Set ``mark`` if no process has; True for the one whose UPDATE did."""
    conditions = [subs.c.id == sub_id, subs.c[mark].is_(None), subs.c.trial_ends_at.is_not(None)]
    if ending:
        conditions.append(subs.c.trial_ends_at > at)
    else:
        conditions.append(subs.c.trial_ends_at <= at)
    stmt = sa.update(subs).where(*conditions).values({mark: at})
    return bool(rt.store.run(lambda conn: conn.execute(stmt).rowcount == 1))
