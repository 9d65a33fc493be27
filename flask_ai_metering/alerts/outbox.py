"""Placeholder until the delivery branch lands: alerts are only signals."""

from __future__ import annotations

import datetime as dt
import typing as t

import sqlalchemy as sa

if t.TYPE_CHECKING:
    from ..config import Settings


def write_alert(
    conn: sa.Connection,
    settings: Settings,
    *,
    event_id: str,
    kind: str,
    billable: tuple[str, str],
    data: dict[str, t.Any],
    now: dt.datetime,
) -> bool:
    return False
