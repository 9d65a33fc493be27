"""One call's validated options, and what reserving for it produced.

:func:`build_spec` turns the keyword options of ``meter.call`` (or ``record``)
into a :class:`CallSpec`, raising :class:`~flask_ai_metering.errors.InvalidUsage`
before anything is reserved. :class:`Hold` and :class:`Replay` are the two
outcomes of a reserve; :class:`Recorded` is the outcome of a commit.
"""

from __future__ import annotations

import dataclasses
import typing as t
from decimal import Decimal

from .. import validation as v
from ..errors import CostCapExceeded
from ..errors import InvalidUsage
from ..money import MAX_UNITS
from ..money import from_units
from ..money import to_units
from ..money import to_units_ceil
from .usage import PricedUsage
from .usage import TokenCounts

if t.TYPE_CHECKING:
    from ..quota.budgets import Terms as BudgetTerms
    from ..quota.engine import LimitCheck
    from ..quota.policy import Billable
    from ..quota.policy import Policy
    from ..runtime import Runtime

#: The options ``meter.record`` takes besides ``usage`` and ``occurred_at``.
RECORD_OPTIONS = frozenset(
    {"billable", "user", "tenant", "provider", "model", "feature", "meta", "idempotency_key", "billing_mode"}
)


@dataclasses.dataclass(frozen=True)
class CallSpec:
    """One call's attribution and options, validated."""

    billable: Billable
    provider: str
    model: str | None = None
    user_id: str | None = None
    tenant_id: str | None = None
    feature: str | None = None
    meta: dict[str, t.Any] | None = None
    idempotency_key: str | None = None
    max_tokens: int | None = None
    usage: TokenCounts | None = None
    billing_mode: str | None = None
    #: The prompt's size as the caller estimates it, charged when the provider reports no usage.
    prompt_tokens_estimate: int | None = None
    #: The call's cost cap (``max_cost=``, else ``AI_METERING_MAX_COST_PER_CALL``).
    max_cost: Decimal | None = None

    @property
    def scope(self) -> str:
        """The idempotency scope: keys are unique per billable and tenant."""
        return self.tenant_id or ""


@dataclasses.dataclass(frozen=True)
class Hold:
    """A committed reservation: quota (and credits) held for the call in flight."""

    reservation_id: int
    counter_id: int
    policy: Policy
    billing_mode: str
    tokens: int
    cost_units: int
    wallet_id: int | None
    credit_units: int
    #: Seconds the reserve took (metering overhead before the call), when observers want it.
    reserved_in: float = 0.0
    #: The budget counters held on beside the plan's, with their budgets: ``(counter id, Terms)``.
    budgets: tuple[tuple[int, BudgetTerms], ...] = ()

    @property
    def budget_counter_ids(self) -> list[int]:
        return [counter_id for counter_id, _ in self.budgets]


@dataclasses.dataclass(frozen=True)
class Replay:
    """A recorded idempotency key: the first call's usage, without calling again."""

    usage: PricedUsage
    usage_id: int | None


@dataclasses.dataclass(frozen=True)
class Recorded:
    """A committed call's usage and where its billable stands after it."""

    usage: PricedUsage
    #: None when the row was queued (``AI_METERING_QUEUE_RECORDING``) or kept for later
    #: (the database failed the commit), and is not written yet.
    usage_id: int | None
    #: None when the usage was kept for later: where the billable stands is not known then.
    check: LimitCheck | None


def build_spec(
    rt: Runtime,
    billable: Billable,
    *,
    user: t.Any = None,
    tenant: t.Any = None,
    usage: t.Any = None,
    **kw: t.Any,
) -> CallSpec:
    """Validate one call's options; ``billable``, ``user`` and ``tenant`` are already resolved."""
    if usage is not None and not isinstance(usage, TokenCounts):
        usage = TokenCounts.from_mapping(usage)
    provider = v.name(kw.get("provider") or rt.settings.default_provider, "provider", required=True)
    assert provider is not None
    rt.provider(provider)
    return CallSpec(
        billable=billable,
        provider=provider,
        model=v.name(kw.get("model"), "model"),
        user_id=v.attribution_id(user, "user"),
        tenant_id=v.attribution_id(tenant, "tenant"),
        feature=v.feature(kw.get("feature"), strict=rt.settings.validate_features),
        meta=v.meta(kw.get("meta"), max_bytes=rt.settings.max_meta_bytes, sanitize=rt.settings.sanitize_metadata),
        idempotency_key=v.idempotency_key(kw.get("idempotency_key")),
        max_tokens=v.max_tokens(kw.get("max_tokens")),
        usage=usage,
        billing_mode=v.billing_mode(kw.get("billing_mode")),
        prompt_tokens_estimate=v.token_count(kw.get("prompt_tokens_estimate"), "prompt_tokens_estimate"),
        max_cost=_cost_cap(rt, kw.get("max_cost"), kw.get("model")),
    )


def _cost_cap(rt: Runtime, given: t.Any, model: t.Any) -> Decimal | None:
    """The call's cap: ``max_cost=`` (which needs a model), else the configured default.

    A call with no model known before it runs cannot be priced before it runs: an
    explicit cap is refused as unenforceable, and the configured default skips it.
    """
    cap = v.max_cost(given)
    if cap is None:
        return rt.settings.max_cost_per_call if model else None
    if not model:
        raise InvalidUsage(
            "max_cost needs the model before the call (model=...): with no model the worst-case cost is unknown"
        )
    return cap


def check_record_options(options: t.Mapping[str, t.Any]) -> None:
    """Refuse keyword options ``meter.record`` does not know, naming them."""
    unknown = set(options) - RECORD_OPTIONS
    if unknown:
        raise InvalidUsage(f"unknown arguments: {', '.join(sorted(unknown))}")


def reservation_size(rt: Runtime, spec: CallSpec) -> tuple[int, int]:
    """Tokens and worst-case cost (pico-units) to hold before the call.

    ``max_tokens``, else the manual usage's total, else the configured default;
    the cost is those tokens at the higher of the model's input and output price.
    With no model known before the call nothing can be priced: the cost hold is 0
    and the cost check only asks that some cost remains.

    :raises CostCapExceeded: that worst-case cost is above the call's ``max_cost``;
        nothing is held or recorded and the provider is not called.
    """
    tokens = spec.max_tokens
    if tokens is None:
        tokens = spec.usage.total_tokens if spec.usage is not None else rt.settings.default_max_tokens
    price = rt.prices.max_token_price(spec.provider, spec.model) if spec.model else None
    cost = 0 if price is None else to_units_ceil(price * tokens)
    if spec.max_cost is not None and cost > to_units(spec.max_cost):
        raise CostCapExceeded(spec.max_cost, from_units(cost), tokens=tokens, model=spec.model)
    if cost > MAX_UNITS:
        raise InvalidUsage(f"max_tokens {tokens} at the price of {spec.model!r} costs more than can be held")
    return tokens, cost
