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
_MAX_DEPTH = 10

# What ``AI_METERING_SANITIZE_METADATA`` drops. A key is split into words (at ``_``,
# ``-``, ``.``, spaces and camelCase: ``chat_history``, ``stripe-secret-key``,
# ``messagesList``, ``userPromptText``) and plurals are folded (``credentials``).
#: Words that make a key a secret wherever they stand.
_SECRET_WORDS = frozenset(
    {"pass", "passwd", "password", "passphrase", "pwd", "secret", "token", "credential", "cred", "creds"}
    | {"authorization", "auth", "bearer", "jwt", "apikey", "signature", "otp", "pin", "cvc", "cvv"}
)
#: Squashed spellings found inside a key written without separators (``x-apikey``, ``myPassword1``).
_SECRET_INFIXES = ("password", "passwd", "secret", "apikey", "accesskey", "privatekey", "credential", "bearer")
#: ``key``/``keys``/``tokens`` make a secret after one of these (``openai_key``, ``access_tokens``).
_KEY_QUALIFIERS = frozenset(
    {"api", "access", "secret", "private", "openai", "anthropic", "stripe", "signing", "encryption", "client"}
    | {"license", "ssh", "aws", "gcp", "azure", "master", "service", "refresh", "auth", "session", "id", "bearer"}
)
#: Words of prompt and completion text, and of session identifiers.
_TEXT_WORDS = frozenset(
    {"prompt", "completion", "message", "content", "input", "output", "query", "history", "transcript"}
    | {"conversation", "instruction", "cookie", "session", "body"}
)
#: A last word that makes a text word a count or an id (``input_tokens``, ``query_id``, ``message_count``).
_COUNT_WORDS = frozenset(
    {"id", "ids", "count", "counts", "length", "len", "type", "kind", "version", "size", "limit", "tokens"}
    | {"number", "num", "chars", "words", "bytes", "index", "at", "ms", "seconds"}
)
_WORD = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+")
#: Values shaped like credentials: provider and Stripe keys, bearer tokens, JWTs.
_SECRET_VALUE = re.compile(
    r"\b(?:sk|rk|pk_live|whsec)[-_][A-Za-z0-9_-]{8,}"
    r"|\bBearer\s+\S{8,}"
    r"|\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}"
    r"|\bAKIA[0-9A-Z]{16}\b"
    r"|\bgh[pousr]_[A-Za-z0-9]{20,}",
    re.IGNORECASE,
)
#: What a key-shaped metadata value is replaced with.
REDACTED = "[redacted]"


def _singular(word: str) -> str:
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith("s") and not word.endswith("ss") and len(word) > 3:
        return word[:-1]
    return word


def sensitive_key(key: str) -> bool:
    """True for a metadata key that names a secret or prompt text (see the word lists above)."""
    words = [w.lower() for w in _WORD.findall(key)]
    if not words:
        return False
    squashed = "".join(words)
    if any(infix in squashed for infix in _SECRET_INFIXES):
        return True
    counted = len(words) > 1 and words[-1] in _COUNT_WORDS
    for i, word in enumerate(words):
        if word in ("key", "keys", "tokens"):
            qualified = i > 0 and words[i - 1] in _KEY_QUALIFIERS
            if qualified or (len(words) == 1 and word != "tokens"):
                return True
            continue
        single = _singular(word)
        if single in _SECRET_WORDS:
            return True
        if single in _TEXT_WORDS and not (counted and i < len(words) - 1):
            return True
    return False


def secret_value(value: str) -> bool:
    """True for a string holding something shaped like a credential (``sk-…``, ``Bearer …``, a JWT)."""
    return _SECRET_VALUE.search(value) is not None


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
        if "\x00" in kind:
            raise InvalidUsage(f"{field} type must not contain a NUL character")
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
    if "\x00" in text:
        # PostgreSQL cannot store it (a raw DataError otherwise, after quota was checked).
        raise InvalidUsage(f"{field} must not contain a NUL character")
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
    return token_count(value, "max_tokens")


def token_count(value: t.Any, field: str) -> int | None:
    """An optional token count, refused (naming ``field``) unless a real ``int`` in range."""
    if value is None:
        return None
    return check_token_count(value, field)


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
    except (TypeError, ValueError):
        raise InvalidUsage("meta is not JSON") from None
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
                raise InvalidUsage(f"{path} keys must be str, got {type(key).__name__}")
            if sanitize and sensitive_key(key):
                continue
            out[key] = _clean(item, f"{path}.{key}", sanitize, depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [_clean(item, f"{path}[{i}]", sanitize, depth + 1) for i, item in enumerate(value)]
    # Messages name the path and the type, never the value: it may be a secret.
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidUsage(f"{path} is not JSON: a float that is not finite")
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise InvalidUsage(f"{path} is not JSON: a Decimal that is not finite")
        return str(value)
    if isinstance(value, str):
        return REDACTED if sanitize and secret_value(value) else value
    if value is None or isinstance(value, (int, float, bool)):
        return value
    raise InvalidUsage(f"{path} is not JSON: {type(value).__name__}")
