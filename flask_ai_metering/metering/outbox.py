"""The outbox: a committed call's ledger row, kept in its reservation until it is written.

With ``AI_METERING_QUEUE_RECORDING`` the commit stores the row in the
reservation's ``payload`` in the same transaction, and :func:`write_outbox`
(run by the Celery task or by :func:`flask_ai_metering.queueing.flush_outbox`)
moves it to the ledger, idempotently.
"""

from __future__ import annotations

import functools
import typing as t

import sqlalchemy as sa

from ..models import utcnow
from .ledger import from_payload
from .ledger import released_key
from .ledger import reservations
from .ledger import usage_table

if t.TYPE_CHECKING:
    from ..transactions import Transactions


def write_outbox(store: Transactions, reservation_id: int) -> int | None:
    """Write a committed reservation's queued usage row; idempotent, safe to run twice.

    Returns the usage id, or None when there was nothing left to write.
    """
    return store.run(functools.partial(_write, store, reservation_id))


def _write(store: Transactions, reservation_id: int, conn: sa.Connection) -> int | None:
    row = conn.execute(
        sa.select(reservations.c.payload).where(reservations.c.id == reservation_id).with_for_update()
    ).first()
    if row is None or row.payload is None:
        return None
    values = {**from_payload(row.payload), "created_at": utcnow()}
    if not store.insert_ignore(conn, usage_table, values) and not _written(conn, reservation_id):
        # Not a duplicate of this reservation's row: its key was taken meanwhile (the
        # sweeper freed it and a retry claimed it). Record the usage without the key.
        store.insert_ignore(conn, usage_table, {**values, **released_key(values)})
    conn.execute(sa.update(reservations).where(reservations.c.id == reservation_id).values(payload=None))
    return int(
        conn.execute(sa.select(usage_table.c.id).where(usage_table.c.reservation_id == reservation_id)).scalar_one()
    )


def _written(conn: sa.Connection, reservation_id: int) -> bool:
    query = sa.select(usage_table.c.id).where(usage_table.c.reservation_id == reservation_id)
    return conn.execute(query).first() is not None
