"""Meter AI calls in Flask: usage per billable, quotas that hold, credits and overage billing."""

from __future__ import annotations

from . import signals
from .decorators import quota_required
from .errors import AiLimitExceeded
from .errors import AiMeteringError
from .errors import BillableRequired
from .errors import ConfigurationError
from .errors import CostCapExceeded
from .errors import CreditsInsufficient
from .errors import FeatureNotAllowed
from .errors import IdempotencyConflict
from .errors import InvalidUsage
from .errors import UsageNotFound
from .extension import AiMetering
from .metering.calls import MeterResult
from .metering.refunds import Refund
from .metering.usage import PricedUsage as Usage
from .quota.engine import LimitCheck

__all__ = [
    "AiLimitExceeded",
    "AiMetering",
    "AiMeteringError",
    "BillableRequired",
    "ConfigurationError",
    "CostCapExceeded",
    "CreditsInsufficient",
    "FeatureNotAllowed",
    "IdempotencyConflict",
    "InvalidUsage",
    "LimitCheck",
    "MeterResult",
    "Refund",
    "Usage",
    "UsageNotFound",
    "quota_required",
    "signals",
]
