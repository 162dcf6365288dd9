"""Plain value types that travel between stages: usage, completions, attempts, outcomes.

They know nothing of HTTP or SQL, so the client can build them and the recorder can store
them without either importing the other. The immutable ones built for every answer
(:class:`Usage`, :class:`Completion`) are NamedTuples: a frozen dataclass of a dozen fields
costs ~2 us to build (each field set through ``object.__setattr__``), a NamedTuple a tenth
of that, and the hot path builds both for every request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, NamedTuple

__all__ = ["Attempt", "Choice", "Completion", "Outcome", "RateInfo", "Usage"]


def _int(obj: Any, *path: str) -> int | None:
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    if isinstance(obj, bool):
        return None
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float) and obj.is_integer():
        return int(obj)
    return None


def _money(obj: Any, *path: str) -> Decimal | None:
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    if isinstance(obj, bool) or not isinstance(obj, int | float | str):
        return None
    try:
        value = Decimal(str(obj))
    except ArithmeticError:
        return None
    return value if value.is_finite() else None


class Usage(NamedTuple):
    """Token usage as the provider reported it. ``prompt`` includes ``cached``; ``completion``
    includes ``reasoning`` (OpenAI's convention, followed by OpenRouter, vLLM, LiteLLM)."""

    prompt: int = 0
    completion: int = 0
    total: int = 0
    cached: int = 0
    cache_write: int = 0
    reasoning: int = 0
    audio_prompt: int = 0
    audio_completion: int = 0
    accepted_prediction: int = 0
    rejected_prediction: int = 0
    reported_cost: Decimal | None = None  # OpenRouter usage.cost (USD)
    upstream_cost: Decimal | None = None  # OpenRouter usage.cost_details.upstream_inference_cost
    estimated: bool = False  # True when no usage came back and these are our estimates
    raw: dict[str, Any] | None = None

    @classmethod
    def from_api(cls, u: Any) -> Usage | None:
        if not isinstance(u, dict):
            return None
        get = u.get
        prompt = _num(get("prompt_tokens")) or 0
        completion = _num(get("completion_tokens")) or 0
        pd = get("prompt_tokens_details")
        cd = get("completion_tokens_details")
        if not isinstance(pd, dict):
            pd = _NONE
        if not isinstance(cd, dict):
            cd = _NONE
        return cls(  # positional, in the order of the fields: a third of the time of keywords
            prompt,
            completion,
            _num(get("total_tokens")) or prompt + completion,
            _num(pd.get("cached_tokens")) or 0,
            (
                _num(pd.get("cache_write_tokens"))
                or _num(pd.get("cache_creation_tokens"))
                or _num(get("cache_creation_input_tokens"))
                or 0
            ),
            _num(cd.get("reasoning_tokens")) or 0,
            _num(pd.get("audio_tokens")) or 0,
            _num(cd.get("audio_tokens")) or 0,
            _num(cd.get("accepted_prediction_tokens")) or 0,
            _num(cd.get("rejected_prediction_tokens")) or 0,
            None if get("cost") is None else _money(u, "cost"),
            None if get("cost_details") is None else _money(u, "cost_details", "upstream_inference_cost"),
            False,
            u,
        )


_NONE: dict[str, Any] = {}  # an absent *_details object


def _num(v: Any) -> int | None:
    """A token count as _int reads it, for a value already looked up."""
    if v.__class__ is int:
        return v
    if v is None:
        return None
    return _int(v)


@dataclass(frozen=True, slots=True)
class RateInfo:
    """What a provider's ``x-ratelimit-*`` headers said (OpenAI's names; durations in seconds)."""

    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests_s: float | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens_s: float | None = None


@dataclass(frozen=True, slots=True)
class Choice:
    index: int
    finish_reason: str | None
    content: str | None
    reasoning: str | None = None
    refusal: str | None = None
    tool_calls: list[Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "finish_reason": self.finish_reason,
            "content": self.content,
            "reasoning": self.reasoning,
            "refusal": self.refusal,
            "tool_calls": self.tool_calls,
        }


@dataclass(frozen=True, slots=True)
class StreamTiming:
    """When the tokens of a streamed answer arrived, from the moment the request was sent.

    A token is a content, reasoning, refusal or tool-call delta. ``output_tokens_per_s`` is the
    completion tokens over the time between the first and the last token (None when they
    arrived together, or when nothing arrived).
    """

    ttft_ms: float | None = None  # time to first token
    ttlt_ms: float | None = None  # time to last token
    output_tokens_per_s: float | None = None


class Completion(NamedTuple):
    """A parsed ``chat.completion`` (or the same assembled from a stream)."""

    response_id: str | None
    model: str | None  # as reported by the provider
    provider: str | None  # OpenRouter's "provider", when present
    system_fingerprint: str | None
    created: int | None
    choices: tuple[Choice, ...]
    usage: Usage | None
    raw: bytes  # the response body exactly as received (streamed: the equivalent chat.completion)
    provider_request_id: str | None = None  # x-request-id
    stream: StreamTiming | None = None  # set when the answer came as a stream
    partial: bool = False  # what arrived before a stream broke (carried by the RequestError)
    rate: RateInfo | None = None  # the x-ratelimit-* headers that came with it

    @property
    def first(self) -> Choice:
        return self.choices[0]


@dataclass(slots=True)
class Attempt:
    """One HTTP attempt at one request on one route: a line of the audit and of the bill."""

    attempt_no: int  # 1-based within the request
    endpoint: str
    base_url: str
    model: str
    started_at: datetime
    latency_ms: float | None = None
    http_status: int | None = None
    outcome: str = "pending"  # success | retry | fallback | fail | stop_endpoint
    error_class: str | None = None  # the policy rule name
    error_message: str | None = None
    retry_after_s: float | None = None
    wait_s: float | None = None  # the wait before the next attempt
    provider_request_id: str | None = None
    completion: Completion | None = None
    usage: Usage | None = None
    cost_picousd: int | None = None  # computed from the price catalogue
    cost_source: str | None = None  # spec | catalogue | None
    cost_note: str | None = None  # why the cost is NULL, if it is
    parsed: str | None = None  # the structured answer, validated, as JSON text
    validation_error: str | None = None
    stream: bool | None = None  # sent with stream: true
    ttft_ms: float | None = None  # streamed: time to first token
    ttlt_ms: float | None = None  # streamed: time to last token
    output_tokens_per_s: float | None = None
    partial: bool | None = None  # streamed: the completion is what arrived before the stream broke

    def note_stream(self, completion: Completion | None) -> None:
        """Copy a streamed completion's timings and partial flag onto the attempt."""
        if not self.stream:
            return
        self.partial = completion is not None and completion.partial
        timing = None if completion is None else completion.stream
        if timing is not None:
            self.ttft_ms = timing.ttft_ms
            self.ttlt_ms = timing.ttlt_ms
            self.output_tokens_per_s = timing.output_tokens_per_s


@dataclass(slots=True)
class Outcome:
    """The end of one request's walk along its fallback chain."""

    seq: int
    custom_id: str
    state: str  # succeeded | failed | pending (not attempted: every endpoint refused us)
    attempts: list[Attempt] = field(default_factory=list)
    error: str | None = None
    record: dict[str, Any] | None = None  # the input record, for labelled outputs
    prior_attempts: int = 0  # attempts recorded for this request by earlier sessions

    @property
    def final(self) -> Attempt | None:
        return self.attempts[-1] if self.attempts else None
