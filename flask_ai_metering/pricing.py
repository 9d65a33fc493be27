"""Token prices: genai-prices' bundled catalogue, overridden by ``AI_METERING_PROVIDERS``.

Every metered call is priced here, so the hot path never runs genai-prices' own
calculator (about 110 µs a call). A model is looked up once per
``(provider, model)``; its ``ModelPrice`` is compiled into per-token
:class:`Decimal` rates, and a call is then a handful of exact multiplications.
The compiled rates reproduce genai-prices' rules, which ``tests/test_pricing.py``
checks against ``calc_price`` for every model in the bundled data:

- ``input_tokens`` is the whole prompt; cache reads and cache writes are parts of
  it, priced at their own rate when the model has one, else at the input rate.
- ``reasoning_tokens`` are part of ``output_tokens``, priced at
  ``output_reasoning_mtok`` where a model has one, else at the output rate.
- A tiered price ("cliff", e.g. above 200K prompt tokens) applies to *all* tokens
  of a call whose prompt is above the tier's threshold.
- A per-request fee (``requests_kcount``) is charged with the prompt, so
  ``input_cost + output_cost == total_cost`` always holds.
- Prices for usage we never report (audio, images, web searches, ...) add nothing.

genai-prices is imported at first use: its import takes 0.3-1.5 s. Its data is
used as bundled (never ``UpdatePrices``), so lookups can be cached for the life
of the process.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
import threading
import typing as t
import warnings
from collections.abc import Mapping
from datetime import datetime
from datetime import timezone
from decimal import Context
from decimal import Decimal
from decimal import DivisionByZero
from decimal import Inexact
from decimal import InvalidOperation
from decimal import Overflow
from decimal import localcontext

from .config import ConfigVars
from .errors import ConfigurationError
from .errors import InvalidUsage
from .metering.usage import Costs
from .metering.usage import TokenCounts
from .money import parse_money
from .money import round_money
from .money import zero

if t.TYPE_CHECKING:
    from genai_prices.types import ModelInfo
    from genai_prices.types import ModelPrice

logger = logging.getLogger("flask_ai_metering")

_CONFIG_KEY = ConfigVars.PROVIDERS
_PROVIDER_KEYS = frozenset({"class", "models"})
_REQUIRED_PRICES = ("input_price_per_1k", "output_price_per_1k")
_OPTIONAL_PRICES = ("cached_input_price_per_1k", "cache_write_price_per_1k", "reasoning_price_per_1k")
#: A date a provider appends to a model name: ``-2024-07-18``, ``-20240718``,
#: ``-0613`` (older OpenAI names) or ``@20240620`` (Vertex AI).
_DATE_SUFFIX = re.compile(
    r"[-@](?:20\d\d-?(?:0[1-9]|1[0-2])-?(?:0[1-9]|[12]\d|3[01])|(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01]))$"
)
#: Wide enough that no cost computation ever rounds; ``Inexact`` would say if one did.
_EXACT = Context(prec=60, traps=[Inexact, InvalidOperation, Overflow, DivisionByZero])
#: Bounds the caches: model names come from provider responses, not from a fixed list.
_MAX_CACHED = 4096
_UNPRICED = Costs(zero(), zero(), zero(), unpriced=True)


@dataclasses.dataclass(frozen=True)
class _Rates:
    """Per-token prices (not per 1K or 1M) of one model within one price tier."""

    input: Decimal
    cache_read: Decimal
    cache_write: Decimal
    output: Decimal
    reasoning: Decimal
    #: A fixed fee per call, charged with the prompt.
    request: Decimal

    @property
    def highest(self) -> Decimal:
        return max(self.input, self.cache_read, self.cache_write, self.output, self.reasoning)


@dataclasses.dataclass(frozen=True)
class _Pricing:
    """A model's compiled prices at one point in time."""

    #: ``(threshold, rates)`` pairs, highest threshold first, ending with ``(-1, base)``:
    #: the first pair whose threshold the prompt exceeds applies to the whole call.
    tiers: tuple[tuple[int, _Rates], ...]

    def at(self, at: datetime | None) -> _Pricing:
        """Itself: an override's prices do not change over time."""
        return self

    @functools.cached_property
    def max_token_price(self) -> Decimal:
        # The top tier: a hold taken before the call must not be exceeded by its cost.
        return max(rates.highest for _, rates in self.tiers)

    def cost(self, tokens: TokenCounts) -> Costs:
        prompt = tokens.input_tokens
        rates = next(r for threshold, r in self.tiers if prompt > threshold)
        cached = tokens.cached_input_tokens
        written = tokens.cache_write_tokens
        reasoning = tokens.reasoning_tokens
        with localcontext(_EXACT):
            exact_input = (
                (prompt - cached - written) * rates.input
                + cached * rates.cache_read
                + written * rates.cache_write
                + rates.request
            )
            exact_output = (tokens.output_tokens - reasoning) * rates.output + reasoning * rates.reasoning
            exact_total = exact_input + exact_output
        # Round once per row; the output share is what is left, so the parts sum to the total.
        total_cost = round_money(exact_total)
        input_cost = round_money(exact_input)
        return Costs(input_cost, total_cost - input_cost, total_cost)


class _Catalogued:
    """A genai-prices model, whose price may depend on the time of the call.

    ``ConditionalPrice`` entries change a model's price from a start date or at
    off-peak hours, so each entry is compiled once and the one in force at ``at``
    is picked per call by genai-prices' own ``get_prices``.
    """

    __slots__ = ("_model", "_compiled")

    def __init__(self, model: ModelInfo) -> None:
        from genai_prices.types import ModelPrice

        self._model = model
        entries = [model.prices] if isinstance(model.prices, ModelPrice) else [c.prices for c in model.prices]
        # Keyed by identity: get_prices returns one of these very objects, kept alive by the model.
        self._compiled = {id(price): _compile_model_price(price) for price in entries}

    def at(self, at: datetime | None) -> _Pricing:
        return self._compiled[id(self._model.get_prices(at or datetime.now(timezone.utc)))]


def _compile_model_price(price: ModelPrice) -> _Pricing:
    from genai_prices.types import TieredPrices

    raw = {
        key: getattr(price, f"{key}_mtok")
        for key in ("input", "cache_read", "cache_write", "output", "output_reasoning")
    }
    raw["request"] = price.requests_kcount
    thresholds = sorted(
        {tier.start for value in raw.values() if isinstance(value, TieredPrices) for tier in value.tiers},
        reverse=True,
    )

    def in_tier(key: str, prompt: int) -> Decimal | None:
        value = raw[key]
        if isinstance(value, TieredPrices):
            # genai-prices' cliff rule: the highest tier whose start the prompt exceeds.
            return next((tier.price for tier in reversed(value.tiers) if prompt > tier.start), value.base)
        return t.cast("Decimal | None", value)

    def rates(prompt: int) -> _Rates:
        per_mtok = {key: in_tier(key, prompt) for key in raw}
        input_rate = per_mtok["input"] or Decimal(0)
        output_rate = per_mtok["output"] or Decimal(0)

        def own_or(key: str, default: Decimal) -> Decimal:
            value = per_mtok[key]
            return default if value is None else value

        return _Rates(
            input=input_rate.scaleb(-6),
            cache_read=own_or("cache_read", input_rate).scaleb(-6),
            cache_write=own_or("cache_write", input_rate).scaleb(-6),
            output=output_rate.scaleb(-6),
            reasoning=own_or("output_reasoning", output_rate).scaleb(-6),
            request=own_or("request", Decimal(0)).scaleb(-3),
        )

    return _Pricing(tuple((threshold, rates(threshold + 1)) for threshold in thresholds) + ((-1, rates(0)),))


#: ``Usage.price_source`` of a row priced from ``AI_METERING_PROVIDERS``.
OVERRIDE = "override"


@functools.lru_cache(maxsize=1)
def catalogue_label() -> str:
    """``Usage.price_source`` of a row priced from the bundled catalogue: ``genai-prices <version>``."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version

    try:
        return f"genai-prices {version('genai-prices')}"
    except PackageNotFoundError:  # pragma: no cover - a vendored copy
        return "genai-prices"


@functools.lru_cache(maxsize=_MAX_CACHED)
def _catalogued(provider: str, model: str) -> _Catalogued | None:
    """Look ``model`` up in genai-prices once per process; None when it is not there."""
    from genai_prices import Usage
    from genai_prices import calc_price

    with warnings.catch_warnings():
        # A newer data file may carry price keys this version warns about; the
        # warning is no use to the app, and would be an error under ``-W error``.
        warnings.simplefilter("ignore")
        try:
            found = calc_price(Usage(), model, provider_id=provider)
        except LookupError:
            return None
        return _Catalogued(found.model)


def _override_pricing(prices: t.Any, path: str) -> _Pricing:
    if not isinstance(prices, Mapping):
        raise ConfigurationError(
            f"{path} must be a dict of prices such as {{'input_price_per_1k': '0.00015',"
            f" 'output_price_per_1k': '0.0006'}}, got {type(prices).__name__}"
        )
    unknown = set(prices) - set(_REQUIRED_PRICES) - set(_OPTIONAL_PRICES)
    if unknown:
        allowed = ", ".join(_REQUIRED_PRICES + _OPTIONAL_PRICES)
        raise ConfigurationError(f"{path}[{sorted(map(str, unknown))[0]!r}] is not a price key; use one of {allowed}")
    per_1k: dict[str, Decimal] = {}
    for key, value in prices.items():
        field = f"{path}[{key!r}]"
        if isinstance(value, float):
            raise ConfigurationError(f"{field} must be a str or Decimal, e.g. '0.00015', not float")
        try:
            amount = parse_money(value, field)
        except InvalidUsage as exc:
            raise ConfigurationError(str(exc)) from None
        if amount < 0:
            raise ConfigurationError(f"{field} must not be negative, got {value!r}")
        per_1k[key] = amount
    for key in _REQUIRED_PRICES:
        if key not in per_1k:
            raise ConfigurationError(f"{path}[{key!r}] is missing (write '0' if the model is free)")
    input_rate = per_1k["input_price_per_1k"].scaleb(-3)
    output_rate = per_1k["output_price_per_1k"].scaleb(-3)
    rates = _Rates(
        input=input_rate,
        cache_read=per_1k.get("cached_input_price_per_1k", per_1k["input_price_per_1k"]).scaleb(-3),
        cache_write=per_1k.get("cache_write_price_per_1k", per_1k["input_price_per_1k"]).scaleb(-3),
        output=output_rate,
        reasoning=per_1k.get("reasoning_price_per_1k", per_1k["output_price_per_1k"]).scaleb(-3),
        request=Decimal(0),
    )
    return _Pricing(((-1, rates),))


def _parse_overrides(config: t.Any) -> dict[str, dict[str, _Pricing]]:
    """Validate all of ``AI_METERING_PROVIDERS`` up front, so a typo fails at start-up."""
    if not isinstance(config, Mapping):
        raise ConfigurationError(f"{_CONFIG_KEY} must be a dict of providers, got {type(config).__name__}")
    parsed: dict[str, dict[str, _Pricing]] = {}
    for provider, entry in config.items():
        path = f"{_CONFIG_KEY}[{provider!r}]"
        if not isinstance(provider, str) or not provider:
            raise ConfigurationError(f"{path}: provider names must be non-empty strings")
        if not isinstance(entry, Mapping):
            raise ConfigurationError(f"{path} must be a dict with 'models' (and optionally 'class')")
        unknown = set(entry) - _PROVIDER_KEYS
        if unknown:
            raise ConfigurationError(
                f"{path}[{sorted(map(str, unknown))[0]!r}] is not a provider setting; use 'models' or 'class'"
            )
        models = entry.get("models", {})
        if not isinstance(models, Mapping):
            raise ConfigurationError(f"{path}['models'] must be a dict of model name to prices")
        priced = parsed.setdefault(provider.lower(), {})
        for model, prices in models.items():
            if not isinstance(model, str) or not model:
                raise ConfigurationError(f"{path}['models'][{model!r}]: model names must be non-empty strings")
            priced[model.lower()] = _override_pricing(prices, f"{path}['models'][{model!r}]")
    return parsed


class PriceBook:
    """Prices token counts: ``AI_METERING_PROVIDERS`` overrides first, then genai-prices.

    One instance per app; it is safe to share between threads. A model neither
    source knows is *unpriced*: its cost is 0, flagged, and a warning is logged
    once per ``(provider, model)``, so a missing price is visible without
    flooding the log or failing a call that already happened.

    :param overrides: the ``AI_METERING_PROVIDERS`` value, e.g.
        ``{"openai": {"models": {"gpt-4o-mini": {"input_price_per_1k": "0.00015",
        "output_price_per_1k": "0.0006"}}}}``; validated here.
    :raises ConfigurationError: naming the exact key of a bad entry (a float
        price, an unknown price key, a missing input or output price).
    """

    def __init__(self, overrides: Mapping[str, t.Any] | None = None) -> None:
        self._overrides = _parse_overrides(overrides or {})
        self._sources: dict[tuple[str, str | None], _Pricing | _Catalogued | None] = {}
        self._warned: set[tuple[str, str | None]] = set()
        self._lock = threading.Lock()

    def cost(self, provider: str, model: str | None, tokens: TokenCounts, at: datetime | None = None) -> Costs:
        """The exact cost of ``tokens``, rounded once to 10^-12 (half-even), in USD.

        :param at: when the call happened (default: now); catalogue prices can
            change over time, so a late-recorded call is priced as of ``at``.
        :raises InvalidUsage: if ``at`` is a naive datetime.
        """
        source = self._source(provider, model)
        if source is None:
            self._warn_unpriced(provider, model)
            return _UNPRICED
        costs = source.at(_aware(at)).cost(tokens)
        return dataclasses.replace(costs, source=OVERRIDE if isinstance(source, _Pricing) else catalogue_label())

    def max_token_price(self, provider: str, model: str | None, at: datetime | None = None) -> Decimal | None:
        """The highest per-token price the model can charge; None when it is unpriced.

        A reservation holds ``max_tokens`` times this before the call, so it takes
        the dearest token class (output, usually) and the top long-context tier.
        """
        source = self._source(provider, model)
        return None if source is None else source.at(_aware(at)).max_token_price

    def cache_savings(
        self, provider: str, model: str | None, cached_tokens: int, at: datetime | None = None
    ) -> Decimal | None:
        """What ``cached_tokens`` cache reads saved: ``cached_tokens`` × (input price − cached price).

        At the model's base tier (a long-context tier is a property of one call, not of a
        sum of them); rounded once, half-even. None when the model is unpriced.
        """
        source = self._source(provider, model)
        if source is None:
            return None
        rates = source.at(_aware(at)).tiers[-1][1]
        with localcontext(_EXACT):
            exact = cached_tokens * (rates.input - rates.cache_read)
        return round_money(exact)

    def is_known(self, provider: str, model: str | None) -> bool:
        """Whether :meth:`cost` can price this model (from an override or the catalogue)."""
        return self._source(provider, model) is not None

    def _source(self, provider: str, model: str | None) -> _Pricing | _Catalogued | None:
        key = (provider, model)
        try:
            return self._sources[key]
        except KeyError:
            pass
        source = None if model is None else self._resolve(provider, model)
        if len(self._sources) >= _MAX_CACHED:
            self._sources.clear()
        self._sources[key] = source
        return source

    def _resolve(self, provider: str, model: str) -> _Pricing | _Catalogued | None:
        overrides = self._overrides.get(provider.lower())
        if overrides:
            name = model.lower()
            # The exact name is the longest key that can match, so it wins over its undated base.
            if name in overrides:
                return overrides[name]
            dated = _DATE_SUFFIX.search(name)
            if dated is not None and name[: dated.start()] in overrides:
                return overrides[name[: dated.start()]]
        return _catalogued(provider, model)

    def _warn_unpriced(self, provider: str, model: str | None) -> None:
        key = (provider, model)
        if key in self._warned:
            return
        with self._lock:
            if key in self._warned:
                return
            if len(self._warned) >= _MAX_CACHED:
                self._warned.clear()
            self._warned.add(key)
        logger.warning(
            "No price for model %r of provider %r: its usage is recorded as unpriced, at cost 0."
            " Add it to %s to price it.",
            model,
            provider,
            _CONFIG_KEY,
        )


def _aware(at: datetime | None) -> datetime | None:
    if at is not None and at.utcoffset() is None:
        raise InvalidUsage("at must be timezone-aware, e.g. datetime.now(timezone.utc)")
    return at
