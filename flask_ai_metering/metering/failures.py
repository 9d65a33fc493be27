"""Provider calls that raised, in their own table: who, what, which error, how long.

A failure row never holds the error's message or the prompt: only the
exception's class name and the HTTP status the provider answered with. The table
is separate from the usage ledger, so money totals never mix with failures, and
it is written in its own short transaction that can never fail the caller: if it
cannot be written, the error is logged and the caller still gets the provider's
exception.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
import typing as t

import sqlalchemy as sa

from ..models import Failure
from ..models import table
from ..models import utcnow

if t.TYPE_CHECKING:
    from ..runtime import Runtime
    from .spec import CallSpec

log = logging.getLogger("flask_ai_metering")

failures = table(Failure)

#: The longest error type stored (the column's width).
_ERROR_TYPE_MAX = 100


@dataclasses.dataclass(frozen=True)
class FailedCall:
    """What is known of a provider call that raised, without its message."""

    error_type: str
    http_status: int | None
    #: Seconds from the provider call's start to the error.
    duration: float
    #: The ``perf_counter`` reading when the error reached metering.
    ended: float


def error_type(error: BaseException) -> str:
    """The exception's class name (``RateLimitError``), never its message."""
    return type(error).__name__[:_ERROR_TYPE_MAX]


def http_status(error: BaseException) -> int | None:
    """The HTTP status an SDK error carries (``status_code``, ``response.status_code`` or ``status``)."""
    for path in (("status_code",), ("response", "status_code"), ("status",)):
        value: t.Any = error
        try:
            for name in path:
                value = getattr(value, name, None)
        except Exception:  # an SDK property that raises when unset
            continue
        if isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 599:
            return value
    return None


def describe(error: BaseException, started: float) -> FailedCall:
    """The :class:`FailedCall` of ``error``, raised ``started`` (a ``perf_counter``) into the call."""
    ended = time.perf_counter()
    return FailedCall(error_type(error), http_status(error), max(0.0, ended - started), ended)


def record_failure(rt: Runtime, spec: CallSpec, failed: FailedCall) -> None:
    """Write one failure row in its own transaction; log (never raise) if it cannot be written."""
    values = {
        "billable_type": spec.billable[0],
        "billable_id": spec.billable[1],
        "user_id": spec.user_id,
        "tenant_id": spec.tenant_id,
        "provider": spec.provider,
        "model": spec.model,
        "feature": spec.feature,
        "error_type": failed.error_type,
        "http_status": failed.http_status,
        "duration_ms": round(failed.duration * 1000),
        "occurred_at": utcnow(),
    }
    try:
        rt.store.run(functools.partial(_insert, values))
    except Exception:
        log.exception("could not record the failed %s call in the failures table", spec.provider)


def _insert(values: dict[str, t.Any], conn: sa.Connection) -> None:
    conn.execute(sa.insert(failures).values(values))
