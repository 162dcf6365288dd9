"""Unit tests of exact costing: spec prices, the genai-prices catalogue, unknown models."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from pipeline.pricing import Cost, PriceBook, picousd, spec_cost, usd
from pipeline.records import Usage
from pipeline.spec import ModelPrice

AT = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
USAGE = Usage(prompt=1234, cached=200, cache_write=34, completion=567, reasoning=89, total=1801)
PRICE = ModelPrice(
    input=Decimal("0.15"),
    output=Decimal("0.6"),
    cached_input=Decimal("0.075"),
    cache_write=Decimal("0.1875"),
)


@pytest.mark.parametrize(
    ("price", "usage", "expected"),
    [
        # fresh 1000 x 0.15 + cached 200 x 0.075 + written 34 x 0.1875 + completion 567 x 0.6
        # = 150 + 15 + 6.375 + 340.2 = 511.575 per million
        pytest.param(PRICE, USAGE, Decimal("0.000511575"), id="cached-and-reasoning-at-output-price"),
        # ... + (567 - 89) x 0.6 + 89 x 1.234567 = 150 + 15 + 6.375 + 286.8 + 109.876463 = 568.051463
        pytest.param(
            ModelPrice(**{**PRICE.__dict__, "reasoning": Decimal("1.234567")}),
            USAGE,
            Decimal("0.000568051463"),
            id="separate-reasoning-price",
        ),
        # no cache prices: every prompt token at the input price: 1234 x 0.15 + 567 x 0.6 = 185.1 + 340.2
        pytest.param(
            ModelPrice(input=Decimal("0.15"), output=Decimal("0.6")),
            USAGE,
            Decimal("0.0005253"),
            id="no-cache-prices",
        ),
        # cached reported above prompt: clamped, never negative fresh tokens: 10 x 0.075 + 0
        pytest.param(
            PRICE, Usage(prompt=10, cached=50), Decimal("0.00000075"), id="cached-clamped-to-prompt"
        ),
        pytest.param(PRICE, Usage(), Decimal(0), id="no-tokens"),
    ],
)
def test_spec_cost_is_exact(price: ModelPrice, usage: Usage, expected: Decimal) -> None:
    """spec_cost gives the hand-computed Decimal to the last digit."""
    assert spec_cost(price, usage) == expected


def test_spec_prices_win_over_the_catalogue() -> None:
    """A model with a [prices] entry is priced from the spec, even when the catalogue knows it."""
    book = PriceBook({"gpt-4o-mini": PRICE})
    assert book.cost("gpt-4o-mini", USAGE, provider="openai", at=AT) == Cost(511_575_000, "spec")


def test_catalogue_prices_a_known_model() -> None:
    """gpt-4o-mini on openai: 800 x 0.15 + 200 cached x 0.075 + 100 out x 0.60 per million = 0.000195 USD."""
    usage = Usage(prompt=1000, cached=200, completion=100, total=1100)
    cost = PriceBook().cost("gpt-4o-mini", usage, provider="openai", at=AT)
    assert cost == Cost(195_000_000, "catalogue")
    assert usd(cost.picousd) == Decimal("0.000195")


def test_catalogue_accepts_a_naive_timestamp() -> None:
    """A timestamp without a zone is taken as UTC rather than refused."""
    usage = Usage(prompt=1000, cached=200, completion=100, total=1100)
    cost = PriceBook().cost("gpt-4o-mini", usage, provider="openai", at=AT.replace(tzinfo=None))
    assert cost.picousd == 195_000_000


def test_unknown_model_has_no_cost_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    """An unpriced model gets a NULL cost with a note, and one warning per model however often priced."""
    book = PriceBook()
    caplog.set_level(logging.WARNING, logger="pipeline.pricing")
    costs = [book.cost("acme-unreleased-9000", USAGE, provider="openai", at=AT) for _ in range(5)]
    costs += [book.cost("acme-other-1", USAGE, provider="openai", at=AT) for _ in range(3)]

    assert all(c.picousd is None and c.source is None for c in costs)
    assert all(c.note is not None and "no price known" in c.note for c in costs)
    assert "acme-unreleased-9000" in (costs[0].note or "")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "acme-unreleased-9000" in warnings[0].getMessage()
    assert "acme-other-1" in warnings[1].getMessage()


def test_missing_usage_has_no_cost() -> None:
    """An attempt with no usage is not priced, and says why."""
    assert PriceBook({"m": PRICE}).cost("m", None, provider=None, at=AT) == Cost(
        None, None, "no usage reported"
    )


@pytest.mark.parametrize(
    ("dollars", "pico"),
    [
        pytest.param(Decimal("0.000195"), 195_000_000, id="catalogue-example"),
        pytest.param(Decimal("12.5"), 12_500_000_000_000, id="dollars"),
        pytest.param(Decimal("0.000000000001"), 1, id="one-picodollar"),
        pytest.param(Decimal(0), 0, id="zero"),
    ],
)
def test_picousd_and_usd_round_trip(dollars: Decimal, pico: int) -> None:
    """Dollars to integer picodollars and back lose nothing."""
    assert picousd(dollars) == pico
    assert isinstance(picousd(dollars), int)
    assert usd(pico) == dollars


@pytest.mark.parametrize(
    ("dollars", "pico"),
    [
        pytest.param(Decimal("0.0000000000005"), 0, id="half-rounds-to-even-down"),
        pytest.param(Decimal("0.0000000000015"), 2, id="half-rounds-to-even-up"),
        pytest.param(Decimal("0.0000000000014"), 1, id="below-half"),
    ],
)
def test_picousd_rounds_half_to_even(dollars: Decimal, pico: int) -> None:
    """Sub-picodollar amounts round half to even."""
    assert picousd(dollars) == pico


def test_usd_of_none_is_none() -> None:
    """A NULL cost stays NULL in dollars."""
    assert usd(None) is None
