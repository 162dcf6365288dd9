"""Unit tests of the failure classification table and the retry timing."""

from __future__ import annotations

import random

import pytest

from pipeline.errors import (
    ClientError,
    InvalidResponse,
    RateLimited,
    RequestError,
    ServerError,
    TransportError,
)
from pipeline.policy import TABLE, Action, Verdict, backoff_delay, classify, retry_delay
from pipeline.spec import PolicySpec, RetrySpec

OPENAI_FREE_TIER_429 = (
    "Rate limit reached for default-gpt-3.5-turbo in organization org-abc on requests per min. "
    "Limit: 3 / min. Please try again in 20s. Contact us through our help center at help.openai.com "
    "if you continue to have issues. Please add a payment method to your account to increase your "
    "rate limit. Visit https://platform.openai.com/account/billing to add a payment method."
)


def client(status: int, code: str | None = None, message: str = "error") -> ClientError:
    return ClientError(f"HTTP {status}: {message}", status=status, code=code)


def server(status: int) -> ServerError:
    return ServerError(f"HTTP {status}: upstream trouble", status=status)


@pytest.mark.parametrize(
    ("exc", "action", "rule"),
    [
        pytest.param(client(408), Action.RETRY, "timeout_or_conflict", id="408"),
        pytest.param(client(409), Action.RETRY, "timeout_or_conflict", id="409"),
        pytest.param(
            RateLimited("HTTP 429: slow down", status=429, code="rate_limit_exceeded"),
            Action.RETRY,
            "rate_limited",
            id="429",
        ),
        pytest.param(
            RateLimited("HTTP 429: You exceeded your current quota", status=429, code="insufficient_quota"),
            Action.STOP_ENDPOINT,
            "quota",
            id="429-insufficient-quota",
        ),
        pytest.param(
            RateLimited("HTTP 429: out of credits", status=429),
            Action.STOP_ENDPOINT,
            "quota",
            id="429-out-of-credits-message",
        ),
        pytest.param(
            RateLimited(OPENAI_FREE_TIER_429, status=429, code="rate_limit_exceeded"),
            Action.RETRY,
            "rate_limited",
            id="429-rate-limit-message-linking-billing-page",
        ),
        pytest.param(client(402, message="Insufficient credits"), Action.STOP_ENDPOINT, "quota", id="402"),
        pytest.param(client(401, "invalid_api_key"), Action.STOP_ENDPOINT, "auth", id="401"),
        pytest.param(client(403), Action.STOP_ENDPOINT, "auth", id="403"),
        pytest.param(client(404, "model_not_found"), Action.FALLBACK, "model_not_found", id="404"),
        pytest.param(
            client(400, "context_length_exceeded", "This model's maximum context length is 128000 tokens."),
            Action.FALLBACK,
            "context_length",
            id="400-context-length-code",
        ),
        pytest.param(
            client(
                400,
                "BadRequestError",
                "This model's maximum context length is 4096 tokens. However, you requested 5000 tokens.",
            ),
            Action.FALLBACK,
            "context_length",
            id="400-vllm-maximum-context-length",
        ),
        pytest.param(
            client(413, None, "prompt is too long"),
            Action.FALLBACK,
            "context_length",
            id="413-prompt-too-long",
        ),
        pytest.param(
            client(400, "content_filter"), Action.FALLBACK, "content_filter", id="400-content-filter"
        ),
        pytest.param(
            client(403, "content_filter", "Your input was flagged by moderation"),
            Action.FALLBACK,
            "content_filter",
            id="403-content-filter",
        ),
        pytest.param(client(400, "invalid_request_error"), Action.FAIL, "bad_request", id="400"),
        pytest.param(client(422), Action.FAIL, "bad_request", id="422"),
        pytest.param(server(500), Action.RETRY, "server_error", id="500"),
        pytest.param(server(502), Action.RETRY, "server_error", id="502"),
        pytest.param(server(503), Action.RETRY, "server_error", id="503"),
        pytest.param(server(504), Action.RETRY, "server_error", id="504"),
        pytest.param(server(520), Action.RETRY, "server_error", id="520"),
        pytest.param(server(529), Action.RETRY, "server_error", id="529"),
        pytest.param(
            TransportError("refused", what="connect"), Action.RETRY, "transport", id="transport-connect"
        ),
        pytest.param(
            TransportError("timeout", what="connect_timeout"),
            Action.RETRY,
            "transport",
            id="transport-connect-timeout",
        ),
        pytest.param(
            TransportError("timeout", what="read_timeout"),
            Action.RETRY,
            "transport",
            id="transport-read-timeout",
        ),
        pytest.param(TransportError("reset", what="reset"), Action.RETRY, "transport", id="transport-reset"),
        pytest.param(
            TransportError("cut", what="truncated"), Action.RETRY, "transport", id="transport-truncated"
        ),
        pytest.param(InvalidResponse("bad JSON"), Action.RETRY, "invalid_response", id="invalid-response"),
        pytest.param(
            InvalidResponse("finish_reason error", code="finish_reason_error"),
            Action.RETRY,
            "finish_error",
            id="finish-reason-error",
        ),
    ],
)
def test_classify_gives_the_table_row(exc: RequestError, action: Action, rule: str) -> None:
    """Each kind of failed attempt gets its row of the table: the action and the rule's name."""
    assert classify(exc) == Verdict(action, rule)


@pytest.mark.parametrize(
    ("policy", "action"),
    [
        pytest.param(PolicySpec(), Action.FALLBACK, id="default-fallback"),
        pytest.param(PolicySpec(content_filter="fallback"), Action.FALLBACK, id="fallback"),
        pytest.param(PolicySpec(content_filter="fail"), Action.FAIL, id="fail"),
    ],
)
def test_content_filter_action_follows_the_policy(policy: PolicySpec, action: Action) -> None:
    """A content-filter refusal moves to the next route by default, or fails the request if asked."""
    assert classify(client(400, "content_filter"), policy) == Verdict(action, "content_filter")


def test_every_rule_name_in_the_table_is_unique() -> None:
    """The table has one row per rule name, so a verdict's rule names exactly one row."""
    names = [r.name for r in TABLE]
    assert len(names) == len(set(names))


@pytest.mark.parametrize(
    ("retry_after", "expected"),
    [
        pytest.param(2.5, 2.5, id="server-value"),
        pytest.param(0.0, 0.0, id="zero"),
        pytest.param(-3.0, 0.0, id="negative-is-zero"),
        pytest.param(10_000.0, 300.0, id="capped"),
    ],
)
def test_retry_delay_prefers_retry_after_capped(retry_after: float, expected: float) -> None:
    """The server's Retry-After wins over backoff, capped at max_retry_after_s."""
    exc = RateLimited("HTTP 429", status=429, retry_after=retry_after)
    assert retry_delay(exc, 5, RetrySpec(max_retry_after_s=300.0, backoff_base_s=100.0)) == expected


@pytest.mark.parametrize(
    "exc",
    [
        pytest.param(server(503), id="no-retry-after"),
        pytest.param(None, id="no-exception"),
    ],
)
def test_retry_delay_without_retry_after_is_backoff(exc: RequestError | None) -> None:
    """Without Retry-After the delay is a backoff draw within its ceiling."""
    retry = RetrySpec(backoff_base_s=0.5, backoff_max_s=30.0)
    delays = [retry_delay(exc, 3, retry) for _ in range(200)]
    assert all(0.0 <= d <= 2.0 for d in delays)
    assert len(set(delays)) > 1


@pytest.mark.parametrize("attempt", [1, 2, 3, 5, 8, 20])
def test_backoff_stays_within_the_exponential_ceiling(attempt: int) -> None:
    """Backoff is uniform in [0, min(cap, base * 2**(attempt-1))] and uses most of that range."""
    retry = RetrySpec(backoff_base_s=0.5, backoff_max_s=30.0)
    ceiling = min(30.0, 0.5 * 2 ** (attempt - 1))
    rng = random.Random(attempt)
    draws = [backoff_delay(attempt, retry, rng) for _ in range(2000)]
    assert all(0.0 <= d <= ceiling for d in draws)
    assert max(draws) > 0.9 * ceiling
    assert min(draws) < 0.1 * ceiling


def test_backoff_is_reproducible_with_a_seeded_rng() -> None:
    """The same seed gives the same delays."""
    retry = RetrySpec()
    a = [backoff_delay(n, retry, random.Random(42)) for n in range(1, 6)]
    b = [backoff_delay(n, retry, random.Random(42)) for n in range(1, 6)]
    assert a == b


def test_the_readme_table_lists_every_rule_of_the_policy_table() -> None:
    """The README's classification table and pipeline.policy.TABLE name the same rules."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = readme.index("| failure | `error_class` | action |")
    table = readme[start : readme.index("\n\n", start)]
    from pipeline.policy import TABLE

    for rule in TABLE:
        assert f"| `{rule.name}` |" in table, rule.name
    assert table.count("\n| ") - 1 == len(TABLE)
