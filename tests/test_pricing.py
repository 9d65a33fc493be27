"""Pricing: exact costs from genai-prices' bundled data and from config overrides."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import typing as t
from datetime import datetime
from datetime import timezone
from decimal import Decimal
from pathlib import Path

import pytest
from genai_prices import Usage as GenaiUsage
from genai_prices import calc_price
from genai_prices.data_snapshot import get_snapshot

from flask_ai_metering.errors import ConfigurationError
from flask_ai_metering.errors import InvalidUsage
from flask_ai_metering.metering.usage import Costs
from flask_ai_metering.metering.usage import TokenCounts
from flask_ai_metering.money import QUANTUM
from flask_ai_metering.money import round_money
from flask_ai_metering.pricing import PriceBook

try:
    import hypothesis
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    hypothesis = None  # type: ignore[assignment]

UTC = timezone.utc
#: A time when every price used below is settled (claude-opus-4-6 changed on 2026-03-13).
AT = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
MINI = {"input_price_per_1k": "0.00015", "output_price_per_1k": "0.0006"}


def tokens(
    input_tokens: int = 0,
    output_tokens: int = 0,
    cached: int = 0,
    written: int = 0,
    reasoning: int = 0,
) -> TokenCounts:
    return TokenCounts(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cached_input_tokens=cached,
        cache_write_tokens=written,
        reasoning_tokens=reasoning,
    )


def assert_row(costs: Costs, input_cost: str, output_cost: str, total_cost: str) -> None:
    assert (costs.input_cost, costs.output_cost, costs.total_cost) == (
        Decimal(input_cost),
        Decimal(output_cost),
        Decimal(total_cost),
    )
    assert costs.input_cost + costs.output_cost == costs.total_cost
    assert costs.currency == "usd"
    assert not costs.unpriced


def model_price(provider: str, model: str, at: datetime = AT) -> t.Any:
    return calc_price(GenaiUsage(), model, provider_id=provider).model.get_prices(at)


# -- genai-prices ---------------------------------------------------------------------------


def test_gpt_4o_mini_with_cached_prompt() -> None:
    costs = PriceBook().cost("openai", "gpt-4o-mini", tokens(10_000, 500, cached=4_000), AT)
    # 6,000 × $0.15/M + 4,000 × $0.075/M in; 500 × $0.6/M out
    assert_row(costs, "0.0012", "0.0003", "0.0015")


def test_anthropic_cache_reads_and_writes_are_priced_apart() -> None:
    price = model_price("anthropic", "claude-sonnet-4-5")
    assert (price.input_mtok.base, price.cache_write_mtok.base, price.cache_read_mtok.base) == (
        Decimal("3"),
        Decimal("3.75"),
        Decimal("0.3"),
    )
    assert price.output_mtok.base == Decimal("15")
    # Anthropic reports 1,000 uncached + 2,000 written + 30,000 read: 33,000 prompt tokens.
    counts = tokens(33_000, 800, cached=30_000, written=2_000)
    costs = PriceBook().cost("anthropic", "claude-sonnet-4-5-20250929", counts, AT)
    # (1,000 × 3 + 2,000 × 3.75 + 30,000 × 0.3) / 1M in; 800 × 15 / 1M out
    assert_row(costs, "0.0195", "0.012", "0.0315")


def test_long_context_tier_applies_to_the_whole_call() -> None:
    price = model_price("anthropic", "claude-sonnet-4-5")
    assert [(tier.start, tier.price) for tier in price.input_mtok.tiers] == [(200_000, Decimal("6"))]
    book = PriceBook()
    at_threshold = book.cost("anthropic", "claude-sonnet-4-5", tokens(200_000, 1_000), AT)
    assert_row(at_threshold, "0.6", "0.015", "0.615")
    # Above 200K prompt tokens every token, cached and output included, pays the tier rate.
    above = book.cost("anthropic", "claude-sonnet-4-5", tokens(250_000, 1_000, cached=50_000), AT)
    # (200,000 × 6 + 50,000 × 0.6) / 1M in; 1,000 × 22.5 / 1M out
    assert_row(above, "1.23", "0.0225", "1.2525")


def test_price_in_force_at_the_time_of_the_call() -> None:
    book = PriceBook()
    long_prompt = tokens(250_000, 1_000)
    # claude-opus-4-6 dropped its long-context tier on 2026-03-13.
    before = book.cost("anthropic", "claude-opus-4-6", long_prompt, datetime(2026, 3, 12, 23, tzinfo=UTC))
    after = book.cost("anthropic", "claude-opus-4-6", long_prompt, datetime(2026, 3, 13, 1, tzinfo=UTC))
    assert_row(before, "2.5", "0.0375", "2.5375")
    assert_row(after, "1.25", "0.025", "1.275")
    assert book.max_token_price("anthropic", "claude-opus-4-6", datetime(2026, 1, 1, tzinfo=UTC)) == Decimal(
        "0.0000375"
    )
    assert book.max_token_price("anthropic", "claude-opus-4-6", AT) == Decimal("0.000025")


def test_reasoning_tokens_are_output_at_their_own_rate_where_one_exists() -> None:
    book = PriceBook()
    # sonar-deep-research: $8/M output, $3/M reasoning.
    costs = book.cost("perplexity", "sonar-deep-research", tokens(1_000, 1_000, reasoning=400), AT)
    assert_row(costs, "0.002", "0.006", "0.008")
    # gpt-4o-mini has no reasoning price: reasoning tokens are ordinary output tokens.
    plain = book.cost("openai", "gpt-4o-mini", tokens(0, 1_000, reasoning=400), AT)
    assert_row(plain, "0", "0.0006", "0.0006")


def test_a_per_request_fee_is_charged_with_the_prompt() -> None:
    # perplexity sonar: $1/M in, $1/M out and $12 per 1,000 requests.
    costs = PriceBook().cost("perplexity", "sonar", tokens(1_000, 1_000), AT)
    assert_row(costs, "0.013", "0.001", "0.014")


def test_max_token_price_is_per_token_and_takes_the_dearest_class() -> None:
    book = PriceBook({"mycorp": {"models": {"m": {**MINI, "cache_write_price_per_1k": "0.002"}}}})
    assert book.max_token_price("openai", "gpt-4o-mini") == Decimal("0.0000006")
    # The top long-context tier: $22.5/M output.
    assert book.max_token_price("anthropic", "claude-sonnet-4-5") == Decimal("0.0000225")
    assert book.max_token_price("mycorp", "m") == Decimal("0.000002")
    assert book.max_token_price("openai", "no-such-model") is None
    assert book.max_token_price("openai", None) is None


def test_every_catalogued_model_matches_genai_prices() -> None:
    """The compiled rates reproduce ``calc_price`` exactly, for every model in the data."""
    book = PriceBook()
    usages = [
        # Every token class, at and above the 200K long-context threshold most tiers use.
        tokens(200_000, 500, cached=4_000, written=1_000, reasoning=100),
        tokens(300_001, 7_777, cached=123_456, written=54_321, reasoning=7_000),
    ]
    # Prices that changed on a date, and off-peak hours (deepseek) at 02:30 UTC.
    times = [datetime(2024, 1, 1, 12, tzinfo=UTC), datetime(2026, 11, 23, 2, 30, tzinfo=UTC), AT]
    compared = 0
    for provider in get_snapshot().providers:
        for model in provider.models:
            for at in times:
                for counts in usages:
                    costs = book.cost(provider.id, model.id, counts, at)
                    try:
                        expected = calc_price(
                            GenaiUsage(
                                input_tokens=counts.input_tokens,
                                cache_read_tokens=counts.cached_input_tokens,
                                cache_write_tokens=counts.cache_write_tokens,
                                output_tokens=counts.output_tokens,
                                output_reasoning_tokens=counts.reasoning_tokens,
                            ),
                            model.id,
                            provider_id=provider.id,
                            genai_request_timestamp=at,
                        )
                    except LookupError:
                        # A few ids do not match their own model's match rule.
                        assert costs.unpriced, (provider.id, model.id)
                        continue
                    fee = expected.total_price - expected.input_price - expected.output_price
                    assert costs.total_cost == round_money(expected.total_price), (provider.id, model.id)
                    assert costs.input_cost == round_money(expected.input_price + fee), (provider.id, model.id)
                    compared += 1
    assert compared > 2_000 * len(usages) * len(times)


# -- overrides ------------------------------------------------------------------------------


def test_override_wins_over_the_catalogue() -> None:
    book = PriceBook(
        {
            "openai": {
                "class": "pkg.mod:Provider",
                "models": {
                    "gpt-4o-mini": {
                        "input_price_per_1k": "0.001",
                        "output_price_per_1k": Decimal("0.002"),
                        "reasoning_price_per_1k": 1,
                    }
                },
            }
        }
    )
    costs = book.cost("openai", "gpt-4o-mini", tokens(10_000, 500, cached=4_000, reasoning=100))
    # No cached price: cached tokens pay the input price. 400 × 0.002/1K + 100 × 1/1K out.
    assert_row(costs, "0.01", "0.1008", "0.1108")
    # Models without an override still come from the catalogue.
    assert_row(book.cost("openai", "gpt-4o", tokens(1_000_000), AT), "2.5", "0", "2.5")


def test_override_prices_each_token_class() -> None:
    prices = {
        "input_price_per_1k": "0.003",
        "output_price_per_1k": "0.015",
        "cached_input_price_per_1k": "0.0003",
        "cache_write_price_per_1k": "0.00375",
        "reasoning_price_per_1k": "0.01",
    }
    book = PriceBook({"mycorp": {"models": {"house-model": prices}}})
    costs = book.cost("mycorp", "house-model", tokens(33_000, 800, cached=30_000, written=2_000, reasoning=300))
    # 1,000 × 0.003 + 30,000 × 0.0003 + 2,000 × 0.00375 per 1K; 500 × 0.015 + 300 × 0.01 per 1K
    assert_row(costs, "0.0195", "0.0105", "0.03")


def test_override_matches_dated_model_names() -> None:
    ours = {"input_price_per_1k": "1", "output_price_per_1k": "2"}
    book = PriceBook(
        {
            "openai": {"models": {"gpt-4o": {**ours, "input_price_per_1k": "3"}, "gpt-4o-mini": ours}},
            "anthropic": {"models": {"claude-sonnet-4-5": ours, "claude-sonnet-4-5-20250929": MINI}},
        }
    )
    for name in ("gpt-4o-mini-2024-07-18", "gpt-4o-mini-20240718", "GPT-4o-mini", "gpt-4o-mini-0613"):
        assert_row(book.cost("openai", name, tokens(1_000, 1_000)), "1", "2", "3")
    # "gpt-4o" + "-mini-2024-07-18" is not a date suffix: only the "gpt-4o-mini" key matches.
    assert book.cost("openai", "gpt-4o-2024-08-06", tokens(1_000)).total_cost == Decimal("3")
    # The longest matching key wins: the exact dated override over its base name.
    assert book.cost("anthropic", "claude-sonnet-4-5-20250929", tokens(1_000)).total_cost == Decimal("0.00015")
    assert book.cost("anthropic", "claude-sonnet-4-5-20251231", tokens(1_000)).total_cost == Decimal("1")
    assert book.cost("anthropic", "claude-sonnet-4-5@20250929", tokens(1_000)).total_cost == Decimal("1")
    # A suffix that is not a date names another model: the catalogue prices it.
    not_dated = book.cost("openai", "gpt-4o-mini-search-preview", tokens(1_000, 1_000), AT)
    assert_row(not_dated, "0.00015", "0.0006", "0.00075")
    assert book.cost("openai", "gpt-4o-mini-8192", tokens(1_000)).unpriced


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"openai": {"models": {"gpt-4o-mini": {**MINI, "input_price_per_1k": 0.00015}}}},
            "AI_METERING_PROVIDERS['openai']['models']['gpt-4o-mini']['input_price_per_1k']"
            " must be a str or Decimal, e.g. '0.00015', not float",
        ),
        (
            {"openai": {"models": {"gpt-4o-mini": {**MINI, "cached_price_per_1k": "0.1"}}}},
            "AI_METERING_PROVIDERS['openai']['models']['gpt-4o-mini']['cached_price_per_1k'] is not a price key",
        ),
        (
            {"openai": {"models": {"gpt-4o-mini": {"input_price_per_1k": "0.1"}}}},
            "AI_METERING_PROVIDERS['openai']['models']['gpt-4o-mini']['output_price_per_1k'] is missing",
        ),
        (
            {"openai": {"models": {"m": {**MINI, "output_price_per_1k": "-1"}}}},
            "AI_METERING_PROVIDERS['openai']['models']['m']['output_price_per_1k'] must not be negative",
        ),
        (
            {"openai": {"models": {"m": {**MINI, "output_price_per_1k": "cheap"}}}},
            "AI_METERING_PROVIDERS['openai']['models']['m']['output_price_per_1k'] is not a number",
        ),
        (
            {"openai": {"models": {"m": {**MINI, "output_price_per_1k": True}}}},
            "AI_METERING_PROVIDERS['openai']['models']['m']['output_price_per_1k'] must be a str, int or Decimal",
        ),
        ({"openai": {"model": {}}}, "AI_METERING_PROVIDERS['openai']['model'] is not a provider setting"),
        ({"openai": {"models": ["gpt-4o-mini"]}}, "AI_METERING_PROVIDERS['openai']['models'] must be a dict"),
        ({"openai": {"models": {"m": "0.1"}}}, "AI_METERING_PROVIDERS['openai']['models']['m'] must be a dict"),
        ({"openai": None}, "AI_METERING_PROVIDERS['openai'] must be a dict"),
        (["openai"], "AI_METERING_PROVIDERS must be a dict"),
    ],
)
def test_bad_overrides_are_refused_naming_the_key(config: t.Any, message: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        PriceBook(config)


# -- unpriced models ------------------------------------------------------------------------


def test_unknown_model_is_unpriced_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    book = PriceBook({"mycorp": {"class": "pkg.mod:Provider"}})
    caplog.set_level(logging.WARNING, logger="flask_ai_metering")
    for provider, model in [("openai", "no-such-model"), ("manual", "custom-model"), ("mycorp", "x"), ("openai", None)]:
        for _ in range(3):
            costs = book.cost(provider, model, tokens(1_000, 1_000))
            assert costs == Costs(Decimal(0), Decimal(0), Decimal(0), unpriced=True)
        assert not book.is_known(provider, model)
    messages = [record.getMessage() for record in caplog.records if record.name == "flask_ai_metering"]
    assert len(messages) == 4
    assert "'no-such-model' of provider 'openai'" in messages[0]
    assert "'custom-model' of provider 'manual'" in messages[1]
    # A second PriceBook (another app) logs again: its config may differ.
    PriceBook().cost("openai", "no-such-model", tokens(1))
    assert len([r for r in caplog.records if r.name == "flask_ai_metering"]) == 5


def test_is_known() -> None:
    book = PriceBook({"mycorp": {"models": {"m": MINI}}})
    assert book.is_known("openai", "gpt-4o-mini-2024-07-18")
    assert book.is_known("mycorp", "m-2025-01-01")
    assert not book.is_known("mycorp", "other")


def test_naive_time_is_refused() -> None:
    with pytest.raises(InvalidUsage, match="at must be timezone-aware"):
        PriceBook().cost("openai", "gpt-4o-mini", tokens(1), datetime(2026, 1, 1))


def test_genai_prices_is_imported_lazily() -> None:
    code = "import sys, flask_ai_metering.pricing; print('genai_prices' in sys.modules)"
    root = Path(__file__).resolve().parent.parent
    run = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=False)
    assert (run.returncode, run.stdout.strip()) == (0, "False"), run.stderr


# -- rounding -------------------------------------------------------------------------------


def test_rounding_is_half_even_at_the_pico_unit() -> None:
    # 1e-12 per 1K tokens: 500 tokens cost exactly half a pico-dollar.
    pico = {"input_price_per_1k": "0.000000000001", "output_price_per_1k": "0.000000000001"}
    book = PriceBook({"mycorp": {"models": {"pico": pico}}})
    cases = [(500, "0"), (1_500, "2E-12"), (2_500, "2E-12"), (3_500, "4E-12"), (2_501, "3E-12")]
    for count, expected in cases:
        costs = book.cost("mycorp", "pico", tokens(count))
        assert costs.total_cost == Decimal(expected), count
        assert costs.total_cost.as_tuple().exponent == -12
    # Half a pico-dollar in and half out: rounded once, the row costs 1e-12; the output
    # share is the total minus the rounded input, so the parts still sum to the total.
    split = book.cost("mycorp", "pico", tokens(500, 500))
    assert_row(split, "0", "1E-12", "1E-12")


def test_parts_always_sum_to_the_total() -> None:
    if hypothesis is None:  # pragma: no cover
        pytest.skip("hypothesis is not installed")
    from hypothesis import given
    from hypothesis import settings
    from hypothesis import strategies as st

    book = PriceBook(
        {"mycorp": {"models": {"odd": {"input_price_per_1k": "0.000123456789", "output_price_per_1k": "0.0000000007"}}}}
    )
    models = [("openai", "gpt-4o-mini"), ("anthropic", "claude-sonnet-4-5"), ("mycorp", "odd")]
    count = st.integers(min_value=0, max_value=10**9)

    @settings(max_examples=300, deadline=None, database=None)
    @given(st.sampled_from(models), count, count, count, count, count)
    def check(model: tuple[str, str], prompt: int, output: int, a: int, b: int, c: int) -> None:
        cached = a % (prompt + 1)
        written = b % (prompt - cached + 1)
        counts = tokens(prompt, output, cached=cached, written=written, reasoning=c % (output + 1))
        costs = book.cost(*model, counts, AT)
        assert costs.input_cost + costs.output_cost == costs.total_cost
        for amount in (costs.input_cost, costs.output_cost, costs.total_cost):
            assert amount >= 0
            assert amount == amount.quantize(QUANTUM)

    check()
