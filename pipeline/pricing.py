"""Cost of an attempt from its usage: the spec's prices first, then the genai-prices catalogue.

Money is exact: Decimal arithmetic, stored as integer picodollars (1e-12 USD), so prices
with up to six decimals per million tokens never round. Following OpenAI's usage, prompt
tokens include cached ones (priced at the cache rate, not again at the full rate) and
completion tokens include reasoning ones (not counted twice). A model with no known price
gets no cost (NULL) with the reason, and one warning per model per run, never a silent 0.

The catalogue is used offline: its price-update thread is never started.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal

from pipeline.records import Attempt, Usage
from pipeline.spec import ModelPrice

__all__ = ["PICO_PER_USD", "Cost", "PriceBook", "attempts_cost", "picousd", "usd", "usd_text"]

log = logging.getLogger(__name__)
PICO_PER_USD = Decimal(10) ** 12
_PER_MTOK = Decimal(10) ** 6


def picousd(dollars: Decimal) -> int:
    return int((dollars * PICO_PER_USD).to_integral_value(rounding=ROUND_HALF_EVEN))


def attempts_cost(attempts: Sequence[Attempt]) -> tuple[int | None, int | None]:
    """A request's computed and provider-reported cost, in picodollars, summed over its
    attempts (None where no attempt has one)."""
    cost = reported = None
    for a in attempts:
        if a.cost_picousd is not None:
            cost = (cost or 0) + a.cost_picousd
        if a.usage is not None and a.usage.reported_cost is not None:
            reported = (reported or 0) + picousd(a.usage.reported_cost)
    return cost, reported


def usd(pico: int | None) -> Decimal | None:
    return None if pico is None else Decimal(pico) / PICO_PER_USD


def usd_text(pico: int | None) -> str | None:
    """Exact USD as plain text: picodollar precision, trailing zeros dropped, never an exponent."""
    v = usd(pico)
    if v is None:
        return None
    text = f"{v:.12f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


@dataclass(frozen=True)
class Cost:
    picousd: int | None
    source: str | None  # "spec" | "catalogue"
    note: str | None = None


class PriceBook:
    """Prices attempts. One instance per run (it remembers which models it warned about)."""

    def __init__(self, overrides: Mapping[str, ModelPrice] | None = None) -> None:
        self._overrides = dict(overrides or {})
        self._unknown: dict[tuple[str | None, str], Cost] = {}  # models the catalogue lacks
        self._windows: dict[tuple[str | None, str], int | None] = {}
        self._memo: dict[tuple[object, ...], Cost] = {}

    def prepare(self, models: Iterable[str]) -> None:
        """Load the price catalogue now if any of ``models`` needs it (it takes ~0.2 s to
        import: better before the first request than in the middle of the run's first answers)."""
        if any(m not in self._overrides for m in models):
            from genai_prices.data_snapshot import get_snapshot

            get_snapshot()  # the bundled catalogue's data (~15 ms), read on the first price

    def context_window(self, model: str, *, provider: str | None) -> int | None:
        """The model's context window from the catalogue (it bounds the output), if known."""
        key = (provider, model)
        if key not in self._windows:
            from genai_prices import Usage as GUsage
            from genai_prices import calc_price

            try:
                info = calc_price(
                    GUsage(input_tokens=0, output_tokens=0), model_ref=model, provider_id=provider
                )
                window = info.model.context_window
                self._windows[key] = int(window) if window else None
            except LookupError:
                self._windows[key] = None
        return self._windows[key]

    def cost(self, model: str, usage: Usage | None, *, provider: str | None, at: datetime) -> Cost:
        if usage is None:
            return Cost(None, None, "no usage reported")
        price = self._overrides.get(model)
        if price is not None:
            return Cost(picousd(spec_cost(price, usage)), "spec")
        key = (provider, model)
        unknown = self._unknown.get(key)
        if unknown is not None:
            return unknown
        # The catalogue costs ~80 us a call; the same usage in the same minute is priced once.
        memo_key = (provider, model, at.replace(second=0, microsecond=0), *_usage_key(usage))
        memo = self._memo.get(memo_key)
        if memo is not None:
            return memo
        try:
            total = catalogue_cost(model, usage, provider=provider, at=at)
        except LookupError:
            self._unknown[key] = Cost(None, None, f"no price known for {model!r}")
            log.warning(
                "no price known for model %r%s: its cost is left empty; add [prices.%s] to the spec",
                model,
                f" (provider {provider})" if provider else "",
                model,
            )
            return self._unknown[key]
        cost = Cost(picousd(total), "catalogue")
        if len(self._memo) >= 50_000:
            self._memo.clear()
        self._memo[memo_key] = cost
        return cost


def _usage_key(u: Usage) -> tuple[int, ...]:
    return (u.prompt, u.cached, u.cache_write, u.completion, u.audio_prompt, u.audio_completion)


def spec_cost(p: ModelPrice, u: Usage) -> Decimal:
    """USD for a usage at the spec's per-million-token prices."""
    cached = min(u.cached, u.prompt)
    written = min(u.cache_write, u.prompt - cached)
    fresh = u.prompt - cached - written
    cost = Decimal(fresh) * p.input
    cost += Decimal(cached) * (p.cached_input if p.cached_input is not None else p.input)
    cost += Decimal(written) * (p.cache_write if p.cache_write is not None else p.input)
    if p.reasoning is not None:
        reasoning = min(u.reasoning, u.completion)
        cost += Decimal(u.completion - reasoning) * p.output + Decimal(reasoning) * p.reasoning
    else:
        cost += Decimal(u.completion) * p.output
    return cost / _PER_MTOK


def catalogue_cost(model: str, u: Usage, *, provider: str | None, at: datetime) -> Decimal:
    """USD from genai-prices at the attempt's own time. Raises LookupError for unknown models."""
    from genai_prices import Usage as GUsage
    from genai_prices import calc_price

    when = at if at.tzinfo else at.replace(tzinfo=UTC)
    result = calc_price(
        GUsage(
            input_tokens=u.prompt,
            cache_read_tokens=min(u.cached, u.prompt) or None,
            cache_write_tokens=u.cache_write or None,
            output_tokens=u.completion,
            input_audio_tokens=u.audio_prompt or None,
            output_audio_tokens=u.audio_completion or None,
        ),
        model_ref=model,
        provider_id=provider,
        genai_request_timestamp=when,
    )
    return Decimal(result.total_price)
