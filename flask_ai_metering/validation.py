"""Checks on what callers pass in, done before anything is reserved or recorded.

Each failure raises :class:`~flask_ai_metering.errors.InvalidUsage` naming the
field, so bad input records nothing and the caller knows what to fix.
"""

from __future__ import annotations

import json
import math
import re
import typing as t
from decimal import Decimal

import sqlalchemy as sa
from sqlalchemy import inspect as sa_inspect

from .errors import InvalidUsage
from .metering.usage import check_token_count
from .money import parse_money

FEATURE_RE = re.compile(r"[A-Za-z0-9_.-]{1,100}")
BILLING_MODES = ("plan", "credits")
_KEY_MAX = 255
_ID_MAX = 100
_NAME_MAX = 150
#: Metadata keys dropped by ``AI_METERING_SANITIZE_METADATA``: secrets and prompt text.
_SENSITIVE_KEY = re.compile(
    r"(pass(word)?|secret|token|api[_-]?key|authorization|auth|cookie|session|credential|private[_-]?key"
    r"|prompt|completion|messages?|content|input_text|output_text)$",
    re.IGNORECASE,
)
_MAX_DEPTH = 10


def billable_key(billable: t.Any, field: str = "billable") -> tuple[str, str]:
    """Normalise a billable to ``(type, id)``: a model instance or a ``(type, id)`` tuple.

    An instance is stored as its class name and primary key (``("Team", "42")``).
    """
    if isinstance(billable, tuple):
        if len(billable) != 2:
            raise InvalidUsage(f"{field} must be a (type, id) tuple, got {billable!r}")
        kind, ident = billable
        if not isinstance(kind, str) or not kind or len(kind) > 100:
            raise InvalidUsage(f"{field} type must be a non-empty str of at most 100 characters, got {kind!r}")
        return kind, _identifier(ident, f"{field} id")
    if billable is None:
        raise InvalidUsage(
            f"{field} is required: pass billable=<model instance or (type, id)>, or register @meter.billable_resolver"
        )
    return type(billable).__name__, _identifier(_primary_key(billable, field), f"{field} id")


def attribution_id(value: t.Any, field: str) -> str | None:
    """The id alone of a user or tenant: a tuple's second element or an instance's key."""
    if value is None:
        return None
    if isinstance(value, tuple):
        return billable_key(value, field)[1]
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return _identifier(value, field)
    return _identifier(_primary_key(value, field), field)


def _primary_key(obj: t.Any, field: str) -> t.Any:
    try:
        state = sa_inspect(obj)
    except sa.exc.NoInspectionAvailable:
        state = None
    if state is not None and getattr(state, "identity", None):
        identity = state.identity
        return identity[0] if len(identity) == 1 else ":".join(map(str, identity))
    ident = getattr(obj, "id", None)
    if ident is None:
        raise InvalidUsage(f"{field} {obj!r} has no primary key yet: commit it first, or pass a (type, id) tuple")
    return ident


def _identifier(value: t.Any, field: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidUsage(f"{field} must be a str or int, got {type(value).__name__}")
    text = str(value)
    if not text or len(text) > _ID_MAX:
        raise InvalidUsage(f"{field} must be 1 to {_ID_MAX} characters, got {text!r}")
    return text


def feature(value: t.Any, *, strict: bool = True) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or (strict and not FEATURE_RE.fullmatch(value)):
        raise InvalidUsage(f"feature must match [A-Za-z0-9_.-]{{1,100}}, got {value!r}")
    if len(value) > 100:
        raise InvalidUsage(f"feature must be at most 100 characters, got {len(value)}")
    return value


def name(value: t.Any, field: str, *, required: bool = False) -> str | None:
    """A provider or model name: printable, bounded, no control characters."""
    if value is None:
        if required:
            raise InvalidUsage(f"{field} is required")
        return None
    if not isinstance(value, str) or not value or len(value) > _NAME_MAX or not value.isprintable():
        raise InvalidUsage(f"{field} must be a printable str of 1 to {_NAME_MAX} characters, got {value!r}")
    return value


def idempotency_key(value: t.Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > _KEY_MAX or not value.isprintable():
        raise InvalidUsage(f"idempotency_key must be a printable str of 1 to {_KEY_MAX} characters, got {value!r}")
    return value


def billing_mode(value: t.Any) -> str | None:
    if value is None:
        return None
    if value not in BILLING_MODES:
        raise InvalidUsage(f"billing_mode must be 'plan' or 'credits', got {value!r}")
    return t.cast(str, value)


def max_tokens(value: t.Any) -> int | None:
    if value is None:
        return None
    return check_token_count(value, "max_tokens")


def max_cost(value: t.Any, field: str = "max_cost") -> Decimal | None:
    """A per-call cost cap: a positive ``Decimal``, ``int`` or decimal ``str`` (never a float)."""
    if value is None:
        return None
    amount = parse_money(value, field)
    if amount <= 0:
        raise InvalidUsage(f"{field} must be positive, got {value!r}")
    return amount


def meta(value: t.Any, *, max_bytes: int, sanitize: bool) -> dict[str, t.Any] | None:
    """Metadata: a JSON object (no NaN, no infinities, no floats that are money) under ``max_bytes``."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidUsage(f"meta must be a dict, got {type(value).__name__}")
    cleaned = _clean(value, "meta", sanitize, 0)
    try:
        encoded = json.dumps(cleaned, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise InvalidUsage(f"meta is not JSON: {exc}") from None
    size = len(encoded.encode())
    if size > max_bytes:
        raise InvalidUsage(f"meta is {size} bytes of JSON; AI_METERING_MAX_META_BYTES allows {max_bytes}")
    return t.cast(dict[str, t.Any], cleaned)


def _clean(value: t.Any, path: str, sanitize: bool, depth: int) -> t.Any:
    if depth > _MAX_DEPTH:
        raise InvalidUsage(f"{path} is nested more than {_MAX_DEPTH} levels deep")
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidUsage(f"{path} keys must be str, got {key!r}")
            if sanitize and _SENSITIVE_KEY.search(key):
                continue
            out[key] = _clean(item, f"{path}.{key}", sanitize, depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [_clean(item, f"{path}[{i}]", sanitize, depth + 1) for i, item in enumerate(value)]
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidUsage(f"{path} is not JSON: {value!r}")
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise InvalidUsage(f"{path} is not JSON: {value!r}")
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise InvalidUsage(f"{path} is not JSON: {type(value).__name__} {value!r}")
