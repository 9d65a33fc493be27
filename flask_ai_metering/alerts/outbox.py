"""The alert outbox: an alert is written in the transaction that crossed its threshold.

Writing the alert in the same transaction as the counter update means the alert
exists exactly when the crossing does: a rollback takes both, and a process that
dies after the commit leaves the row for any deliverer to send. Delivery happens
afterwards, outside any transaction (:mod:`.delivery`).
"""

from __future__ import annotations

import datetime as dt
import json
import typing as t

from ..errors import InvalidUsage
from ..models import AlertEvent
from ..models import table
from ..transactions import Transactions

if t.TYPE_CHECKING:
    import sqlalchemy as sa

    from ..config import Settings

events = table(AlertEvent)


def alert_body(event_id: str, kind: str, created: dt.datetime, data: t.Mapping[str, t.Any]) -> dict[str, t.Any]:
    """The JSON object a webhook receives: ``{"id", "type", "created", "data"}``."""
    return {"id": event_id, "type": kind, "created": created.isoformat(), "data": dict(data)}


def _check(event_id: str, kind: str, billable: tuple[str, str], now: dt.datetime) -> None:
    # MySQL's INSERT IGNORE would truncate an oversized value instead of refusing it.
    for field, value, column in (
        ("event_id", event_id, "event_id"),
        ("kind", kind, "kind"),
        ("billable type", billable[0], "billable_type"),
        ("billable id", billable[1], "billable_id"),
    ):
        size: int = getattr(events.c[column].type, "length", None) or 255
        if not isinstance(value, str) or not value or len(value) > size:
            raise InvalidUsage(f"alert {field} must be a non-empty str of at most {size} characters, got {value!r}")
    if now.tzinfo is None:
        raise InvalidUsage(f"alert time must be timezone-aware, got {now!r}")


def write_alert(
    conn: sa.Connection,
    settings: Settings,
    *,
    event_id: str,
    kind: str,
    billable: tuple[str, str],
    data: t.Mapping[str, t.Any],
    now: dt.datetime,
) -> bool:
    """Put one alert in the outbox, in the caller's transaction (never commits); True when written.

    Writes nothing and returns False when no ``AI_METERING_ALERT_WEBHOOK_URL`` is set:
    without a receiver, alerts are only signals. An ``event_id`` already in the
    outbox is the same alert written before (a retried transaction, a second
    process that saw the same crossing), so it is left as it is and False is
    returned, without raising and without spoiling the caller's transaction.

    Call :func:`flask_ai_metering.alerts.worker.wake` after the transaction commits
    when this returned True, so the background thread sends it at once.

    :param conn: the connection of the caller's open transaction.
    :param settings: the app's settings (the runtime's ``settings``).
    :param event_id: the alert's stable id, sent as the body's ``id``: receivers dedup on it.
    :param kind: the event type, e.g. ``"threshold_crossed"``.
    :param billable: ``(type, id)`` the alert is about.
    :param data: the body's ``data``: JSON-serialisable (Decimals given as strings).
    :param now: the crossing's time (timezone-aware): the body's ``created``, and when it is due.
    :raises InvalidUsage: for an empty or oversized id, kind or billable, a naive ``now``,
        or ``data`` that is not JSON.
    """
    if not settings.alert_webhook_url:
        return False
    _check(event_id, kind, billable, now)
    body = alert_body(event_id, kind, now, data)
    try:
        json.dumps(body, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidUsage(f"alert data must be JSON-serialisable: {exc}") from None
    values = {
        "event_id": event_id,
        "kind": kind,
        "billable_type": billable[0],
        "billable_id": billable[1],
        "payload": body,
        "attempts": 0,
        "next_attempt_at": now,
        "created_at": now,
    }
    return Transactions(conn.engine).insert_ignore(conn, events, values) == 1
