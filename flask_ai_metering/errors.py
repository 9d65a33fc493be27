"""The exceptions flask_ai_metering raises, one per broken rule.

``AiLimitExceeded`` and ``CreditsInsufficient`` are werkzeug HTTP exceptions, so
an app customises their responses with ``@app.errorhandler`` like any 429 or 402.
"""

from __future__ import annotations

import json
import typing as t
from decimal import Decimal

from werkzeug.exceptions import Forbidden
from werkzeug.exceptions import HTTPException
from werkzeug.exceptions import TooManyRequests
from werkzeug.exceptions import Unauthorized
from werkzeug.exceptions import UnprocessableEntity

from .headers import limit_headers

if t.TYPE_CHECKING:
    from .quota.engine import LimitCheck


class AiMeteringError(Exception):
    """Base class for all flask_ai_metering errors."""


class ConfigurationError(AiMeteringError):
    """Raised by ``init_app`` (or at first use) for a missing or invalid ``AI_METERING_*`` key."""


class InvalidUsage(AiMeteringError, ValueError):
    """Raised for bad input before anything is recorded; the message names the field."""


class UsageNotFound(InvalidUsage, LookupError):
    """A usage id that names no call in the ledger (e.g. ``meter.refund``'s ``usage_id``); nothing changed."""

    def __init__(self, usage_id: t.Any, field: str = "usage_id") -> None:
        super().__init__(f"{field} {usage_id!r} names no metered call in the ledger")
        self.usage_id = usage_id
        self.field = field


class IdempotencyConflict(AiMeteringError):
    """Raised when a call reuses an idempotency key whose first call is still in flight."""


class _LimitResponse(HTTPException):
    """Shared body and headers of the 429 and 402 answers."""

    error_code = "ai_limit_exceeded"
    #: Whether the period's reset can lift this refusal (``Retry-After`` is sent only then).
    lifted_by_reset = True

    def __init__(self, message: str, check: LimitCheck | None = None) -> None:
        super().__init__(description=message)
        #: The :class:`~flask_ai_metering.quota.engine.LimitCheck` that refused the call.
        self.check = check
        self.message = message

    def __str__(self) -> str:
        return self.message

    def get_body(self, environ: t.Any = None, scope: t.Any = None) -> str:
        body: dict[str, t.Any] = {"error": self.error_code, "message": self.message}
        if self.check is not None:
            body.update(self.check.as_json())
        return json.dumps(body)

    def get_headers(self, environ: t.Any = None, scope: t.Any = None) -> list[tuple[str, str]]:
        headers = [("Content-Type", "application/json")]
        if self.check is not None:
            headers.extend(limit_headers(self.check, refused=self.lifted_by_reset).items())
        return headers


class AiLimitExceeded(_LimitResponse, AiMeteringError, TooManyRequests):
    """A token or cost limit is used up (HTTP 429).

    Raised by ``meter.call`` before the provider is called, and by
    ``@quota_required`` before the view runs. ``.check`` holds the
    :class:`~flask_ai_metering.quota.engine.LimitCheck`, from which the headers and
    ``Retry-After`` are built.
    """

    code = 429
    error_code = "ai_limit_exceeded"


class CreditsInsufficient(_LimitResponse, AiMeteringError):
    """The billable's credit wallet cannot pay for the call (HTTP 402).

    No ``Retry-After``: credits come from a top-up, not from waiting.
    """

    code = 402
    error_code = "credits_insufficient"
    lifted_by_reset = False


class BillableRequired(AiMeteringError, Unauthorized):
    """A guarded route was reached with no billable to check (HTTP 401): nobody is logged in.

    The app decides what an anonymous caller sees: register an error handler for
    this class (or for 401), e.g. to redirect to the login page.
    """

    def __init__(self, description: str = "Sign in to use this feature.") -> None:
        super().__init__(description=description)


class FeatureNotAllowed(AiMeteringError, Forbidden):
    """The billable's plan lists its allowed features and this one is not among them (HTTP 403)."""

    def __init__(self, feature: str | None, plan_slug: str) -> None:
        super().__init__(description=f"Feature {feature!r} is not included in plan {plan_slug!r}.")
        self.feature = feature
        self.plan_slug = plan_slug


class CostCapExceeded(AiMeteringError, UnprocessableEntity):
    """The call's worst-case cost is above its cap (``max_cost``); the provider was not called (HTTP 422).

    422, not 429 or 402: waiting or topping up does not help, the request as sized can
    never run; a smaller ``max_tokens``, a cheaper model or a higher cap can.
    """

    error_code = "cost_cap_exceeded"

    def __init__(self, max_cost: Decimal, worst_case_cost: Decimal, *, tokens: int, model: str | None) -> None:
        self.message = (
            f"This call may cost up to {worst_case_cost.normalize():f} ({tokens} tokens of {model!r}),"
            f" above its max_cost of {max_cost.normalize():f}."
        )
        super().__init__(description=self.message)
        #: The cap that refused the call.
        self.max_cost = max_cost
        #: What the hold would have been: ``tokens`` at the model's highest price.
        self.worst_case_cost = worst_case_cost
        self.tokens = tokens
        self.model = model

    def __str__(self) -> str:
        return self.message

    def get_body(self, environ: t.Any = None, scope: t.Any = None) -> str:
        return json.dumps(
            {
                "error": self.error_code,
                "message": self.message,
                "max_cost": str(self.max_cost),
                "worst_case_cost": str(self.worst_case_cost),
                "max_tokens": self.tokens,
                "model": self.model,
            }
        )

    def get_headers(self, environ: t.Any = None, scope: t.Any = None) -> list[tuple[str, str]]:
        return [("Content-Type", "application/json")]


class BillingError(AiMeteringError):
    """A billing driver could not hand an amount to the payment provider."""


__all__ = [
    "AiLimitExceeded",
    "AiMeteringError",
    "BillableRequired",
    "BillingError",
    "ConfigurationError",
    "CostCapExceeded",
    "CreditsInsufficient",
    "FeatureNotAllowed",
    "IdempotencyConflict",
    "InvalidUsage",
    "UsageNotFound",
]
