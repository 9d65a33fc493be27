"""Deliver the alert outbox to ``AI_METERING_ALERT_WEBHOOK_URL``, each row by one deliverer at a time.

Each alert row moves through guarded UPDATEs, every one its own short statement,
so no database transaction is open while a receiver is being called:

1. **Claim**: ``attempts + 1`` and ``claimed_until = now + lease``, only if the row
   is undelivered, due, below its attempts, unclaimed (or its claim ran out) and
   still at the attempt count this deliverer read. One UPDATE wins; the others see
   zero rows and move on. So two deliverers (threads, processes, the CLI) never
   POST the same row at once, and a deliverer that died holding a claim loses it
   when the lease runs out. The attempt count doubles as the claim's token.
2. **POST** the signed JSON body with the stdlib (no redirects followed).
3. **Mark**, guarded by ``attempts = <our claim>``: ``delivered_at`` on a 2xx; else
   ``last_error`` (the HTTP status or the exception's class, never a response
   body) and ``next_attempt_at`` after an exponential backoff.

A deliverer that dies between POST and mark leaves a row the next claim sends
again, with the same event id: delivery is at least once, and exactly once for a
receiver that dedups on the id. A row that used up ``AI_METERING_ALERT_MAX_ATTEMPTS``
is left failed until ``deliver-alerts --retry-failed`` resets it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import random
import time
import typing as t
import urllib.error
import urllib.request

import sqlalchemy as sa

from ..models import UTCDateTime
from ..models import utcnow
from .outbox import events
from .signing import EVENT_ID_HEADER
from .signing import SIGNATURE_HEADER
from .signing import sign

if t.TYPE_CHECKING:
    from ..config import Settings
    from ..runtime import Runtime

log = logging.getLogger("flask_ai_metering")

#: The longest wait between two attempts of one alert.
MAX_BACKOFF = dt.timedelta(hours=1)
#: Seconds a claim outlives the receiver's timeout: room for connecting and marking.
LEASE_MARGIN = 30


@dataclasses.dataclass(frozen=True)
class DeliveryReport:
    """What one :func:`deliver_due` pass did, and what it left."""

    #: Alerts this pass delivered (a 2xx from the receiver).
    delivered: int = 0
    #: Attempts of this pass that failed (each alert is retried later, or left failed).
    failed: int = 0
    #: Undelivered alerts after this pass: waiting for a retry, held by another deliverer, or failed.
    remaining: int = 0
    #: Of ``remaining``, alerts that used up their attempts (``--retry-failed`` sends them again).
    exhausted: int = 0

    @property
    def ok(self) -> bool:
        """False while any alert stays undelivered after all its attempts."""
        return self.exhausted == 0

    def __str__(self) -> str:
        text = f"Delivered {self.delivered} alert(s); {self.failed} attempt(s) failed; {self.remaining} remaining"
        return text + (f", {self.exhausted} out of attempts." if self.exhausted else ".")


@dataclasses.dataclass(frozen=True)
class _Claim:
    id: int
    event_id: str
    payload: dict[str, t.Any]
    #: ``attempts`` after this claim: the mark's guard.
    attempt: int


def backoff(attempt: int) -> dt.timedelta:
    """The wait after failed attempt number ``attempt`` (1-based): 2**attempt s, at most an hour, +0–25%.

    The jitter spreads the retries of many alerts that failed together (a receiver
    that was down), so they do not all return at the same second.
    """
    seconds = min(2.0 ** min(attempt, 32), MAX_BACKOFF.total_seconds())
    return dt.timedelta(seconds=seconds * random.uniform(1.0, 1.25))


def lease(settings: Settings) -> dt.timedelta:
    """How long a claim holds a row: longer than one POST can take, so a live deliverer keeps it."""
    return dt.timedelta(seconds=2 * settings.alert_webhook_timeout + LEASE_MARGIN)


def _due(settings: Settings, at: dt.datetime) -> sa.ColumnElement[bool]:
    return sa.and_(
        events.c.delivered_at.is_(None),
        events.c.attempts < settings.alert_max_attempts,
        events.c.next_attempt_at <= at,
        sa.or_(events.c.claimed_until.is_(None), events.c.claimed_until <= at),
    )


def _claim(rt: Runtime, row_id: int, seen_attempts: int, at: dt.datetime) -> bool:
    def work(conn: sa.Connection) -> bool:
        result = conn.execute(
            sa.update(events)
            .where(events.c.id == row_id, events.c.attempts == seen_attempts, _due(rt.settings, at))
            .values(attempts=seen_attempts + 1, claimed_until=at + lease(rt.settings))
        )
        return result.rowcount == 1

    return rt.store.run(work, autocommit=True)


def _mark(rt: Runtime, claim: _Claim, values: dict[str, t.Any]) -> None:
    def work(conn: sa.Connection) -> None:
        conn.execute(
            sa.update(events)
            .where(events.c.id == claim.id, events.c.attempts == claim.attempt, events.c.delivered_at.is_(None))
            .values(claimed_until=None, **values)
        )

    rt.store.run(work, autocommit=True)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Treat a redirect as a failed delivery: a POST is never re-sent elsewhere (or as a GET)."""

    def redirect_request(self, *args: t.Any, **kwargs: t.Any) -> None:
        return None


_opener = urllib.request.build_opener(_NoRedirects)


def post(url: str, secret: str, payload: t.Mapping[str, t.Any], *, timeout: float) -> str | None:
    """POST one alert body, signed; None on a 2xx, else what went wrong (status or exception class).

    The body is serialised here, compactly and with sorted keys, and the signature
    covers exactly the bytes sent; each attempt is signed at its own time.
    """
    body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    request = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json",
            "User-Agent": "flask-ai-metering",
            SIGNATURE_HEADER: sign(body, secret, int(time.time())),
            EVENT_ID_HEADER: str(payload["id"]),
        },
    )
    try:
        with _opener.open(request, timeout=timeout) as response:
            status = int(response.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return f"HTTP {exc.code}"
    except urllib.error.URLError as exc:
        reason = exc.reason
        return f"URLError({type(reason).__name__})" if isinstance(reason, BaseException) else "URLError"
    except Exception as exc:  # timeouts, resets, bad status lines: all retried the same way
        return type(exc).__name__
    return None if 200 <= status < 300 else f"HTTP {status}"


def _deliver(rt: Runtime, claim: _Claim, now: dt.datetime | None) -> bool:
    settings = rt.settings
    assert settings.alert_webhook_url is not None and settings.alert_webhook_secret is not None
    error = post(
        settings.alert_webhook_url, settings.alert_webhook_secret, claim.payload, timeout=settings.alert_webhook_timeout
    )
    at = now or utcnow()
    if error is None:
        _mark(rt, claim, {"delivered_at": at, "last_error": None})
        return True
    log.warning(
        "alert %s: delivery attempt %d of %d failed (%s)",
        claim.event_id,
        claim.attempt,
        settings.alert_max_attempts,
        error,
    )
    _mark(rt, claim, {"last_error": error[:200], "next_attempt_at": at + backoff(claim.attempt)})
    return False


def reset_failed(rt: Runtime, *, now: dt.datetime | None = None) -> int:
    """Give every alert that used up its attempts a fresh set, due now; return how many."""
    at = now or utcnow()

    def work(conn: sa.Connection) -> int:
        result = conn.execute(
            sa.update(events)
            .where(
                events.c.delivered_at.is_(None),
                events.c.attempts >= rt.settings.alert_max_attempts,
                # A final attempt still in flight keeps its claim; it is reset next time.
                sa.or_(events.c.claimed_until.is_(None), events.c.claimed_until <= at),
            )
            .values(attempts=0, next_attempt_at=at, claimed_until=None)
        )
        return int(result.rowcount)

    return rt.store.run(work, autocommit=True)


def outstanding(rt: Runtime, *, now: dt.datetime | None = None) -> tuple[int, int]:
    """``(undelivered, exhausted)``: alerts not delivered yet, and those of them out of attempts."""
    at = now or utcnow()
    exhausted = sa.and_(
        events.c.attempts >= rt.settings.alert_max_attempts,
        sa.or_(events.c.claimed_until.is_(None), events.c.claimed_until <= at),
    )
    with rt.store.reading() as conn:
        row = conn.execute(
            sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(sa.case((exhausted, 1), else_=0)), 0)).where(
                events.c.delivered_at.is_(None)
            )
        ).one()
    return int(row[0]), int(row[1])


def next_due(rt: Runtime) -> dt.datetime | None:
    """When the earliest undelivered alert with attempts left can next be claimed (None: none waits).

    What the background thread sleeps until; a claim held by another deliverer
    counts from its end, so a row of a deliverer that died is picked up when its
    claim runs out.
    """
    start = sa.case(
        (
            sa.and_(events.c.claimed_until.is_not(None), events.c.claimed_until > events.c.next_attempt_at),
            events.c.claimed_until,
        ),
        else_=events.c.next_attempt_at,
    )
    earliest = sa.type_coerce(sa.func.min(start), UTCDateTime())
    with rt.store.reading() as conn:
        return conn.execute(
            sa.select(earliest).where(
                events.c.delivered_at.is_(None), events.c.attempts < rt.settings.alert_max_attempts
            )
        ).scalar()


def deliver_due(
    rt: Runtime, *, now: dt.datetime | None = None, limit: int | None = 100, retry_failed: bool = False
) -> DeliveryReport:
    """Send the alerts that are due, each claimed first; report what was sent and what is left.

    Safe beside other deliverers (the background thread of any process, a cron'd
    ``deliver-alerts``): a row is POSTed by whoever claims it, never by two at once.
    No transaction is open during a POST.

    :param now: the scheduling clock (default: the time of each step). Signatures always
        carry the real time of sending, which the receiver checks against its clock.
    :param limit: the most alerts to attempt in this pass (None: every one due).
    :param retry_failed: first give the alerts that used up their attempts a fresh set.
    """
    if retry_failed:
        reset_failed(rt, now=now)
    if not rt.settings.alert_webhook_url:
        undelivered, exhausted = outstanding(rt, now=now)
        return DeliveryReport(remaining=undelivered, exhausted=exhausted)
    delivered = failed = tried = 0
    batch = 100 if limit is None else min(limit, 100)
    # One pass in id order: a row tried here is not tried again in this pass, even if
    # its backoff ends before the pass does.
    after = 0
    while limit is None or tried < limit:
        with rt.store.reading() as conn:
            rows = conn.execute(
                sa.select(events.c.id, events.c.event_id, events.c.payload, events.c.attempts)
                .where(_due(rt.settings, now or utcnow()), events.c.id > after)
                .order_by(events.c.id)
                .limit(batch)
            ).all()
        if not rows:
            break
        for row in rows:
            if limit is not None and tried >= limit:
                break
            tried += 1
            after = row.id
            if not _claim(rt, row.id, row.attempts, now or utcnow()):
                continue  # another deliverer has it
            claim = _Claim(row.id, row.event_id, row.payload, row.attempts + 1)
            if _deliver(rt, claim, now):
                delivered += 1
            else:
                failed += 1
    undelivered, exhausted = outstanding(rt, now=now)
    return DeliveryReport(delivered=delivered, failed=failed, remaining=undelivered, exhausted=exhausted)
