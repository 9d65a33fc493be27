"""The ``AI-Metering-Signature`` header of alert webhooks: HMAC-SHA256 over timestamp and body.

Shaped like Stripe's ``Stripe-Signature``: ``t=<unix seconds>,v1=<hex digest>``, where
the digest is ``HMAC-SHA256(secret, f"{t}." + body)``. The timestamp is signed with the
body, so a captured request cannot be replayed later than the receiver's tolerance;
the receiver dedups by the ``id`` in the body (also sent as ``AI-Metering-Event-Id``)
against the retries that are sent on purpose.

A receiver checks a request with :func:`verify` on the *raw* body bytes (parsing
and re-serialising the JSON would change them)::

    from flask_ai_metering.alerts.signing import verify

    if not verify(request.get_data(), request.headers.get("AI-Metering-Signature", ""), secret):
        abort(400)
"""

from __future__ import annotations

import hashlib
import hmac
import time

#: The header that carries the signature.
SIGNATURE_HEADER = "AI-Metering-Signature"
#: The header that carries the alert's event id (the body's ``id``): dedup on it.
EVENT_ID_HEADER = "AI-Metering-Event-Id"
#: The version tag of the only signature scheme so far.
_SCHEME = "v1"


def _digest(body: bytes, secret: str, timestamp: int) -> str:
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def sign(body: bytes, secret: str, timestamp: int) -> str:
    """The ``AI-Metering-Signature`` value for ``body`` sent at ``timestamp`` (unix seconds).

    :param body: the exact bytes POSTed.
    :param secret: ``AI_METERING_ALERT_WEBHOOK_SECRET``.
    :param timestamp: when the request is sent; each retry is signed afresh.
    """
    return f"t={timestamp},{_SCHEME}={_digest(body, secret, timestamp)}"


def verify(body: bytes, header: str, secret: str, *, tolerance: int = 300, now: float | None = None) -> bool:
    """True when ``header`` is a valid signature of ``body`` made within ``tolerance`` seconds of ``now``.

    For webhook receivers. Compares digests in constant time; accepts the header when
    any of its ``v1`` signatures matches (room for rotating secrets). A timestamp
    further than ``tolerance`` from the receiver's clock, in either direction, is
    refused, so a recorded request cannot be replayed days later.

    :param body: the raw request body, as received (``request.get_data()`` in Flask).
    :param header: the ``AI-Metering-Signature`` header value ("" when missing).
    :param secret: the shared ``AI_METERING_ALERT_WEBHOOK_SECRET``.
    :param tolerance: seconds of clock difference accepted (0 or less: no age check).
    :param now: the receiver's clock in unix seconds (default: ``time.time()``).
    """
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            continue
        if key == "t":
            try:
                timestamp = int(value)
            except ValueError:
                return False
        elif key == _SCHEME:
            candidates.append(value)
    if timestamp is None or not candidates or not secret:
        return False
    if tolerance > 0 and abs((time.time() if now is None else now) - timestamp) > tolerance:
        return False
    expected = _digest(body, secret, timestamp)
    # Bytes, not str: compare_digest refuses non-ASCII str, and a header is untrusted input.
    return any(hmac.compare_digest(expected.encode(), candidate.encode()) for candidate in candidates)
