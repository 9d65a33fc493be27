"""Keeping the holds of live calls alive, so expiry only ever releases a dead process's holds.

A reservation expires ``AI_METERING_RESERVATION_TTL`` seconds after it was last
renewed. While a call is in flight, one thread per process renews every live
hold of an engine in a single UPDATE, every third of the TTL. A crashed process
stops renewing and its holds expire; a live call may run far longer than the TTL
(a long stream, a slow reasoning model) without its quota being released under
it and handed to other callers.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import math
import threading
import typing as t

import sqlalchemy as sa

from ..models import Reservation
from ..models import table
from ..models import utcnow

if t.TYPE_CHECKING:
    from ..transactions import Transactions

log = logging.getLogger("flask_ai_metering")
reservations = table(Reservation)

_RENEW = (
    sa.update(reservations)
    .where(
        reservations.c.id.in_(sa.bindparam("ids", expanding=True)),
        reservations.c.status == "pending",
    )
    .values(expires_at=sa.bindparam("until", type_=reservations.c.expires_at.type))
)


def _renew(params: dict[str, t.Any], conn: sa.Connection) -> int:
    return int(conn.execute(_RENEW, params).rowcount)


def _interval(ttl: int) -> float:
    """Renew every third of the TTL: two renewals can fail before a live hold expires."""
    return max(1.0, ttl / 3)


class LeaseKeeper:
    """The per-process registry of live holds, and the thread that renews them."""

    def __init__(self) -> None:
        self._live: dict[int, tuple[Transactions, int]] = {}
        #: Guards only the start of the thread.
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        #: Seconds between renewals; infinite until the first hold sets it.
        self._interval = float("inf")

    def hold(self, store: Transactions, reservation_id: int, ttl: int) -> None:
        """Keep ``reservation_id`` alive until :meth:`drop` (a dictionary insert: no I/O, no lock).

        Inserting into and popping from a dict are atomic in CPython, so the calls in
        flight never contend on a lock; the thread reads a copy when it renews.
        """
        self._live[reservation_id] = (store, ttl)
        if self._thread is None or not self._thread.is_alive():
            with self._lock:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._run, name="ai-metering-leases", daemon=True)
                    self._thread.start()
        # Wake the thread only when it must renew sooner than it planned: steady
        # traffic must not keep interrupting (and so postponing) the renewals.
        if _interval(ttl) < self._interval:
            self._wake.set()

    def drop(self, reservation_id: int) -> None:
        self._live.pop(reservation_id, None)

    def live(self) -> list[int]:
        return list(self._live.copy())

    def _run(self) -> None:
        while True:
            # Idle, the thread keeps its last interval and just sleeps through it: waking
            # it for every new hold would cost a context switch on every call.
            self._wake.clear()
            self._interval = min((_interval(ttl) for _, ttl in self._live.copy().values()), default=self._interval)
            if self._wake.wait(None if math.isinf(self._interval) else self._interval):
                continue  # a hold with a shorter TTL arrived: plan again before sleeping
            self.renew()

    def renew(self) -> int:
        """Push the expiry of every live hold one TTL into the future; return how many were renewed."""
        groups: dict[int, tuple[Transactions, int, list[int]]] = {}
        for reservation_id, (store, ttl) in self._live.copy().items():
            entry = groups.setdefault(id(store), (store, ttl, []))
            entry[2].append(reservation_id)
        renewed = 0
        for store, ttl, ids in groups.values():
            params = {"ids": ids, "until": utcnow() + dt.timedelta(seconds=ttl)}
            try:
                renewed += store.run(functools.partial(_renew, params))
            except Exception:
                log.warning("could not renew %d reservation(s); they expire on their own", len(ids), exc_info=True)
        return renewed


#: The process's keeper.
keeper = LeaseKeeper()
