"""``expire-reservations``: commit the usage that was kept, release the holds of dead processes.

A reservation past its expiry is either a call whose process died (its hold is
released) or a call whose provider answered while the database failed its commit
(its usage was kept, in the reservation or the journal: it is committed now).
"""

from __future__ import annotations

import datetime as dt
import functools
import typing as t

import sqlalchemy as sa

from ..models import utcnow
from ..quota import engine as quota
from .commits import Effects
from .commits import announce_kept
from .commits import commit_kept
from .holds import release_reservation
from .ledger import reservations
from .safekeeping import replay_journal

if t.TYPE_CHECKING:
    from ..runtime import Runtime


def expire_reservations(rt: Runtime, *, now: dt.datetime | None = None, batch: int = 500) -> int:
    """Commit kept usage, then release every pending reservation past its expiry; safe beside live traffic.

    Returns how many expired reservations were settled (committed or released).
    """
    replay_journal(rt, functools.partial(_commit_journaled, rt))
    total = 0
    while True:
        seen, settled, kept = rt.store.run(functools.partial(_expire_batch, rt, now, batch))
        for payload, usage_id, effects in kept:
            announce_kept(rt, payload, usage_id, effects)
        total += settled
        if seen < batch:
            return total


def _commit_journaled(rt: Runtime, reservation_id: int, payload: dict[str, t.Any]) -> None:
    done = rt.store.run(lambda conn: commit_kept(rt, conn, reservation_id, payload))
    if done is not None:
        announce_kept(rt, payload, *done)


def _expire_batch(
    rt: Runtime, now: dt.datetime | None, batch: int, conn: sa.Connection
) -> tuple[int, int, list[tuple[dict[str, t.Any], int | None, Effects]]]:
    at = now or utcnow()
    ids = quota.pending_expired(conn, at, batch)
    payloads = (
        dict(conn.execute(sa.select(reservations.c.id, reservations.c.payload).where(reservations.c.id.in_(ids))).all())
        if ids
        else {}
    )
    settled, kept = 0, []
    for rid in ids:
        payload = payloads.get(rid)
        if payload is not None:
            done = commit_kept(rt, conn, rid, payload)
            if done is not None:
                kept.append((payload, *done))
            settled += 1
        else:
            settled += release_reservation(rt, conn, rid, "expired", at)
    return len(ids), settled, kept
