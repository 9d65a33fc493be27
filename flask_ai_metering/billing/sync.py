"""Exactly-once overage sync: the part every remote billing driver shares.

Each overage moves ``pending`` → ``syncing`` → ``synced`` by guarded UPDATEs:

1. **Claim**, in a transaction of its own per billable: the billable's
   subscription row is locked, then each unsynced overage whose claim lock
   (:mod:`.locks`) this run can take is moved to ``syncing`` with
   ``sync_attempts + 1``. The lock belongs to the run's database session, not to
   a clock: it is held until the overage is marked, and vanishes the moment the
   claiming process dies or loses its connection. So a ``syncing`` row whose lock
   is free was left by a dead sync and is taken over at once, and one whose lock
   is taken belongs to a live sync: it is reported with its age and left alone.
   Two concurrent syncs never hold the same row.
2. **Price in minor units**, once, at its first claim and under that lock: an
   overage bills ``floor(E + amount) - B`` minor units, where ``E`` is the exact
   sum of the billable's overages priced so far (per currency) and ``B`` the minor
   units they bill. Hence ``B == floor(E)`` always: the sub-cent remainder is
   carried to the next overage and never lost nor billed twice, in whatever order
   overages become visible. The amount is frozen: a retry sends the same request.
3. **Push**: a zero-minor overage (all carried) is marked synced without a remote
   call. Otherwise a retried claim first asks the driver whether the remote item
   already exists (a previous attempt may have died after the provider accepted
   it); only if not does it create one, with an idempotency key of our own.
4. **Mark synced**, guarded by ``status = 'syncing' AND sync_attempts = <ours>``,
   so a sync whose claim was taken over cannot overwrite the new owner. A
   failure puts the row back to ``pending`` (same guard), keeping its amount.

The remaining window: a sync whose lock connection drops while it is alive (a
database restart) between its claim and its create, while another sync takes the
row over, finds nothing and creates; the idempotency key then makes the provider
return the same item (within Stripe's 24 hours). A run checks its lock session
just before each create to keep that window small.

A run's report counts what it left unsynced (failed, held by another live sync,
or waiting for a billing customer); the CLI exits 1 while any is left.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import threading
import typing as t
from decimal import Decimal

import sqlalchemy as sa

from ..models import Overage
from ..models import Subscription
from ..models import table
from ..models import utcnow
from ..money import to_units
from .locks import ClaimLocks
from .overages import floor_minor

if t.TYPE_CHECKING:
    from ..config import Settings
    from ..quota.policy import Billable
    from ..transactions import Transactions

log = logging.getLogger("flask_ai_metering")

overages = table(Overage)
subs = table(Subscription)
_amount = sa.type_coerce(overages.c.amount, sa.BigInteger)


@dataclasses.dataclass(frozen=True)
class Claim:
    """One overage this sync owns, with the frozen request a driver sends for it."""

    overage_id: int
    #: ``sync_attempts`` after this claim; above 1 the remote item may already exist.
    attempt: int
    billable: Billable
    #: The billable's ``stripe_customer_id`` (None when it has none).
    customer: str | None
    tokens: int
    amount: Decimal
    currency: str
    #: What this overage puts on the invoice, in the currency's minor units.
    amount_minor: int
    period_start: dt.datetime
    period_end: dt.datetime | None

    @property
    def retried(self) -> bool:
        return self.attempt > 1

    @property
    def idempotency_key(self) -> str:
        """Derived from our ids; the customer is in it so two databases sharing a
        Stripe account cannot collide on the same overage id."""
        return f"ai-metering-overage-{self.customer}-{self.overage_id}"


@dataclasses.dataclass
class SyncReport:
    """What one sync run did; ``str()`` is the CLI's summary line."""

    #: Invoice items created, or found already created by an earlier attempt.
    synced: int = 0
    #: Overages under one minor unit: marked synced with 0, their amount carried.
    carried: int = 0
    failed: int = 0
    #: Overages of billables without a customer to bill; left pending.
    waiting: int = 0
    #: Overages another live sync holds: ``(overage id, seconds since its claim)``
    #: (None when its claim is too fresh to have been written yet); left to it.
    held: list[tuple[int, float | None]] = dataclasses.field(default_factory=list)
    #: Minor units sent per currency.
    sent_minor: dict[str, int] = dataclasses.field(default_factory=dict)
    errors: list[str] = dataclasses.field(default_factory=list)

    @property
    def unsynced(self) -> int:
        """Overages this run met and left unsynced (failed, held elsewhere, or without a customer)."""
        return self.failed + len(self.held) + self.waiting

    @property
    def ok(self) -> bool:
        """True when nothing this run met is left unsynced."""
        return self.unsynced == 0

    def __str__(self) -> str:
        sent = ", ".join(f"{minor} {cur} minor units" for cur, minor in sorted(self.sent_minor.items())) or "nothing"
        line = f"Synced {self.synced} overage(s) ({sent}); {self.carried} carried under one minor unit"
        line += f"; {self.failed} failed"
        if self.held:
            ages = ", ".join(
                f"overage {oid} claimed {'just now' if age is None else f'{age:.0f}s ago'}" for oid, age in self.held
            )
            line += f"; {len(self.held)} held by another live sync ({ages})"
        if self.waiting:
            line += f"; {self.waiting} wait for a billing customer (meter.subscribe(..., stripe_customer_id=...))"
        return line + "."


#: Not synced yet: ``pending``, or ``syncing`` (whether its sync is alive is the lock's to say).
_UNSYNCED = overages.c.status.in_(("pending", "syncing"))


def _of(billable: Billable) -> sa.ColumnElement[bool]:
    return sa.and_(overages.c.billable_type == billable[0], overages.c.billable_id == billable[1])


def candidates(conn: sa.Connection, ids: t.Sequence[int] | None) -> list[tuple[Billable, str | None, int]]:
    """Billables with unsynced overages, oldest first: ``(billable, customer, count)``.

    Overages of a billable without a subscription are not listed: the subscription
    row is the lock that serialises pricing, and says whom to bill.
    """
    stmt = (
        sa.select(overages.c.billable_type, overages.c.billable_id, subs.c.stripe_customer_id, sa.func.count())
        .join(
            subs,
            sa.and_(subs.c.billable_type == overages.c.billable_type, subs.c.billable_id == overages.c.billable_id),
        )
        .where(_UNSYNCED)
        .group_by(overages.c.billable_type, overages.c.billable_id, subs.c.stripe_customer_id)
        .order_by(sa.func.min(overages.c.id))
    )
    if ids is not None:
        stmt = stmt.where(overages.c.id.in_(list(ids)))
    return [((r[0], r[1]), r[2], int(r[3])) for r in conn.execute(stmt)]


def claim(
    store: Transactions,
    billable: Billable,
    *,
    limit: int,
    now: dt.datetime,
    locks: ClaimLocks,
    ids: t.Sequence[int] | None = None,
) -> tuple[list[Claim], list[tuple[int, float | None]]]:
    """Claim up to ``limit`` of the billable's overages and price them in minor units.

    Returns the claims (their locks held in ``locks`` until marked) and the
    overages another live sync holds, with the seconds since their claim.
    """
    held: list[tuple[int, float | None]] = []

    def work(conn: sa.Connection) -> list[Claim]:
        held.clear()
        sub = conn.execute(
            sa.select(subs.c.stripe_customer_id)
            .where(subs.c.billable_type == billable[0], subs.c.billable_id == billable[1])
            .with_for_update()
        ).first()
        if sub is None:
            return []
        stmt = sa.select(overages).where(_of(billable), _UNSYNCED).order_by(overages.c.id)
        if ids is not None:
            stmt = stmt.where(overages.c.id.in_(list(ids)))
        rows = conn.execute(stmt).all()
        exact, billed = _priced_totals(conn, billable)
        claims: list[Claim] = []
        for row in rows:
            if len(claims) >= limit:
                break
            if not locks.try_acquire(int(row.id)):
                started = row.sync_started_at if row.status == "syncing" else None
                held.append((int(row.id), None if started is None else max((now - started).total_seconds(), 0.0)))
                continue
            minor = row.synced_amount_minor
            customer = row.stripe_customer_id or sub.stripe_customer_id
            units = to_units(row.amount)
            if minor is None:
                total = exact.get(row.currency, 0) + units
                minor = floor_minor(total, row.currency) - billed.get(row.currency, 0)
            claimed = conn.execute(
                sa.update(overages)
                .where(overages.c.id == row.id, _UNSYNCED)
                .values(
                    status="syncing",
                    sync_started_at=now,
                    sync_attempts=overages.c.sync_attempts + 1,
                    synced_amount_minor=minor,
                    stripe_customer_id=customer,
                )
            ).rowcount
            if claimed != 1:  # marked synced since we read it
                locks.release(int(row.id))
                continue
            if row.synced_amount_minor is None:
                exact[row.currency] = exact.get(row.currency, 0) + units
                billed[row.currency] = billed.get(row.currency, 0) + minor
            claims.append(
                Claim(
                    overage_id=int(row.id),
                    attempt=int(row.sync_attempts) + 1,
                    billable=billable,
                    customer=customer,
                    tokens=int(row.tokens),
                    amount=row.amount,
                    currency=row.currency,
                    amount_minor=int(minor),
                    period_start=row.period_start,
                    period_end=row.period_end,
                )
            )
        return claims

    before = set(locks.held)
    claims = store.run(work)
    # A retried transaction may have locked rows that its last attempt did not claim.
    for overage_id in set(locks.held) - before - {c.overage_id for c in claims}:
        locks.release(overage_id)
    return claims, list(held)


def _priced_totals(conn: sa.Connection, billable: Billable) -> tuple[dict[str, int], dict[str, int]]:
    """Per currency: exact pico-units and billed minor units of the overages priced so far."""
    rows = conn.execute(
        sa.select(overages.c.currency, sa.func.sum(_amount), sa.func.sum(overages.c.synced_amount_minor))
        .where(_of(billable), overages.c.synced_amount_minor.is_not(None))
        .group_by(overages.c.currency)
    )
    exact, billed = {}, {}
    for currency, units, minor in rows:
        exact[currency] = int(units)
        billed[currency] = int(minor)
    return exact, billed


def _ours(claim: Claim) -> sa.ColumnElement[bool]:
    return sa.and_(
        overages.c.id == claim.overage_id,
        overages.c.status == "syncing",
        overages.c.sync_attempts == claim.attempt,
    )


def still_claimed(store: Transactions, claim: Claim) -> bool:
    """True while no other sync has taken the claim over."""
    with store.engine.connect() as conn:
        return conn.execute(sa.select(overages.c.id).where(_ours(claim))).first() is not None


def mark_synced(store: Transactions, claim: Claim, remote_id: str | None, now: dt.datetime) -> bool:
    """Record the remote item; False when the claim was taken over (nothing written)."""
    values = {"status": "synced", "synced_at": now, "stripe_id": remote_id, "last_error": None}
    return store.run(lambda conn: conn.execute(sa.update(overages).where(_ours(claim)).values(**values)).rowcount == 1)


def mark_failed(store: Transactions, claim: Claim, error: BaseException) -> None:
    """Give the claim back (``pending``) with the error; its frozen amount stays."""
    message = f"{type(error).__name__}: {error}"[:2000]
    store.run(
        lambda conn: conn.execute(sa.update(overages).where(_ours(claim)).values(status="pending", last_error=message))
    )


class OverageSyncer:
    """Base of drivers that push overage to a remote biller exactly once.

    A subclass implements :meth:`find_remote` and :meth:`create_remote`; the claim,
    pricing, carry and bookkeeping above are done here. Set ``requires_customer``
    to False for a biller that needs no ``stripe_customer_id``.
    """

    name = "remote"
    requires_customer = True

    def __init__(self, store: Transactions, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()

    def find_remote(self, claim: Claim) -> str | None:
        """The id of the remote item an earlier attempt created for ``claim``, if any."""
        raise NotImplementedError

    def create_remote(self, claim: Claim) -> str:
        """Create the remote item for ``claim`` (with ``claim.idempotency_key``); its id."""
        raise NotImplementedError

    def sync_overages(
        self,
        *,
        limit: int | None = None,
        progress: t.Any = None,
        ids: t.Sequence[int] | None = None,
        now: dt.datetime | None = None,
    ) -> SyncReport:
        """Push unsynced overages (all, or ``ids``), at most ``limit``, each exactly once.

        Overages left by a dead sync are taken over at once; those another live
        sync holds are listed in :attr:`SyncReport.held` and left to it.
        """
        at = now or utcnow()
        report = SyncReport()
        with self.store.engine.connect() as conn:
            found = candidates(conn, ids)
        ready = []
        for billable, customer, count in found:
            if self.requires_customer and not customer:
                report.waiting += count
            else:
                ready.append((billable, count))
        remaining = sum(count for _, count in ready) if limit is None else min(limit, sum(c for _, c in ready))
        if progress is not None:
            progress.start(remaining)
        with ClaimLocks(self.store) as locks:
            for billable, _ in ready:
                if remaining <= 0:
                    break
                claims, held = claim(self.store, billable, limit=remaining, now=at, locks=locks, ids=ids)
                report.held += held
                for item in claims:
                    remaining -= 1
                    try:
                        self._push(item, report, at, locks)
                    finally:
                        locks.release(item.overage_id)
                    if progress is not None:
                        progress.update(1)
        for overage_id, age in report.held:
            log.warning(
                "overage %s is held by another live sync (claimed %s); left to it",
                overage_id,
                "just now" if age is None else f"{age:.0f}s ago",
            )
        return report

    def _push(self, claim: Claim, report: SyncReport, now: dt.datetime, locks: ClaimLocks) -> None:
        try:
            remote_id = None
            if claim.amount_minor != 0:  # negative: a refund's credit
                if not locks.alive():
                    raise ConnectionError("lost the database session that holds this sync's claims")
                if not still_claimed(self.store, claim):
                    return
                remote_id = self.find_remote(claim) if claim.retried else None
                if remote_id is None:
                    remote_id = self.create_remote(claim)
            if not mark_synced(self.store, claim, remote_id, now):
                log.error(
                    "overage %s was taken over by another sync after this one sent %s; check for a duplicate",
                    claim.overage_id,
                    remote_id,
                )
                return
        except Exception as error:
            report.failed += 1
            report.errors.append(f"overage {claim.overage_id}: {type(error).__name__}: {error}")
            log.warning("could not sync overage %s; left for the next sync", claim.overage_id, exc_info=True)
            try:
                mark_failed(self.store, claim, error)
            except Exception:
                log.exception("could not give back overage %s; the next sync takes it over", claim.overage_id)
            return
        if claim.amount_minor == 0:
            report.carried += 1
        else:
            report.synced += 1
            report.sent_minor[claim.currency] = report.sent_minor.get(claim.currency, 0) + claim.amount_minor

    def sync_after_commit(self, overage_ids: t.Sequence[int]) -> None:
        """Sync these overages in a daemon thread, off the request's critical path.

        Failures stay ``pending`` for ``flask ai-metering sync-stripe-overages``;
        a process that exits mid-sync leaves a ``syncing`` row whose claim died
        with it, which the next sync takes over at once.
        """
        ids = list(overage_ids)

        def run() -> None:
            try:
                self.sync_overages(ids=ids)
            except Exception:
                log.exception("immediate sync of overages %s failed; the batch command retries them", ids)
            finally:
                with self._lock:
                    self._threads.discard(threading.current_thread())

        thread = threading.Thread(target=run, name="ai-metering-overage-sync", daemon=True)
        with self._lock:
            self._threads.add(thread)
        thread.start()

    def wait(self, timeout: float | None = None) -> None:
        """Join the immediate-sync threads still running (for graceful shutdown and tests)."""
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout)
