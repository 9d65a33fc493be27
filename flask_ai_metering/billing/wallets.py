"""Prepaid credit wallets: a balance that always equals the sum of its ledger.

Every change is a :class:`~flask_ai_metering.models.CreditTransaction` row written
in the same transaction as the balance update. A ``credits`` call holds its
worst-case cost at reserve time (``held``), so parallel calls cannot spend the
same credit; the actual cost is deducted at commit and the rest of the hold
returned. Without ``AI_METERING_CREDIT_OVERDRAFT`` the balance never goes below
zero: each debit is one conditional UPDATE, or a deduction under a row lock.
"""

from __future__ import annotations

import datetime as dt
import logging
import typing as t
from decimal import Decimal

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from .. import signals
from ..errors import CreditsInsufficient
from ..errors import InvalidUsage
from ..models import CreditTransaction
from ..models import CreditWallet
from ..models import table
from ..models import utcnow
from ..money import from_units
from ..money import parse_money
from ..money import to_units
from ..quota.policy import Billable
from ..transactions import is_duplicate
from ..validation import idempotency_key as check_key
from ..validation import meta as check_meta

if t.TYPE_CHECKING:
    from ..transactions import Transactions

log = logging.getLogger("flask_ai_metering")

wallets = table(CreditWallet)
transactions = table(CreditTransaction)
_balance = sa.type_coerce(wallets.c.balance, sa.BigInteger)
_held = sa.type_coerce(wallets.c.held, sa.BigInteger)


def _where_billable(billable: Billable) -> sa.ColumnElement[bool]:
    return sa.and_(wallets.c.billable_type == billable[0], wallets.c.billable_id == billable[1])


def ensure_wallet(store: Transactions, conn: sa.Connection, billable: Billable, currency: str) -> int:
    """The billable's wallet id, creating an empty wallet if it has none."""
    wallet_id = conn.execute(sa.select(wallets.c.id).where(_where_billable(billable))).scalar()
    if wallet_id is None:
        now = utcnow()
        store.insert_ignore(
            conn,
            wallets,
            {
                "billable_type": billable[0],
                "billable_id": billable[1],
                "balance": 0,
                "held": 0,
                "currency": currency,
                "created_at": now,
                "updated_at": now,
            },
        )
        wallet_id = conn.execute(sa.select(wallets.c.id).where(_where_billable(billable))).scalar_one()
    return int(wallet_id)


def beyond_allowance(
    token_limit: int | None,
    cost_limit_units: int | None,
    tokens_after: int,
    cost_after: int,
    tokens: int,
    cost_units: int,
) -> int:
    """The part of a call's cost the wallet pays when its plan's limits are an allowance.

    In credits mode a plan's token and cost limits are included usage: what fits in them is
    not charged to the wallet, only what falls past them. ``tokens_after``/``cost_after`` are the
    counter's amounts with the call's ``tokens``/``cost_units`` already added (read from the
    locked row, so concurrent calls split the allowance exactly, as overage does). Past the
    token allowance the cost is charged in proportion to the tokens beyond it (rounded up);
    with both limits, the larger part. A plan with neither limit includes nothing: the whole
    cost is charged.
    """
    if token_limit is None and cost_limit_units is None:
        return cost_units
    charge = 0
    if token_limit is not None:
        over = max(0, tokens_after - token_limit) - max(0, tokens_after - tokens - token_limit)
        if over:
            charge = cost_units if over >= tokens else -(-cost_units * over // tokens)
    if cost_limit_units is not None:
        over_cost = max(0, cost_after - cost_limit_units) - max(0, cost_after - cost_units - cost_limit_units)
        charge = max(charge, over_cost)
    return min(charge, cost_units)


def mark_low(conn: sa.Connection, wallet_id: int, threshold_units: int | None) -> tuple[int, int] | None:
    """Mark the wallet low if its available balance is under the threshold and it is not marked yet.

    One guarded UPDATE: of concurrent spenders, only the one whose UPDATE marks the row gets
    ``(balance, available)`` back, and sends ``credits_low``; the others get None.
    """
    if threshold_units is None:
        return None
    marked = conn.execute(
        sa.update(wallets)
        .where(wallets.c.id == wallet_id, wallets.c.low_notified.is_(False), _balance - _held < threshold_units)
        .values(low_notified=True)
    ).rowcount
    if marked != 1:
        return None
    row = conn.execute(sa.select(_balance, _held).where(wallets.c.id == wallet_id)).one()
    return int(row[0]), int(row[0]) - int(row[1])


def rearm_low(conn: sa.Connection, wallet_id: int, threshold_units: int | None) -> None:
    """Clear the low mark once the available balance is back at or above the threshold."""
    if threshold_units is None:
        return
    conn.execute(
        sa.update(wallets)
        .where(wallets.c.id == wallet_id, wallets.c.low_notified.is_(True), _balance - _held >= threshold_units)
        .values(low_notified=False)
    )


def announce_low(sender: t.Any, billable: Billable, wallet_id: int, low: tuple[int, int], threshold: Decimal) -> None:
    """Send ``credits_low`` for a wallet :func:`mark_low` just marked."""
    signals.credits_low.send(
        sender,
        billable=billable,
        wallet_id=wallet_id,
        balance=from_units(low[0]),
        available=from_units(low[1]),
        threshold=threshold,
    )


def wallet_id_of(conn: sa.Connection, billable: Billable) -> int | None:
    """The billable's wallet id, if it has a wallet."""
    found = conn.execute(sa.select(wallets.c.id).where(_where_billable(billable))).scalar()
    return None if found is None else int(found)


def hold(conn: sa.Connection, billable: Billable, units: int, *, overdraft: bool) -> int | None:
    """Hold ``units`` of the wallet's available balance; the wallet id, or None if it cannot pay.

    With a zero hold (a model whose price is unknown before the call) the wallet
    must still have something available.
    """
    conditions = [_where_billable(billable)]
    if not overdraft:
        conditions.append(_balance - _held - units >= 0)
        conditions.append(_balance - _held > 0)
    stmt = sa.update(wallets).where(*conditions).values(held=_held + units)
    if conn.execute(stmt).rowcount != 1:
        return None
    return int(conn.execute(sa.select(wallets.c.id).where(_where_billable(billable))).scalar_one())


def release(conn: sa.Connection, wallet_id: int, units: int) -> None:
    conn.execute(sa.update(wallets).where(wallets.c.id == wallet_id).values(held=_held - units))


def settle(
    conn: sa.Connection,
    wallet_id: int,
    *,
    hold_units: int,
    cost_units: int,
    usage_id: int | None,
    overdraft: bool,
    now: dt.datetime,
) -> tuple[int, int]:
    """Return the hold and deduct the actual cost; ``(deducted units, balance units)``.

    The cost can exceed the hold only when the provider spent beyond
    ``max_tokens`` (or the model's price was unknown before the call). Without
    overdraft the deduction is then capped at what the wallet has, under a row
    lock, and the uncollected rest is logged and kept in the transaction's meta.
    """
    row = conn.execute(sa.select(_balance, _held).where(wallets.c.id == wallet_id).with_for_update()).one()
    available = int(row[0]) - (int(row[1]) - hold_units)
    charge = cost_units if overdraft else max(0, min(cost_units, available))
    meta = None
    if charge < cost_units:
        meta = {"uncollected": str(from_units(cost_units - charge))}
        log.warning("wallet %s could not pay %s of usage %s", wallet_id, meta["uncollected"], usage_id)
    conn.execute(
        sa.update(wallets)
        .where(wallets.c.id == wallet_id)
        .values(balance=_balance - charge, held=_held - hold_units, updated_at=now)
    )
    if charge or meta:
        conn.execute(
            sa.insert(transactions).values(
                wallet_id=wallet_id,
                amount=from_units(-charge),
                reason="usage",
                meta=meta,
                usage_id=usage_id,
                created_at=now,
            )
        )
    return charge, int(row[0]) - charge


_TXN_FIELDS = ("id", "wallet_id", "amount", "reason", "meta", "idempotency_key", "created_at")


def _find(conn: sa.Connection, wallet_id: int, key: str) -> dict[str, t.Any] | None:
    """The wallet's transaction recorded under ``key``, if any."""
    row = conn.execute(
        sa.select(transactions).where(transactions.c.wallet_id == wallet_id, transactions.c.idempotency_key == key)
    ).first()
    return None if row is None else dict(row._mapping)


def _positive_units(amount: t.Any) -> int:
    value = parse_money(amount, "amount")
    if value <= 0:
        raise InvalidUsage(f"amount must be positive, got {amount!r}")
    return to_units(value)


class Wallet:
    """A billable's credit wallet, as ``meter.wallet(billable)`` returns it.

    Each method runs its own short transaction; none touches ``db.session``.
    """

    def __init__(
        self,
        store: Transactions,
        billable: Billable,
        *,
        currency: str,
        overdraft: bool,
        sender: t.Any,
        max_meta_bytes: int = 8192,
        low_threshold: Decimal | None = None,
    ) -> None:
        self._store = store
        self.low_threshold = low_threshold
        self.billable = billable
        self.currency = currency
        self.overdraft = overdraft
        self._sender = sender
        self.max_meta_bytes = max_meta_bytes

    @property
    def balance(self) -> Decimal:
        """The whole balance, credits held by calls in flight included."""
        return self._read()[0]

    @property
    def available(self) -> Decimal:
        """What new calls can spend: the balance less what calls in flight hold."""
        balance, held = self._read()
        return balance - held

    def _read(self) -> tuple[Decimal, Decimal]:
        with self._store.reading() as conn:
            row = conn.execute(sa.select(_balance, _held).where(_where_billable(self.billable))).first()
        if row is None:
            return from_units(0), from_units(0)
        return from_units(int(row[0])), from_units(int(row[1]))

    def has_sufficient_balance(self, amount: Decimal | str | int) -> bool:
        return self.available >= parse_money(amount, "amount")

    def add_credits(
        self,
        amount: Decimal | str | int,
        reason: str = "top-up",
        meta: dict[str, t.Any] | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> CreditTransaction:
        """Add ``amount`` (> 0); a replayed ``idempotency_key`` returns the first transaction."""
        return self._apply(_positive_units(amount), reason, meta, idempotency_key)

    def deduct_credits(
        self,
        amount: Decimal | str | int,
        reason: str = "deduction",
        meta: dict[str, t.Any] | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> CreditTransaction:
        """Take ``amount`` (> 0) off the available balance, or raise :class:`CreditsInsufficient`."""
        return self._apply(-_positive_units(amount), reason, meta, idempotency_key)

    def _apply(self, units: int, reason: str, meta: dict[str, t.Any] | None, key: str | None) -> CreditTransaction:
        key = check_key(key)
        meta = check_meta(meta, max_bytes=self.max_meta_bytes, sanitize=False)
        if not isinstance(reason, str) or len(reason) > 255:
            raise InvalidUsage("reason must be a str of at most 255 characters")

        threshold = None if self.low_threshold is None else to_units(self.low_threshold)
        low: list[t.Any] = []

        def work(conn: sa.Connection) -> tuple[dict[str, t.Any], int | None]:
            low.clear()
            wallet_id = ensure_wallet(self._store, conn, self.billable, self.currency)
            if key is not None:
                existing = _find(conn, wallet_id, key)
                if existing is not None:
                    return existing, None
            conditions = [wallets.c.id == wallet_id]
            if units < 0 and not self.overdraft:
                conditions.append(_balance - _held + units >= 0)
            now = utcnow()
            stmt = sa.update(wallets).where(*conditions).values(balance=_balance + units, updated_at=now)
            if conn.execute(stmt).rowcount != 1:
                raise CreditsInsufficient(
                    f"The credit wallet cannot pay {from_units(-units).normalize()} {self.currency}."
                )
            values = {
                "wallet_id": wallet_id,
                "amount": from_units(units),
                "reason": reason,
                "meta": meta,
                "idempotency_key": key,
                "created_at": now,
            }
            txn_id = conn.execute(sa.insert(transactions).values(**values)).inserted_primary_key[0]  # type: ignore[index]
            if units < 0:
                crossed = mark_low(conn, wallet_id, threshold)
                if crossed is not None:
                    low.extend((wallet_id, crossed))
            else:
                rearm_low(conn, wallet_id, threshold)
            balance = conn.execute(sa.select(_balance).where(wallets.c.id == wallet_id)).scalar_one()
            return {**values, "id": txn_id}, int(balance)

        try:
            row, balance_units = self._store.run(work)
        except sa_exc.IntegrityError as error:
            # A concurrent call with the same key committed first: replay its row.
            if key is None or not is_duplicate(error):
                raise
            row, balance_units = self._store.run(work)
        if balance_units is None and to_units(row["amount"]) != units:
            raise InvalidUsage(
                f"idempotency_key {key!r} was used for a transaction of {row['amount'].normalize()},"
                f" not {from_units(units).normalize()}"
            )
        txn = CreditTransaction(**{k: row[k] for k in _TXN_FIELDS})
        if balance_units is not None:
            self._signal(units, balance_units, txn, reason)
        if low and self.low_threshold is not None:
            announce_low(self._sender, self.billable, low[0], low[1], self.low_threshold)
        return txn

    def _signal(self, units: int, balance_units: int, txn: CreditTransaction, reason: str) -> None:
        signal = signals.credits_added if units > 0 else signals.credits_deducted
        signal.send(
            self._sender,
            billable=self.billable,
            amount=from_units(abs(units)),
            balance=from_units(balance_units),
            transaction_id=txn.id,
            reason=reason,
        )

    def transactions(self, limit: int = 100) -> list[dict[str, t.Any]]:
        """The newest ledger rows, newest first."""
        with self._store.engine.connect() as conn:
            rows = conn.execute(
                sa.select(transactions)
                .join(wallets, wallets.c.id == transactions.c.wallet_id)
                .where(_where_billable(self.billable))
                .order_by(transactions.c.id.desc())
                .limit(limit)
            )
            return [dict(r._mapping) for r in rows]
