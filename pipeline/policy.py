"""The failure classification table and retry timing. Pure functions, no I/O.

Every failed attempt gets exactly one action:

* ``retry``: try again on the same route, after a backoff or the server's ``Retry-After``;
* ``fallback``: this route cannot answer this request; move to the next route of the chain;
* ``fail``: the request itself is wrong; record it failed, the run goes on;
* ``stop_endpoint``: the endpoint refuses us (bad key, no credit); stop sending to it at all.

:data:`TABLE` is the table as data; the README prints the same rows.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from enum import StrEnum

from pipeline.errors import (
    HTTPStatusError,
    InvalidResponse,
    RateLimited,
    RequestError,
    ServerError,
    TransportError,
)
from pipeline.spec import PolicySpec, RetrySpec

__all__ = ["TABLE", "Action", "Rule", "Verdict", "backoff_delay", "classify", "retry_delay"]


class Action(StrEnum):
    RETRY = "retry"
    FALLBACK = "fallback"
    FAIL = "fail"
    STOP_ENDPOINT = "stop_endpoint"


@dataclass(frozen=True)
class Rule:
    name: str
    matches: str  # what the rule covers, for people
    action: Action


TABLE: tuple[Rule, ...] = (
    Rule("auth", "401, 403", Action.STOP_ENDPOINT),
    Rule("quota", "402; 429 with insufficient_quota / out of credits", Action.STOP_ENDPOINT),
    Rule("rate_limited", "429", Action.RETRY),
    Rule("model_not_found", "404, model_not_found", Action.FALLBACK),
    Rule("context_length", "400/413 context length exceeded", Action.FALLBACK),
    Rule("content_filter", "400 content filter, finish_reason content_filter", Action.FALLBACK),
    Rule("timeout_or_conflict", "408, 409", Action.RETRY),
    Rule("server_error", "500, 502, 503, 504, 520-529, any 5xx", Action.RETRY),
    Rule("bad_request", "other 4xx (400, 422, ...)", Action.FAIL),
    Rule("transport", "connect error, timeouts, connection reset, body cut short", Action.RETRY),
    Rule("invalid_response", "200 with invalid JSON or no choices", Action.RETRY),
    Rule("finish_error", 'finish_reason "error"', Action.RETRY),
    Rule(
        "invalid_output",
        "a structured answer that is not JSON valid for its schema (retried "
        "policy.invalid_answer_retries times, then the request fails)",
        Action.RETRY,
    ),
    Rule(
        "reasoning_exhausted",
        'finish_reason "length" with no answer: reasoning used up max_tokens '
        '(retried with more max_tokens when policy.reasoning_exhausted = "grow")',
        Action.FAIL,
    ),
)
_BY_NAME = {r.name: r for r in TABLE}

_CONTEXT = re.compile(
    r"context[_ ]length|maximum context|context window|too many tokens|prompt is too long|"
    r"reduce the length|input is too long",
    re.IGNORECASE,
)
_QUOTA = re.compile(
    r"insufficient[_ ]quota|out of credits|insufficient credits|exceeded your current quota|"
    r"credit balance is too low",
    re.I,
)
_FILTER_CODES = {"content_filter", "content_policy_violation", "content_policy"}


@dataclass(frozen=True)
class Verdict:
    action: Action
    rule: str


DEFAULT_POLICY = PolicySpec()


def classify(exc: RequestError, policy: PolicySpec = DEFAULT_POLICY) -> Verdict:
    """The one rule that applies to a failed attempt."""
    name = _rule_name(exc)
    action = _BY_NAME[name].action
    if name == "content_filter":
        action = {"fallback": Action.FALLBACK, "fail": Action.FAIL}.get(policy.content_filter, Action.FAIL)
    elif name == "reasoning_exhausted" and policy.reasoning_exhausted == "grow":
        action = Action.RETRY
    return Verdict(action, name)


def _rule_name(exc: RequestError) -> str:
    if isinstance(exc, TransportError):
        return "transport"
    if isinstance(exc, InvalidResponse):
        if exc.code == "finish_reason_error":
            return "finish_error"
        if exc.code in ("content_filter", "invalid_output", "reasoning_exhausted"):
            return exc.code
        return "invalid_response"
    code = (exc.code or "").lower()
    text = f"{code} {exc.message}"
    status = exc.status or 0
    if isinstance(exc, RateLimited) or status == 429:
        if code == "rate_limit_exceeded":
            return "rate_limited"
        return "quota" if _QUOTA.search(text) else "rate_limited"
    if status in (400, 403) and code in _FILTER_CODES:
        return "content_filter"
    if status in (401, 403):
        return "auth"
    if status == 402:
        return "quota"
    if status == 404:
        return "model_not_found"
    if status in (400, 413, 422) and (code == "context_length_exceeded" or _CONTEXT.search(exc.message)):
        return "context_length"
    if status in (408, 409):
        return "timeout_or_conflict"
    if isinstance(exc, ServerError) or status >= 500:
        return "server_error"
    if isinstance(exc, HTTPStatusError):
        return "bad_request"
    return "server_error"  # an unknown request error: treat as transient, bounded by the attempt caps


def backoff_delay(attempt: int, retry: RetrySpec, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**(attempt-1))]."""
    ceiling = min(retry.backoff_max_s, retry.backoff_base_s * (2 ** max(0, attempt - 1)))
    return (rng or random).uniform(0.0, ceiling)


def retry_delay(exc: BaseException | None, attempt: int, retry: RetrySpec) -> float:
    """How long to wait before the next attempt: the server's Retry-After wins, capped."""
    if isinstance(exc, RequestError) and exc.retry_after is not None:
        return min(max(0.0, exc.retry_after), retry.max_retry_after_s)
    return backoff_delay(attempt, retry)
