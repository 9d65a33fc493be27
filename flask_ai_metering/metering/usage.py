"""What a call used: token counts from the provider, and the priced usage.

``TokenCounts`` is what a provider extractor returns; ``PricedUsage`` (exported as
``flask_ai_metering.Usage``) is what a caller
reads back (``result.usage``): the counts plus their exact cost.
"""

from __future__ import annotations

import dataclasses
import math
import typing as t
from decimal import Decimal

from ..errors import InvalidUsage
from ..models import TOKEN_COLUMNS

#: The largest token count accepted: JSON and JavaScript integers stay exact below it.
MAX_TOKENS = 2**53 - 1

#: The counts a provider reports; ``total_tokens`` is derived from them.
TOKEN_FIELDS = tuple(name for name in TOKEN_COLUMNS if name != "total_tokens")


def check_token_count(value: t.Any, field: str) -> int:
    """Return ``value`` if it is a valid token count, else raise :class:`InvalidUsage`.

    Only a real ``int`` in ``[0, 2**53 - 1]`` passes: ``bool``, ``str``, ``float``
    (NaN and whole floats included) and ``Decimal`` are refused, because a count
    that had to be coerced is a count nobody can explain later.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and math.isnan(value):
            raise InvalidUsage(f"{field} must be an int, got NaN")
        raise InvalidUsage(f"{field} must be an int, got {type(value).__name__} {value!r}")
    if value < 0:
        raise InvalidUsage(f"{field} must not be negative, got {value}")
    if value > MAX_TOKENS:
        raise InvalidUsage(f"{field} must be at most 2**53 - 1, got {value}")
    return value


@dataclasses.dataclass(frozen=True)
class TokenCounts:
    """Token counts of one call, normalised across providers.

    ``input_tokens`` is the whole prompt, cached reads and cache writes included,
    as OpenAI reports it (Anthropic's separate cache counts are added in by its
    extractor). ``output_tokens`` includes ``reasoning_tokens``. The breakdown
    fields are parts of those totals, never added on top.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    #: Prompt tokens read from the provider's cache (part of ``input_tokens``).
    cached_input_tokens: int = 0
    #: Prompt tokens written to the provider's cache (part of ``input_tokens``).
    cache_write_tokens: int = 0
    #: Hidden reasoning tokens (part of ``output_tokens``).
    reasoning_tokens: int = 0

    def __post_init__(self) -> None:
        for name in TOKEN_FIELDS:
            check_token_count(getattr(self, name), name)
        if self.cached_input_tokens + self.cache_write_tokens > self.input_tokens:
            raise InvalidUsage(
                "cached_input_tokens + cache_write_tokens cannot exceed input_tokens"
                f" ({self.cached_input_tokens} + {self.cache_write_tokens} > {self.input_tokens})"
            )
        if self.reasoning_tokens > self.output_tokens:
            raise InvalidUsage(
                f"reasoning_tokens cannot exceed output_tokens ({self.reasoning_tokens} > {self.output_tokens})"
            )

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @classmethod
    def from_mapping(cls, data: t.Mapping[str, t.Any], field: str = "usage") -> TokenCounts:
        """Build counts from a user's dict, e.g. ``{"input_tokens": 450, "output_tokens": 900}``.

        A ``total_tokens`` entry is accepted as a check: it must equal input + output.
        Unknown keys are refused so a typo is not silently metered as zero.
        """
        if not isinstance(data, t.Mapping):
            raise InvalidUsage(f"{field} must be a dict of token counts, got {type(data).__name__}")
        unknown = set(data) - set(TOKEN_FIELDS) - {"total_tokens"}
        if unknown:
            raise InvalidUsage(f"{field} has unknown keys: {', '.join(sorted(map(str, unknown)))}")
        values = {k: check_token_count(data[k], f"{field}.{k}") for k in TOKEN_FIELDS if k in data}
        counts = cls(**values)
        if "total_tokens" in data:
            total = check_token_count(data["total_tokens"], f"{field}.total_tokens")
            if "input_tokens" not in data and "output_tokens" not in data:
                raise InvalidUsage(f"{field}.total_tokens alone cannot be priced: give input_tokens and output_tokens")
            if total != counts.total_tokens:
                raise InvalidUsage(
                    f"{field}.total_tokens ({total}) is not input_tokens + output_tokens ({counts.total_tokens})"
                )
        return counts


@dataclasses.dataclass(frozen=True)
class Extracted:
    """What a provider extractor read off a response object."""

    tokens: TokenCounts
    #: The model the provider says it ran (e.g. a dated name), if it said.
    model: str | None = None
    #: True when the counts are an estimate (a stream that never reported usage).
    estimated: bool = False
    # Descriptive only (for observability), so left out of equality: two readings of
    # the same usage are equal whatever they say about why generation stopped.
    #: Why generation stopped, as the provider said (``stop``, ``length``, ``end_turn``…), if it said.
    finish_reasons: tuple[str, ...] = dataclasses.field(default=(), compare=False)
    #: The GenAI operation the response answers: ``chat`` or ``embeddings`` (None: unknown).
    operation: str | None = dataclasses.field(default=None, compare=False)


@dataclasses.dataclass(frozen=True)
class Costs:
    """The exact cost of some token counts, rounded once to 10^-12 (half-even)."""

    input_cost: Decimal
    output_cost: Decimal
    total_cost: Decimal
    currency: str = "usd"
    #: True when the price database does not know the model: every cost is then 0.
    unpriced: bool = False
    #: Where the price came from: ``override`` (``AI_METERING_PROVIDERS``), ``genai-prices <version>``
    #: (the bundled catalogue), or ``unpriced``.
    source: str = "unpriced"


@dataclasses.dataclass(frozen=True)
class PricedUsage:
    """The priced usage of one call, as ``result.usage`` returns it."""

    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    cache_write_tokens: int
    reasoning_tokens: int
    total_tokens: int
    input_cost: Decimal
    output_cost: Decimal
    total_cost: Decimal
    currency: str
    unpriced: bool = False
    estimated: bool = False
    provider: str | None = None
    model: str | None = None

    @classmethod
    def of(
        cls,
        tokens: TokenCounts,
        costs: Costs,
        *,
        provider: str | None = None,
        model: str | None = None,
        estimated: bool = False,
    ) -> PricedUsage:
        return cls(
            input_tokens=tokens.input_tokens,
            output_tokens=tokens.output_tokens,
            cached_input_tokens=tokens.cached_input_tokens,
            cache_write_tokens=tokens.cache_write_tokens,
            reasoning_tokens=tokens.reasoning_tokens,
            total_tokens=tokens.total_tokens,
            input_cost=costs.input_cost,
            output_cost=costs.output_cost,
            total_cost=costs.total_cost,
            currency=costs.currency,
            unpriced=costs.unpriced,
            estimated=estimated,
            provider=provider,
            model=model,
        )

    @property
    def tokens(self) -> TokenCounts:
        return TokenCounts(
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            cached_input_tokens=self.cached_input_tokens,
            cache_write_tokens=self.cache_write_tokens,
            reasoning_tokens=self.reasoning_tokens,
        )
