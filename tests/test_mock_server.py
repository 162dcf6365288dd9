"""Tests of the fake OpenAI-compatible provider, over real HTTP on loopback.

Run as a script (``python -m tests.test_mock_server [seconds] [concurrency]``) it is a
throughput self-check instead: the server runs in a child process via the CLI entry point
and a 64-connection aiohttp client loop reports requests per second.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import orjson
import pytest

from pipeline.mock import FAULT_KINDS, MockConfig, MockServer, MockStats, ModelFaults, parse_fault, serve
from pipeline.mock.schema_fake import fake_instance
from pipeline.mock.server import _duration

ROOT = Path(__file__).resolve().parents[1]
HELLO = [{"role": "user", "content": "Say hello to the batch pipeline."}]
DURATION = re.compile(r"^(\d+h)?(\d+m)?(\d+(\.\d+)?s|\d+ms)$")


def chat(model: str = "gpt-4o-mini", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": HELLO, **extra}


@pytest.fixture(scope="module")
def server() -> Iterator[MockServer]:
    with MockServer(MockConfig(models=("gpt-4o-mini", "mock-small"))) as running:
        yield running


@pytest.fixture
def client(server: MockServer) -> Iterator[httpx.Client]:
    server.reset()
    with httpx.Client(base_url=server.base_url, timeout=10) as http:
        yield http


def client_for(server: MockServer) -> httpx.Client:
    return httpx.Client(base_url=server.base_url, timeout=10)


def sse_chunks(text: str) -> list[dict[str, Any]]:
    events = [block for block in text.split("\n\n") if block]
    assert all(block.startswith("data: ") for block in events)
    assert events[-1] == "data: [DONE]"
    return [orjson.loads(block[6:]) for block in events[:-1]]


# --------------------------------------------------------------------------- answers


def test_answer_has_exact_openai_shape_and_consistent_usage(client: httpx.Client) -> None:
    response = client.post("/chat/completions", json=chat())
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert re.fullmatch(r"req_[0-9a-f]{32}", response.headers["x-request-id"])
    assert int(response.headers["openai-processing-ms"]) >= 0
    body = response.json()
    assert set(body) == {
        "id", "object", "created", "model", "system_fingerprint", "choices", "usage",
        "service_tier",
    }  # fmt: skip
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert abs(body["created"] - time.time()) < 5
    assert body["model"] == "gpt-4o-mini"
    assert body["system_fingerprint"] == "fp_mock"
    assert body["service_tier"] == "default"
    [choice] = body["choices"]
    assert choice["index"] == 0
    assert choice["logprobs"] is None
    assert choice["finish_reason"] == "stop"
    message = choice["message"]
    assert message == {
        "role": "assistant",
        "content": message["content"],
        "refusal": None,
        "annotations": [],
    }
    assert message["content"].startswith("Mock answer ")
    usage = body["usage"]
    chars = len(HELLO[0]["content"])
    assert usage["prompt_tokens"] == math.ceil(chars / 4) + 3
    assert usage["completion_tokens"] == math.ceil(len(message["content"]) / 4)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0, "audio_tokens": 0}
    assert usage["completion_tokens_details"] == {
        "reasoning_tokens": 0,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    }


def test_same_messages_give_same_content_and_different_messages_differ(
    client: httpx.Client,
) -> None:
    first = client.post("/chat/completions", json=chat()).json()
    again = client.post("/chat/completions", json=chat(temperature=0.3)).json()
    other = client.post(
        "/chat/completions", json={"model": "gpt-4o-mini", "messages": [HELLO[0], HELLO[0]]}
    ).json()
    content = first["choices"][0]["message"]["content"]
    assert again["choices"][0]["message"]["content"] == content
    assert other["choices"][0]["message"]["content"] != content
    assert first["id"] != again["id"]


def test_n_two_returns_two_indexed_choices_and_sums_their_tokens(client: httpx.Client) -> None:
    body = client.post("/chat/completions", json=chat(n=2)).json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    contents = [c["message"]["content"] for c in body["choices"]]
    assert contents[0] != contents[1]
    expected = sum(math.ceil(len(c) / 4) for c in contents)
    assert body["usage"]["completion_tokens"] == expected


def test_max_tokens_truncates_content_with_finish_reason_length(client: httpx.Client) -> None:
    full = client.post("/chat/completions", json=chat()).json()
    cut = client.post("/chat/completions", json=chat(max_tokens=3)).json()
    content = cut["choices"][0]["message"]["content"]
    assert cut["choices"][0]["finish_reason"] == "length"
    assert cut["usage"]["completion_tokens"] == 3
    assert full["choices"][0]["message"]["content"].startswith(content)
    assert len(content) == 12
    roomy = client.post("/chat/completions", json=chat(max_completion_tokens=1000)).json()
    assert roomy["choices"][0]["finish_reason"] == "stop"


def test_paths_without_v1_prefix_are_accepted(server: MockServer) -> None:
    root = server.base_url.removesuffix("/v1")
    with httpx.Client(base_url=root, timeout=10) as http:
        assert http.post("/chat/completions", json=chat()).status_code == 200


def test_reasoning_cached_tokens_and_cost_are_reported() -> None:
    config = MockConfig(reasoning_tokens=7, cached_tokens=1000, report_cost=True)
    with MockServer(config) as server, client_for(server) as http:
        body = http.post("/chat/completions", json=chat()).json()
    message = body["choices"][0]["message"]
    usage = body["usage"]
    assert message["reasoning"]
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 7
    assert usage["completion_tokens"] == 7 + math.ceil(len(message["content"]) / 4)
    assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"]
    expected = (0.25 * usage["prompt_tokens"] + 4.0 * usage["completion_tokens"]) / 1e6
    assert usage["cost"] == pytest.approx(expected)


# --------------------------------------------------------------------------- errors


def test_unknown_model_is_404_model_not_found(client: httpx.Client) -> None:
    response = client.post("/chat/completions", json=chat("gpt-9"))
    assert response.status_code == 404
    assert response.json() == {
        "error": {
            "message": "The model `gpt-9` does not exist or you do not have access to it.",
            "type": "invalid_request_error",
            "param": None,
            "code": "model_not_found",
        }
    }


def test_any_model_is_accepted_when_models_is_none() -> None:
    with MockServer(MockConfig(models=None)) as server, client_for(server) as http:
        response = http.post("/chat/completions", json=chat("whatever/model-x"))
    assert response.status_code == 200
    assert response.json()["model"] == "whatever/model-x"


@pytest.mark.parametrize(
    "body",
    [
        {"model": "gpt-4o-mini"},
        {"model": "gpt-4o-mini", "messages": []},
        {"model": "gpt-4o-mini", "messages": "hello"},
        {"model": "gpt-4o-mini", "messages": [{"content": "no role"}]},
    ],
    ids=["missing", "empty", "not-a-list", "no-role"],
)
def test_bad_messages_are_400_on_param_messages(client: httpx.Client, body: Any) -> None:
    response = client.post("/chat/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "messages"
    assert error["message"]


def test_missing_model_is_400_on_param_model(client: httpx.Client) -> None:
    response = client.post("/chat/completions", json={"messages": HELLO})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "model"


def test_unparseable_body_is_400(client: httpx.Client) -> None:
    response = client.post("/chat/completions", content=b"{not json")
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_wrong_or_missing_api_key_is_401_without_echoing_it() -> None:
    with MockServer(MockConfig(api_key="sk-right")) as server, client_for(server) as http:
        wrong = http.post("/chat/completions", json=chat(), headers={"Authorization": "Bearer sk-wrong"})
        missing = http.post("/chat/completions", json=chat())
        right = http.post("/chat/completions", json=chat(), headers={"Authorization": "Bearer sk-right"})
    assert wrong.status_code == missing.status_code == 401
    assert wrong.json() == {
        "error": {
            "message": "Incorrect API key provided.",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }
    assert "sk-wrong" not in wrong.text
    assert right.status_code == 200


def test_unknown_path_is_404_json(client: httpx.Client) -> None:
    response = client.get("/embeddings")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "invalid_request_error"


# --------------------------------------------------------------------------- rate limits


def test_rpm_limit_answers_fourth_request_429_with_retry_after_and_headers() -> None:
    with MockServer(MockConfig(rpm=3)) as server, client_for(server) as http:
        answers = [http.post("/chat/completions", json=chat()) for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    ok, limited = answers[0], answers[3]
    assert ok.headers["x-ratelimit-limit-requests"] == "3"
    assert ok.headers["x-ratelimit-remaining-requests"] == "2"
    assert DURATION.match(ok.headers["x-ratelimit-reset-requests"])
    assert "x-ratelimit-limit-tokens" not in ok.headers
    assert limited.headers["x-ratelimit-remaining-requests"] == "0"
    assert DURATION.match(limited.headers["x-ratelimit-reset-requests"])
    assert 59 <= int(limited.headers["retry-after"]) <= 60
    assert 58_000 < int(limited.headers["retry-after-ms"]) <= 60_000
    error = limited.json()["error"]
    assert error["type"] == "requests"
    assert error["code"] == "rate_limit_exceeded"
    assert error["message"].startswith(
        "Rate limit reached for gpt-4o-mini in organization org-mock on requests per min "
        "(RPM): Limit 3, Used 3, Requested 1. Please try again in "
    )


def test_tpm_limit_answers_429_of_type_tokens_with_token_headers() -> None:
    with MockServer(MockConfig(tpm=100)) as server, client_for(server) as http:
        first = http.post("/chat/completions", json=chat(max_tokens=60))
        second = http.post("/chat/completions", json=chat(max_tokens=60))
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit-tokens"] == "100"
    prompt = first.json()["usage"]["prompt_tokens"]
    assert first.headers["x-ratelimit-remaining-tokens"] == str(100 - prompt - 60)
    assert second.status_code == 429
    assert second.json()["error"]["type"] == "tokens"
    assert int(second.headers["retry-after"]) >= 1


def test_reset_clears_the_rate_window() -> None:
    with MockServer(MockConfig(rpm=1)) as server, client_for(server) as http:
        statuses = [http.post("/chat/completions", json=chat()).status_code for _ in range(3)]
        server.reset()
        after_reset = http.post("/chat/completions", json=chat()).status_code
    assert statuses == [200, 429, 429]
    assert after_reset == 200


def test_durations_use_openai_format() -> None:
    assert _duration(0.12) == "120ms"
    assert _duration(1.0) == "1s"
    assert _duration(1.2) == "1.2s"
    assert _duration(360.0) == "6m0s"
    assert _duration(3723.5) == "1h2m3.5s"


# --------------------------------------------------------------------------- injected faults


def test_fail_first_fails_a_body_twice_then_succeeds_and_spares_other_bodies() -> None:
    config = MockConfig(fail_first=2, fail_status=429, retry_after_s=1.5)
    with MockServer(config) as server, client_for(server) as http:
        same = [http.post("/chat/completions", json=chat()) for _ in range(3)]
        other = http.post("/chat/completions", json=chat(seed=1))
    assert [r.status_code for r in same] == [429, 429, 200]
    assert same[0].headers["retry-after"] == "2"
    assert same[0].headers["retry-after-ms"] == "1500"
    assert same[0].json()["error"]["code"] == "rate_limit_exceeded"
    assert other.status_code == 429  # a different body has its own two failures
    with MockServer(MockConfig(fail_first=1, fail_status=503)) as server, client_for(server) as h:
        statuses = [h.post("/chat/completions", json=chat()).status_code for _ in range(2)]
        other_body = h.post("/chat/completions", json=chat(n=1))
        same_again = h.post("/chat/completions", json=chat())
    assert statuses == [503, 200]
    assert other_body.status_code == 503
    assert same_again.status_code == 200


def test_rate_500_of_one_answers_every_request_with_server_error() -> None:
    with MockServer(MockConfig(rate_500=1.0)) as server, client_for(server) as http:
        response = http.post("/chat/completions", json=chat())
    assert response.status_code == 500
    assert response.json() == {
        "error": {
            "message": "The server had an error while processing your request. Sorry about that!",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }


def test_invalid_json_fault_is_a_200_whose_body_does_not_parse() -> None:
    with MockServer(MockConfig(rate_invalid_json=1.0)) as server, client_for(server) as http:
        response = http.post("/chat/completions", json=chat())
        stats = server.stats()
    assert response.status_code == 200
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(response.content)
    assert stats.by_status == {200: 1}
    assert stats.completions == 0


def test_fail_status_zero_means_invalid_json() -> None:
    config = MockConfig(fail_first=1, fail_status=0)
    with MockServer(config) as server, client_for(server) as http:
        bad = http.post("/chat/completions", json=chat())
        good = http.post("/chat/completions", json=chat())
    assert bad.status_code == good.status_code == 200
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(bad.content)
    assert good.json()["object"] == "chat.completion"


def test_random_faults_are_reproducible_from_the_seed() -> None:
    def statuses(seed: int) -> list[int]:
        config = MockConfig(rate_429=0.3, rate_500=0.3, seed=seed)
        with MockServer(config) as server, client_for(server) as http:
            return [http.post("/chat/completions", json=chat()).status_code for _ in range(30)]

    first = statuses(7)
    assert first == statuses(7)
    assert {200, 429, 500} <= set(first)


def test_latency_delays_the_answer() -> None:
    with MockServer(MockConfig(latency_ms=80)) as server, client_for(server) as http:
        started = time.perf_counter()
        http.post("/chat/completions", json=chat())
        elapsed = time.perf_counter() - started
    assert elapsed >= 0.08


def test_config_rejects_impossible_values() -> None:
    with pytest.raises(ValueError, match="add up"):
        MockConfig(rate_429=0.6, rate_500=0.6)
    with pytest.raises(ValueError, match="fail_status"):
        MockConfig(fail_status=200)


# --------------------------------------------------------------------------- per-model faults


def faulty(**faults: ModelFaults) -> MockServer:
    """A server whose models (``-`` written ``_`` in the keyword) have the given faults."""
    return MockServer(MockConfig(model_faults={k.replace("_", "-"): v for k, v in faults.items()}))


def raw_post(server: MockServer, model: str, *, timeout: float = 5.0, **extra: Any) -> tuple[bytes, str]:
    """POST over a bare socket; returns every byte received and how it ended (eof | reset | timeout)."""
    body = orjson.dumps(chat(model, **extra))
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    received = b""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(head.encode() + body)
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            return received, "reset"
        except TimeoutError:
            return received, "timeout"
    return received, "eof"


def split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


@pytest.mark.parametrize(
    ("status", "kind", "code"),
    [
        (400, "invalid_request_error", "invalid_type"),
        (403, "request_forbidden", "unsupported_country_region_territory"),
        (404, "invalid_request_error", "model_not_found"),
        (408, "timeout", None),
        (409, "invalid_request_error", "conflict"),
        (413, "invalid_request_error", "request_too_large"),
        (422, "invalid_request_error", "invalid_value"),
        (500, "server_error", None),
        (502, "server_error", None),
        (503, "server_error", None),
        (504, "server_error", None),
        (520, "server_error", None),
        (524, "server_error", None),
        (529, "overloaded_error", None),
        (599, "server_error", None),
        (418, "invalid_request_error", None),
    ],
)
def test_status_fault_answers_that_status_with_an_openai_shaped_body(
    status: int, kind: str, code: str | None
) -> None:
    """A status fault answers its status with the {"error": {message, type, param, code}} body."""
    with faulty(m=ModelFaults("status", status=status)) as server, client_for(server) as http:
        response = http.post("/chat/completions", json=chat("m"))
        stats = server.stats()
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["x-request-id"].startswith("req_")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and (error["type"], error["code"]) == (kind, code)
    assert "retry-after" not in response.headers
    assert stats.by_status == {status: 1} and stats.faults == {"status": 1}
    assert stats.by_model == {"m": 1} and stats.completions == 0


def test_401_and_402_status_faults_use_openai_and_openrouter_bodies() -> None:
    """401 is OpenAI's invalid_api_key; 402 is OpenRouter's numeric-code "Insufficient credits"."""
    faults = {"a": ModelFaults("status", status=401), "b": ModelFaults("status", status=402)}
    with MockServer(MockConfig(model_faults=faults)) as server, client_for(server) as http:
        unauthorized = http.post("/chat/completions", json=chat("a"))
        no_credits = http.post("/chat/completions", json=chat("b"))
    assert unauthorized.status_code == 401
    assert unauthorized.json()["error"]["code"] == "invalid_api_key"
    assert no_credits.status_code == 402
    assert no_credits.json() == {
        "error": {
            "code": 402,
            "message": "Insufficient credits. Add more using https://openrouter.ai/settings/credits",
        }
    }


def test_5xx_fault_can_be_a_cdn_html_page() -> None:
    """html=True sends a 5xx as Cloudflare's HTML error page, not JSON."""
    with faulty(m=ModelFaults("status", status=522, html=True)) as server, client_for(server) as http:
        response = http.post("/chat/completions", json=chat("m"))
    assert response.status_code == 522
    assert response.headers["content-type"].startswith("text/html")
    assert "<title>522 Connection timed out</title>" in response.text and "cloudflare" in response.text


@pytest.mark.parametrize(
    ("how", "present", "absent"),
    [
        ("seconds", {"retry-after": "1"}, ("retry-after-ms",)),
        ("ms", {"retry-after-ms": "750"}, ("retry-after",)),
        ("both", {"retry-after": "1", "retry-after-ms": "750"}, ()),
        ("none", {}, ("retry-after", "retry-after-ms")),
    ],
)
def test_429_fault_says_retry_after_as_asked(
    how: str, present: dict[str, str], absent: tuple[str, ...]
) -> None:
    """A 429 status fault is rate_limit_exceeded with Retry-After in seconds, ms, both or none."""
    fault = ModelFaults("status", status=429, retry_after_s=0.75, retry_after=how)
    with faulty(m=fault) as server, client_for(server) as http:
        response = http.post("/chat/completions", json=chat("m"))
    assert response.status_code == 429
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
    assert error["message"].startswith("Rate limit reached for m in organization org-mock")
    assert {k: response.headers[k] for k in present} == present
    assert not any(k in response.headers for k in absent)


def test_429_fault_can_say_retry_after_as_an_http_date() -> None:
    """retry_after="date": Retry-After is an IMF-fixdate at least retry_after_s from now."""
    fault = ModelFaults("status", status=429, retry_after_s=1.0, retry_after="date")
    with faulty(m=fault) as server, client_for(server) as http:
        before = time.time()
        response = http.post("/chat/completions", json=chat("m"))
    value = response.headers["retry-after"]
    assert re.fullmatch(r"[A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} GMT", value)
    when = email.utils.parsedate_to_datetime(value).timestamp()
    assert before + 1.0 <= when <= time.time() + 2.0
    assert "retry-after-ms" not in response.headers


def test_insufficient_quota_fault_is_openai_429_or_openrouter_402() -> None:
    """insufficient_quota: OpenAI's 429 (no Retry-After), or OpenRouter's 402 with status=402."""
    faults = {
        "a": ModelFaults("insufficient_quota"),
        "b": ModelFaults("insufficient_quota", status=402),
    }
    with MockServer(MockConfig(model_faults=faults)) as server, client_for(server) as http:
        quota = http.post("/chat/completions", json=chat("a"))
        credits = http.post("/chat/completions", json=chat("b"))
    assert quota.status_code == 429
    assert quota.json() == {
        "error": {
            "message": "You exceeded your current quota, please check your plan and billing details. "
            "For more information on this error, read the docs: "
            "https://platform.openai.com/docs/guides/error-codes/api-errors.",
            "type": "insufficient_quota",
            "param": None,
            "code": "insufficient_quota",
        }
    }
    assert "retry-after" not in quota.headers and "retry-after-ms" not in quota.headers
    assert credits.status_code == 402
    assert credits.json()["error"]["code"] == 402
    assert credits.json()["error"]["message"].startswith("Insufficient credits")


def test_unauthorized_fault_is_401_invalid_api_key_or_a_403() -> None:
    """unauthorized: 401 invalid_api_key by default, 403 request_forbidden with status=403."""
    faults = {"a": ModelFaults("unauthorized"), "b": ModelFaults("unauthorized", status=403)}
    with MockServer(MockConfig(model_faults=faults)) as server, client_for(server) as http:
        a = http.post("/chat/completions", json=chat("a"))
        b = http.post("/chat/completions", json=chat("b"))
    assert a.status_code == 401
    assert a.json()["error"] == {
        "message": "Incorrect API key provided.",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }
    assert b.status_code == 403
    assert b.json()["error"]["type"] == "request_forbidden"


def test_context_length_fault_is_400_context_length_exceeded() -> None:
    """context_length: OpenAI's 400 with code context_length_exceeded on param messages."""
    with faulty(m=ModelFaults("context_length")) as server, client_for(server) as http:
        response = http.post("/chat/completions", json=chat("m"))
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["message"].startswith(
        "This model's maximum context length is 128000 tokens. However, your messages resulted in "
        "130000 tokens."
    )
    assert (error["type"], error["param"], error["code"]) == (
        "invalid_request_error",
        "messages",
        "context_length_exceeded",
    )


def test_content_filter_400_fault_is_azure_shaped() -> None:
    """content_filter_400: Azure's 400 with code content_filter, param prompt and status 400."""
    with faulty(m=ModelFaults("content_filter_400")) as server, client_for(server) as http:
        response = http.post("/chat/completions", json=chat("m"))
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["code"], error["param"], error["status"]) == ("content_filter", "prompt", 400)
    assert error["message"].startswith(
        "The response was filtered due to the prompt triggering Azure OpenAI's content management policy."
    )
    assert error["innererror"]["code"] == "ResponsibleAIPolicyViolation"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize(
    ("kind", "finish"),
    [("content_filter_finish", "content_filter"), ("finish_error", "error")],
)
def test_finish_reason_faults_are_200s_with_usage(kind: str, finish: str, stream: bool) -> None:
    """content_filter_finish / finish_error: a 200 ending with that finish_reason, usage billed."""
    with faulty(m=ModelFaults(kind)) as server, client_for(server) as http:
        extra: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
        response = http.post("/chat/completions", json=chat("m", **extra))
        stats = server.stats()
    assert response.status_code == 200
    if stream:
        chunks = sse_chunks(response.text)
        finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        assert finishes[-1] == finish and set(finishes[:-1]) == {None}
        content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        usage = chunks[-1]["usage"]
    else:
        [choice] = response.json()["choices"]
        assert choice["finish_reason"] == finish
        content = choice["message"]["content"]
        usage = response.json()["usage"]
    if kind == "content_filter_finish":
        assert not content
        if not stream:
            assert choice["message"]["content"] is None
    else:
        assert content.startswith("Mock answer ")
    assert usage["prompt_tokens"] > 0 and usage["total_tokens"] >= usage["prompt_tokens"]
    assert stats.faults == {kind: 1} and stats.by_status == {200: 1}


def test_bad_request_fault_is_400_or_422() -> None:
    """bad_request: 400 invalid_request_error by default, 422 with status=422."""
    faults = {"a": ModelFaults("bad_request"), "b": ModelFaults("bad_request", status=422)}
    with MockServer(MockConfig(model_faults=faults)) as server, client_for(server) as http:
        a = http.post("/chat/completions", json=chat("a"))
        b = http.post("/chat/completions", json=chat("b"))
    assert a.status_code == 400 and a.json()["error"]["type"] == "invalid_request_error"
    assert a.json()["error"]["code"] == "invalid_type"
    assert b.status_code == 422 and b.json()["error"]["type"] == "invalid_request_error"


def test_hang_fault_never_answers_and_does_not_block_other_requests() -> None:
    """hang: not a byte comes back, other requests are answered meanwhile, and stop is prompt."""
    server = faulty(m=ModelFaults("hang")).start()
    results: list[tuple[bytes, str]] = []
    hung = threading.Thread(target=lambda: results.append(raw_post(server, "m", timeout=30)))
    try:
        received, how = raw_post(server, "m", timeout=0.3)
        assert (received, how) == (b"", "timeout")
        hung.start()
        with client_for(server) as http:
            started = time.perf_counter()
            assert http.post("/chat/completions", json=chat()).status_code == 200
            assert time.perf_counter() - started < 0.2
        time.sleep(0.1)
        stats = server.stats()
        assert stats.faults == {"hang": 2} and stats.by_status == {200: 1}
    finally:
        started = time.perf_counter()
        server.stop()
        stopped_in = time.perf_counter() - started
        hung.join(5)
    assert stopped_in < 1.0
    assert results == [(b"", "reset")] or results == [(b"", "eof")]


def test_reset_fault_closes_the_connection_without_a_byte() -> None:
    """reset: the TCP connection is aborted before any response byte."""
    with faulty(m=ModelFaults("reset")) as server:
        received, how = raw_post(server, "m")
        with client_for(server) as http, pytest.raises(httpx.RemoteProtocolError):
            http.post("/chat/completions", json=chat("m"))
        stats = server.stats()
    assert received == b"" and how in ("reset", "eof")
    assert stats.faults == {"reset": 2} and stats.by_status == {} and stats.requests_total == 2


def test_truncated_fault_sends_fewer_bytes_than_its_content_length() -> None:
    """truncated: a 200 announcing Content-Length N, fewer than N bytes of JSON, then EOF."""
    with faulty(m=ModelFaults("truncated")) as server:
        received, how = raw_post(server, "m")
        with client_for(server) as http, pytest.raises(httpx.RemoteProtocolError):
            http.post("/chat/completions", json=chat("m"))
        stats = server.stats()
    status, headers, body = split_response(received)
    assert (status, how) == (200, "eof")
    assert headers["content-type"].startswith("application/json")
    assert 0 < len(body) < int(headers["content-length"])
    assert body.startswith(b'{"id":"chatcmpl-')
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(body)
    assert stats.faults == {"truncated": 2} and stats.by_status == {} and stats.completions == 0


def test_truncated_stream_ends_without_its_last_chunk() -> None:
    """truncated, streamed: chunked SSE that stops mid-answer, without [DONE] or the end chunk."""
    with faulty(m=ModelFaults("truncated")) as server:
        received, how = raw_post(server, "m", stream=True)
    status, headers, body = split_response(received)
    assert (status, how) == (200, "eof")
    assert headers["transfer-encoding"] == "chunked"
    assert b"data: {" in body and b"[DONE]" not in body
    assert not body.endswith(b"0\r\n\r\n")


def test_invalid_json_fault_is_a_200_that_does_not_parse() -> None:
    """invalid_json: a 200 with a JSON content type whose body is not JSON."""
    with faulty(m=ModelFaults("invalid_json")) as server, client_for(server) as http:
        response = http.post("/chat/completions", json=chat("m"))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(response.content)


def test_fault_with_first_n_is_transient_per_body_and_spares_other_models() -> None:
    """first=2: each distinct body fails twice then succeeds; models without faults never fail."""
    with faulty(m=ModelFaults("status", status=503, first=2)) as server, client_for(server) as http:
        same = [http.post("/chat/completions", json=chat("m")).status_code for _ in range(3)]
        other_body = http.post("/chat/completions", json=chat("m", seed=1)).status_code
        clean = [http.post("/chat/completions", json=chat("gpt-4o-mini")).status_code for _ in range(3)]
        server.reset()
        after_reset = http.post("/chat/completions", json=chat("m")).status_code
    assert same == [503, 503, 200]
    assert other_body == 503
    assert clean == [200, 200, 200]
    assert after_reset == 503


def test_fault_with_match_hits_only_bodies_containing_the_text() -> None:
    """match="POISON": only requests whose body contains it misbehave (a poison row)."""
    fault = ModelFaults("bad_request", status=422, match="POISON")
    poison = [{"role": "user", "content": "a POISON row"}]
    with faulty(m=fault) as server, client_for(server) as http:
        bad = http.post("/chat/completions", json={"model": "m", "messages": poison})
        good = http.post("/chat/completions", json=chat("m"))
    assert (bad.status_code, good.status_code) == (422, 200)


def test_a_faulty_model_is_served_even_when_models_does_not_list_it() -> None:
    """A model named in model_faults is known to the server; other unknown models are 404."""
    config = MockConfig(models=("gpt-4o-mini",), model_faults={"m": ModelFaults("finish_error", first=1)})
    with MockServer(config) as server, client_for(server) as http:
        first = http.post("/chat/completions", json=chat("m"))
        second = http.post("/chat/completions", json=chat("m"))
        unknown = http.post("/chat/completions", json=chat("gpt-9"))
    assert first.json()["choices"][0]["finish_reason"] == "error"
    assert second.json()["choices"][0]["finish_reason"] == "stop"
    assert unknown.status_code == 404


def test_model_faults_reject_impossible_values() -> None:
    """Unknown kinds, missing or wrong statuses and bad Retry-After formats are ValueErrors."""
    with pytest.raises(ValueError, match="kind"):
        ModelFaults("explode")
    with pytest.raises(ValueError, match="HTTP error status"):
        ModelFaults("status")
    with pytest.raises(ValueError, match="HTTP error status"):
        ModelFaults("status", status=200)
    with pytest.raises(ValueError, match="429, 402"):
        ModelFaults("insufficient_quota", status=401)
    with pytest.raises(ValueError, match="takes no status"):
        ModelFaults("hang", status=500)
    with pytest.raises(ValueError, match="first"):
        ModelFaults("reset", first=-1)
    with pytest.raises(ValueError, match="retry_after"):
        ModelFaults("status", status=429, retry_after="soon")
    with pytest.raises(ValueError, match="html"):
        ModelFaults("status", status=404, html=True)
    with pytest.raises(ValueError, match="model_faults"):
        MockConfig(model_faults={"m": "hang"})  # type: ignore[dict-item]
    config = MockConfig(model_faults={"m": ModelFaults("hang")})
    with pytest.raises(TypeError):
        config.model_faults["x"] = ModelFaults("reset")  # type: ignore[index]
    assert config == MockConfig(model_faults={"m": ModelFaults("hang")})
    assert set(FAULT_KINDS) >= {"status", "hang", "reset", "truncated", "invalid_json"}


@pytest.mark.parametrize(
    ("text", "model", "fault"),
    [
        ("mock-small=503", "mock-small", ModelFaults("status", status=503)),
        ("mock-small=503:2", "mock-small", ModelFaults("status", status=503, first=2)),
        ("m=429", "m", ModelFaults("status", status=429)),
        ("m=429-date:1", "m", ModelFaults("status", status=429, first=1, retry_after="date")),
        ("m=429-ms", "m", ModelFaults("status", status=429, retry_after="ms")),
        ("openai/gpt-4o:free=hang", "openai/gpt-4o:free", ModelFaults("hang")),
        ("m=insufficient_quota", "m", ModelFaults("insufficient_quota")),
        ("m=402", "m", ModelFaults("status", status=402)),
        ("m=truncated:3", "m", ModelFaults("truncated", first=3)),
    ],
)
def test_parse_fault_reads_model_kind_and_count(text: str, model: str, fault: ModelFaults) -> None:
    """The --fault grammar MODEL=KIND[:N]: statuses, 429-date / 429-ms, kind names."""
    assert parse_fault(text) == (model, fault)
    assert parse_fault(text, retry_after_s=0.5)[1].retry_after_s == 0.5


@pytest.mark.parametrize(
    "text", ["m", "=hang", "m=", "m=explode", "m=status", "m=200", "m=hang:0", "m=hang:x"]
)
def test_parse_fault_rejects_bad_text(text: str) -> None:
    """Malformed --fault values are ValueErrors that quote the text."""
    with pytest.raises(ValueError, match=re.escape(repr(text))):
        parse_fault(text)


def test_cli_fault_flag_makes_a_model_misbehave() -> None:
    """`pipeline mock-server --fault m=503:1 --fault h=hang`: m fails once per body, h hangs."""
    args = ["--port", "0", "--fault", "m=503:1", "--fault", "q=insufficient_quota"]
    with subprocess.Popen(
        [sys.executable, "-m", "pipeline", "mock-server", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        url = line.split()[-1]
        with httpx.Client(base_url=url, timeout=10) as http:
            statuses = [http.post("/chat/completions", json=chat("m")).status_code for _ in range(2)]
            quota = http.post("/chat/completions", json=chat("q"))
            clean = http.post("/chat/completions", json=chat()).status_code
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)
    assert statuses == [503, 200]
    assert quota.status_code == 429 and quota.json()["error"]["code"] == "insufficient_quota"
    assert clean == 200


def test_cli_rejects_a_bad_fault_and_documents_the_kinds() -> None:
    """A bad --fault is a usage error (exit 2); --help lists every fault kind."""
    from click.testing import CliRunner

    from pipeline.cli import main as cli_main

    bad = CliRunner().invoke(cli_main, ["mock-server", "--fault", "m=explode"])
    assert bad.exit_code == 2 and "unknown fault 'explode'" in bad.output
    twice = CliRunner().invoke(cli_main, ["mock-server", "--fault", "m=hang", "--fault", "m=reset"])
    assert twice.exit_code == 2 and "second fault" in twice.output
    text = CliRunner().invoke(cli_main, ["mock-server", "--help"]).output
    assert "--fault MODEL=KIND[:N]" in text
    for kind in FAULT_KINDS:
        assert kind == "status" or kind in text
    assert "429-date" in text and "429-ms" in text


# --------------------------------------------------------------------------- structured output

PERSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 3, "maxLength": 20},
        "age": {"type": "integer", "minimum": 18, "exclusiveMaximum": 30},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "mood": {"enum": ["happy", "sad", "meh"]},
        "kind": {"const": "person"},
        "email": {"type": "string", "format": "email"},
        "nickname": {"type": ["string", "null"]},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 3, "maxItems": 5},
        "address": {"$ref": "#/$defs/Address"},
        "pet": {"anyOf": [{"$ref": "#/$defs/Pet"}, {"type": "null"}]},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "score", "mood", "kind", "tags", "address", "pet", "active"],
    "additionalProperties": False,
    "$defs": {
        "Address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "Pet": {
            "type": "object",
            "properties": {
                "species": {"enum": ["cat", "dog"]},
                "legs": {"type": "integer", "multipleOf": 2, "minimum": 2, "maximum": 4},
            },
            "required": ["species", "legs"],
        },
    },
}


def test_json_schema_answer_is_json_that_validates(client: httpx.Client) -> None:
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "person", "strict": True, "schema": PERSON_SCHEMA},
    }
    body = client.post("/chat/completions", json=chat(response_format=response_format)).json()
    content = body["choices"][0]["message"]["content"]
    jsonschema.validate(orjson.loads(content), PERSON_SCHEMA)
    assert body["usage"]["completion_tokens"] == math.ceil(len(content) / 4)


@pytest.mark.parametrize(
    "schema",
    [
        PERSON_SCHEMA,
        {"type": "array", "items": {"enum": [1, 2, 3]}, "minItems": 2, "uniqueItems": True},
        {"oneOf": [{"type": "integer", "minimum": 5, "maximum": 5}, {"type": "string"}]},
        {"allOf": [{"properties": {"a": {"type": "integer"}}, "required": ["a"]}]},
        {
            "type": "object",
            "properties": {"child": {"$ref": "#"}, "v": {"type": "number", "multipleOf": 0.5}},
            "required": ["v"],
        },
        {"type": "string", "format": "date-time"},
        {"type": "object", "minProperties": 2, "additionalProperties": {"type": "integer"}},
    ],
)
def test_fake_instances_validate_for_many_seeds(schema: dict[str, Any]) -> None:
    for seed in range(25):
        jsonschema.validate(fake_instance(schema, seed), schema)
    assert fake_instance(schema, 3) == fake_instance(schema, 3)


def test_unusable_schema_is_400_on_response_format(client: httpx.Client) -> None:
    schema = {"type": "object", "properties": {"x": {"type": "array", "minItems": "many"}}}
    response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    response = client.post("/chat/completions", json=chat(response_format=response_format))
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "response_format"


def test_json_object_answer_is_an_object_with_answer(client: httpx.Client) -> None:
    body = client.post("/chat/completions", json=chat(response_format={"type": "json_object"})).json()
    parsed = orjson.loads(body["choices"][0]["message"]["content"])
    assert set(parsed) == {"answer"}


WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["c", "f"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
NOOP_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {"name": "noop", "parameters": {"type": "object"}},
}


@pytest.mark.parametrize(
    ("tool_choice", "name"),
    [
        ("required", "noop"),
        ({"type": "function", "function": {"name": "get_weather"}}, "get_weather"),
    ],
)
def test_forced_tool_choice_answers_with_matching_tool_calls(
    client: httpx.Client, tool_choice: Any, name: str
) -> None:
    tools = [NOOP_TOOL, WEATHER_TOOL]
    body = client.post("/chat/completions", json=chat(tools=tools, tool_choice=tool_choice)).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert re.fullmatch(r"call_[0-9a-f]{24}", call["id"])
    assert call["type"] == "function"
    assert call["function"]["name"] == name
    schema = next(t for t in tools if t["function"]["name"] == name)["function"]["parameters"]
    jsonschema.validate(orjson.loads(call["function"]["arguments"]), schema)


def test_auto_tool_choice_answers_with_content(client: httpx.Client) -> None:
    body = client.post("/chat/completions", json=chat(tools=[WEATHER_TOOL])).json()
    assert body["choices"][0]["finish_reason"] == "stop"
    assert "tool_calls" not in body["choices"][0]["message"]


# --------------------------------------------------------------------------- streaming


def test_stream_reassembles_to_the_non_streamed_answer_with_usage_chunk(
    client: httpx.Client,
) -> None:
    plain = client.post("/chat/completions", json=chat()).json()
    streamed = client.post(
        "/chat/completions", json=chat(stream=True, stream_options={"include_usage": True})
    )
    assert streamed.status_code == 200
    assert streamed.headers["content-type"].startswith("text/event-stream")
    chunks = sse_chunks(streamed.text)
    assert len({(c["id"], c["created"], c["model"]) for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["usage"] is None for c in chunks[:-1])
    *body, finish, usage = chunks
    assert finish["choices"][0]["delta"] == {}
    assert finish["choices"][0]["finish_reason"] == "stop"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in body)
    assert text == plain["choices"][0]["message"]["content"]
    assert all(len(c["choices"][0]["delta"].get("content", "")) <= 16 for c in body)
    assert usage["choices"] == []
    assert usage["usage"] == plain["usage"]


def test_stream_without_usage_has_no_usage_key(client: httpx.Client) -> None:
    chunks = sse_chunks(client.post("/chat/completions", json=chat(stream=True)).text)
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_stream_of_a_tool_call_reassembles_the_arguments(client: httpx.Client) -> None:
    plain = client.post("/chat/completions", json=chat(tools=[WEATHER_TOOL], tool_choice="required")).json()
    chunks = sse_chunks(
        client.post(
            "/chat/completions",
            json=chat(tools=[WEATHER_TOOL], tool_choice="required", stream=True),
        ).text
    )
    first = chunks[0]["choices"][0]["delta"]["tool_calls"][0]
    assert first["function"] == {"name": "get_weather", "arguments": ""}
    arguments = "".join(
        call["function"]["arguments"]
        for c in chunks
        for call in c["choices"][0]["delta"].get("tool_calls", [])
    )
    expected = plain["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
    assert arguments == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_stream_errors_before_start_are_plain_json(client: httpx.Client) -> None:
    response = client.post("/chat/completions", json=chat("gpt-9", stream=True))
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


# --------------------------------------------------------------------------- stored completions


def test_store_retrieve_by_id_and_list_by_metadata(client: httpx.Client) -> None:
    ids = []
    for index, team in enumerate(["red", "blue", "red"]):
        body = chat(store=True, metadata={"team": team, "n": str(index)})
        ids.append(client.post("/chat/completions", json=body).json()["id"])
    client.post("/chat/completions", json=chat())  # not stored
    fetched = client.get(f"/chat/completions/{ids[1]}")
    assert fetched.status_code == 200
    assert fetched.json()["id"] == ids[1]
    assert fetched.json()["object"] == "chat.completion"
    assert fetched.json()["metadata"] == {"team": "blue", "n": "1"}
    red = client.get("/chat/completions", params={"metadata[team]": "red"}).json()
    assert red["object"] == "list"
    assert [item["id"] for item in red["data"]] == [ids[0], ids[2]]
    assert (red["first_id"], red["last_id"], red["has_more"]) == (ids[0], ids[2], False)
    page = client.get("/chat/completions", params={"limit": 1, "after": ids[0]}).json()
    assert [item["id"] for item in page["data"]] == [ids[1]]
    assert page["has_more"] is True
    messages = client.get(f"/chat/completions/{ids[0]}/messages").json()
    assert messages["data"][0]["content"] == HELLO[0]["content"]
    missing = client.get("/chat/completions/chatcmpl-nope")
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "invalid_request_error"


def test_streamed_stored_completion_is_retrievable(client: httpx.Client) -> None:
    chunks = sse_chunks(client.post("/chat/completions", json=chat(store=True, stream=True)).text)
    stored = client.get(f"/chat/completions/{chunks[0]['id']}").json()
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert stored["choices"][0]["message"]["content"] == text


# --------------------------------------------------------------------------- stats and models


def test_stats_count_requests_statuses_models_and_completions(
    server: MockServer, client: httpx.Client
) -> None:
    client.post("/chat/completions", json=chat())
    client.post("/chat/completions", json=chat("mock-small", stream=True))
    client.post("/chat/completions", json=chat("gpt-9"))
    client.post("/chat/completions", json={"messages": HELLO})
    client.get("/models")
    stats = server.stats()
    assert stats == MockStats(
        requests_total=4,
        by_status={200: 2, 404: 1, 400: 1},
        by_model={"gpt-4o-mini": 1, "mock-small": 1, "gpt-9": 1},
        completions=2,
    )
    over_http = client.get(server.base_url.removesuffix("/v1") + "/mock/stats").json()
    assert over_http == stats.to_dict()
    assert over_http["by_status"] == {"200": 2, "400": 1, "404": 1}
    assert client.post(server.base_url.removesuffix("/v1") + "/mock/reset").status_code == 200
    assert server.stats().requests_total == 0


def test_models_endpoint_lists_configured_models(client: httpx.Client) -> None:
    body = client.get("/models").json()
    assert body == {
        "object": "list",
        "data": [
            {"id": "gpt-4o-mini", "object": "model", "created": 0, "owned_by": "mock"},
            {"id": "mock-small", "object": "model", "created": 0, "owned_by": "mock"},
        ],
    }


# --------------------------------------------------------------------------- running


def test_serve_runs_in_the_current_loop_until_cancelled() -> None:
    async def scenario() -> int:
        ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(serve(MockConfig(), ready=ready.set_result))
        port = await asyncio.wait_for(ready, 5)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}/v1") as http:
            status = (await http.post("/chat/completions", json=chat())).status_code
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return status

    assert asyncio.run(scenario()) == 200


def test_cli_entry_announces_url_and_exits_cleanly_on_sigterm() -> None:
    code = "from pipeline.mock import MockConfig, main; main(MockConfig())"
    with subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        match = re.fullmatch(r"mock server listening on (http://127\.0\.0\.1:\d+/v1)", line)
        assert match, line
        with httpx.Client(base_url=match.group(1), timeout=10) as http:
            assert http.post("/chat/completions", json=chat()).status_code == 200
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert err == ""


def test_start_raises_when_the_port_is_taken(server: MockServer) -> None:
    with pytest.raises(OSError):
        MockServer(MockConfig(port=server.port)).start()


def test_server_can_be_stopped_and_started_again() -> None:
    server = MockServer()
    server.start()
    port = server.port
    server.stop()
    server.stop()
    with pytest.raises(httpx.ConnectError), httpx.Client() as http:
        http.get(f"http://127.0.0.1:{port}/v1/models")
    with server, client_for(server) as http:
        assert http.get("/models").status_code == 200


# --------------------------------------------------------------------------- self-check


def _throughput(seconds: float, concurrency: int) -> None:
    """Serve from a child process (the CLI entry) and hammer it with aiohttp keep-alive."""
    import aiohttp

    body = orjson.dumps(chat(max_tokens=64))
    code = "from pipeline.mock import MockConfig, main; main(MockConfig())"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stdout is not None
        url = proc.stdout.readline().split()[-1] + "/chat/completions"

        async def worker(session: aiohttp.ClientSession, deadline: float) -> int:
            done = 0
            while time.perf_counter() < deadline:
                async with session.post(url, data=body) as response:
                    await response.read()
                    done += response.status == 200
            return done

        async def run() -> float:
            connector = aiohttp.TCPConnector(limit=concurrency)
            async with aiohttp.ClientSession(connector=connector) as session:
                warm = time.perf_counter() + 0.5
                await asyncio.gather(*(worker(session, warm) for _ in range(concurrency)))
                started = time.perf_counter()
                deadline = started + seconds
                counts = await asyncio.gather(*(worker(session, deadline) for _ in range(concurrency)))
                return sum(counts) / (time.perf_counter() - started)

        try:
            cpu_before, wall_before = _cpu_seconds(proc.pid), time.perf_counter()
            rate = asyncio.run(run())
            cpu = (_cpu_seconds(proc.pid) - cpu_before) / (time.perf_counter() - wall_before)
        finally:
            proc.send_signal(signal.SIGTERM)
    print(f"{rate:,.0f} req/s ({concurrency} connections, {seconds:g} s, 0 ms latency)")
    if cpu > 0:
        print(f"server process used {cpu:.0%} of one core: ~{rate / cpu:,.0f} req/s per core")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux ``/proc``; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    _throughput(
        float(sys.argv[1]) if len(sys.argv) > 1 else 5.0,
        int(sys.argv[2]) if len(sys.argv) > 2 else 64,
    )
