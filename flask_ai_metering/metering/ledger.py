"""The usage ledger's rows: built once per commit, written, read back and replayed.

Every path that writes a ``Usage`` row (a metered call, ``record``, the outbox)
builds its values with :func:`usage_values`, so the ledger has one shape.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import typing as t
from decimal import Decimal
from types import SimpleNamespace

import sqlalchemy as sa

from ..errors import IdempotencyConflict
from ..models import TOKEN_COLUMNS
from ..models import Reservation
from ..models import Usage as UsageRow
from ..models import table
from ..models import utcnow
from ..prepared import PreparedInsert
from .spec import Replay
from .usage import PricedUsage

if t.TYPE_CHECKING:
    from ..quota.policy import Billable
    from .spec import CallSpec
    from .spec import Hold
    from .usage import Costs
    from .usage import TokenCounts

usage_table = table(UsageRow)
reservations = table(Reservation)

_MONEY_FIELDS = ("input_cost", "output_cost", "total_cost")
#: The longest model name the ledger stores.
_MODEL_LENGTH: int = getattr(usage_table.c.model.type, "length", None) or 150
#: :func:`usage_values` gives every column.
_INSERT_USAGE = PreparedInsert(usage_table, [c.name for c in usage_table.c if c.name != "id"])


def usage_values(
    spec: CallSpec,
    tokens: TokenCounts,
    costs: Costs,
    model: str | None,
    at: dt.datetime,
    *,
    estimated: bool = False,
    hold: Hold | None = None,
    duration_ms: int | None = None,
    counter_id: int | None = None,
) -> dict[str, t.Any]:
    """The column values of one ledger row."""
    return {
        "billable_type": spec.billable[0],
        "billable_id": spec.billable[1],
        "user_id": spec.user_id,
        "tenant_id": spec.tenant_id,
        "provider": spec.provider,
        "model": model,
        "feature": spec.feature,
        **{name: getattr(tokens, name) for name in TOKEN_COLUMNS},
        "input_cost": costs.input_cost,
        "output_cost": costs.output_cost,
        "total_cost": costs.total_cost,
        "currency": costs.currency,
        "unpriced": costs.unpriced,
        "estimated": estimated,
        "price_source": costs.source,
        "billing_mode": hold.billing_mode if hold else (spec.billing_mode or "plan"),
        "idempotency_key": spec.idempotency_key,
        "idempotency_scope": spec.scope,
        "meta": spec.meta,
        "duration_ms": duration_ms,
        "counter_id": hold.counter_id if hold else counter_id,
        "reservation_id": hold.reservation_id if hold else None,
        "kind": "usage",
        "adjusts_id": None,
        "occurred_at": at,
    }


def normalised_model(model: str | None) -> str | None:
    """A provider-reported model name the ledger can store: no control characters, cut to the column."""
    if not model:
        return None
    cleaned = "".join(ch for ch in model if ch.isprintable()).strip()
    return cleaned[:_MODEL_LENGTH] or None


def insert_usage(conn: sa.Connection, values: dict[str, t.Any]) -> int:
    """Write one ledger row; return its id."""
    return _INSERT_USAGE.id(conn, {**values, "created_at": utcnow()})


def released_key(values: dict[str, t.Any]) -> dict[str, t.Any]:
    """Column values that record a row without its idempotency key, keeping the key in meta."""
    key = values.get("idempotency_key")
    if key is None:
        return {}
    return {"idempotency_key": None, "meta": {**(values.get("meta") or {}), "released_idempotency_key": key}}


def to_payload(values: dict[str, t.Any]) -> dict[str, t.Any]:
    """A ledger row as JSON (money as decimal strings, times as ISO 8601), for the outbox."""
    payload = dict(values)
    for name in _MONEY_FIELDS:
        payload[name] = str(payload[name])
    payload["occurred_at"] = values["occurred_at"].isoformat()
    return payload


def from_payload(payload: dict[str, t.Any]) -> dict[str, t.Any]:
    """The ledger row :func:`to_payload` wrote, with its money and times restored."""
    values = dict(payload)
    for name in _MONEY_FIELDS:
        values[name] = Decimal(values[name])
    values["occurred_at"] = dt.datetime.fromisoformat(values["occurred_at"])
    # Kept by a version without ledger adjustments: every such row is a call.
    values.setdefault("kind", "usage")
    values.setdefault("adjusts_id", None)
    values.setdefault("price_source", None)
    return values


def usage_from_row(row: t.Any) -> PricedUsage:
    """A ``PricedUsage`` from a ledger row (or anything with its column names as attributes)."""
    return PricedUsage(**{f.name: getattr(row, f.name) for f in dataclasses.fields(PricedUsage)})


def find_replay(conn: sa.Connection, billable: Billable, key: str, scope: str) -> Replay | None:
    """The usage already recorded under ``key`` for ``billable`` in tenant ``scope``, if any."""
    row = conn.execute(
        sa.select(usage_table).where(
            usage_table.c.billable_type == billable[0],
            usage_table.c.billable_id == billable[1],
            usage_table.c.idempotency_scope == scope,
            usage_table.c.idempotency_key == key,
        )
    ).first()
    return None if row is None else Replay(usage=usage_from_row(row), usage_id=int(row.id))


def replay_claim(conn: sa.Connection, billable: Billable, key: str, scope: str) -> Replay | None:
    """The reservation holding ``key``: raise if its call is in flight, replay its outbox row if queued.

    :raises IdempotencyConflict: the key's first call has not finished.
    """
    row = conn.execute(
        sa.select(reservations.c.status, reservations.c.payload).where(
            reservations.c.billable_type == billable[0],
            reservations.c.billable_id == billable[1],
            reservations.c.idempotency_scope == scope,
            reservations.c.idempotency_key == key,
        )
    ).first()
    if row is None:
        return None
    if row.status == "pending":
        raise IdempotencyConflict(f"idempotency key {key!r} is still in flight; retry when it finishes")
    if row.payload is not None:
        return Replay(usage=usage_from_row(SimpleNamespace(**from_payload(row.payload))), usage_id=None)
    return None


def replay_of(conn: sa.Connection, spec: CallSpec) -> Replay | None:
    """The earlier outcome of ``spec``'s idempotency key, if it has one (in the ledger or the outbox)."""
    key = spec.idempotency_key
    if key is None:
        return None
    return find_replay(conn, spec.billable, key, spec.scope) or replay_claim(conn, spec.billable, key, spec.scope)
