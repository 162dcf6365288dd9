"""Unit tests of the chat client (over httpx.MockTransport) and of the aiohttp transport (over a
real aiohttp server on loopback)."""

from __future__ import annotations

import asyncio
import email.utils
import gzip
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web

from pipeline.client import ChatClient, parse_duration, parse_rate_headers
from pipeline.errors import (
    ClientError,
    HTTPStatusError,
    InvalidResponse,
    RateLimited,
    RequestError,
    ServerError,
    TransportError,
)
from pipeline.records import Completion, RateInfo, Usage
from pipeline.spec import EndpointSpec, RetrySpec
from pipeline.transport import AiohttpTransport

BASE = "https://api.example.com/v1"
MESSAGES = [{"role": "user", "content": "Hello"}]
Handler = Callable[[httpx.Request], httpx.Response]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def client_for(
    handler: Handler,
    *,
    api_key: str | None = "sk-test-key",
    headers: tuple[tuple[str, str], ...] = (),
) -> ChatClient:
    endpoint = EndpointSpec(name="e", base_url=BASE, headers=headers)
    return ChatClient(
        endpoint,
        base_url=BASE + "/",
        api_key=api_key,
        retry=RetrySpec(),
        transport=httpx.MockTransport(handler),
    )


async def complete(handler: Handler, body: dict[str, Any] | None = None, **kw: Any) -> tuple[Completion, int]:
    """One call through a fresh client, closed afterwards."""
    client = client_for(handler, **kw)
    try:
        return await client.complete("gpt-4o-mini", body or {"messages": MESSAGES})
    finally:
        await client.aclose()


async def failure(handler: Handler) -> RequestError:
    """The RequestError one call raises."""
    with pytest.raises(RequestError) as info:
        await complete(handler)
    return info.value


def answer(
    status: int, body: Any = None, *, raw: bytes | None = None, headers: dict[str, str] | None = None
) -> Handler:
    content = raw if raw is not None else orjson.dumps(body)
    return lambda request: httpx.Response(status, content=content, headers=headers)


def completion_body(**choice: Any) -> dict[str, Any]:
    message = {"role": "assistant", "content": "Hi!"}
    message.update(choice.pop("message", {}))
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [{"index": 0, "finish_reason": "stop", "message": message, **choice}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12},
    }


# ----------------------------------------------------------------------------- the request


@pytest.mark.anyio
async def test_request_is_a_bearer_post_to_chat_completions_with_model_first() -> None:
    """The client POSTs {base}/chat/completions with the key, the endpoint headers, and model first."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=completion_body())

    body = {"messages": MESSAGES, "temperature": 0, "max_tokens": 5}
    _, status = await complete(handler, body, headers=(("X-Title", "demo"),))

    (request,) = seen
    assert status == 200
    assert request.method == "POST"
    assert str(request.url) == "https://api.example.com/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer sk-test-key"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["x-title"] == "demo"
    sent = orjson.loads(request.content)
    assert list(sent) == ["model", "messages", "temperature", "max_tokens"]
    assert sent == {"model": "gpt-4o-mini", **body}


@pytest.mark.anyio
async def test_no_authorization_header_without_a_key() -> None:
    """A client built with api_key=None sends no Authorization header at all."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=completion_body())

    await complete(handler, api_key=None)
    assert "authorization" not in seen[0].headers


# ----------------------------------------------------------------------------- parsing answers


@pytest.mark.anyio
async def test_full_openai_response_parses_every_field() -> None:
    """Content, tool calls, reasoning, usage details, OpenRouter cost, provider and request id all parse."""
    tool_calls = [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    body = {
        "id": "chatcmpl-42",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "openai/gpt-4o-mini",
        "provider": "OpenAI",
        "system_fingerprint": "fp_abc",
        "choices": [
            {
                "index": 0,
                "finish_reason": "tool_calls",
                "message": {
                    "role": "assistant",
                    "content": "Calling f.",
                    "refusal": None,
                    "reasoning": "I should call f.",
                    "tool_calls": tool_calls,
                },
            }
        ],
        "usage": {
            "prompt_tokens": 100,
            "completion_tokens": 50,
            "total_tokens": 150,
            "prompt_tokens_details": {"cached_tokens": 20, "audio_tokens": 3},
            "completion_tokens_details": {
                "reasoning_tokens": 10,
                "audio_tokens": 4,
                "accepted_prediction_tokens": 5,
                "rejected_prediction_tokens": 6,
            },
            "cost": 0.00012345,
            "cost_details": {"upstream_inference_cost": 0.0001},
        },
    }
    raw = orjson.dumps(body)

    completion, status = await complete(answer(200, raw=raw, headers={"x-request-id": "req-9"}))

    assert status == 200
    assert completion.raw == raw
    assert completion.response_id == "chatcmpl-42"
    assert completion.model == "openai/gpt-4o-mini"
    assert completion.provider == "OpenAI"
    assert completion.system_fingerprint == "fp_abc"
    assert completion.created == 1700000000
    assert completion.provider_request_id == "req-9"
    choice = completion.first
    assert (choice.index, choice.finish_reason, choice.content) == (0, "tool_calls", "Calling f.")
    assert choice.reasoning == "I should call f."
    assert choice.refusal is None
    assert choice.tool_calls == tool_calls
    usage = completion.usage
    assert usage == Usage(
        prompt=100,
        completion=50,
        total=150,
        cached=20,
        reasoning=10,
        audio_prompt=3,
        audio_completion=4,
        accepted_prediction=5,
        rejected_prediction=6,
        reported_cost=Decimal("0.00012345"),
        upstream_cost=Decimal("0.0001"),
        raw=body["usage"],
    )
    assert usage is not None and isinstance(usage.reported_cost, Decimal)


@pytest.mark.parametrize(
    ("message", "field", "expected"),
    [
        pytest.param(
            {"reasoning_content": "step by step"}, "reasoning", "step by step", id="reasoning-content"
        ),
        pytest.param({"reasoning": "thought"}, "reasoning", "thought", id="reasoning"),
        pytest.param({"content": None, "refusal": "I can't help."}, "refusal", "I can't help.", id="refusal"),
        pytest.param({"content": None, "refusal": "x"}, "content", None, id="null-content"),
    ],
)
@pytest.mark.anyio
async def test_message_variants_parse(message: dict[str, Any], field: str, expected: str | None) -> None:
    """Reasoning comes from ``reasoning`` or vLLM's ``reasoning_content``; refusals and null content parse."""
    completion, _ = await complete(answer(200, completion_body(message=message)))
    assert getattr(completion.first, field) == expected


@pytest.mark.anyio
async def test_two_choices_parse_in_order() -> None:
    """A response to n=2 holds both choices."""
    body = completion_body()
    body["choices"] = [
        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "A"}},
        {"index": 1, "finish_reason": "length", "message": {"role": "assistant", "content": "B"}},
    ]
    completion, _ = await complete(answer(200, body), {"messages": MESSAGES, "n": 2})
    assert [(c.index, c.content, c.finish_reason) for c in completion.choices] == [
        (0, "A", "stop"),
        (1, "B", "length"),
    ]


# ----------------------------------------------------------------------------- error answers


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param({"retry-after-ms": "1500"}, 1.5, id="retry-after-ms"),
        pytest.param({"Retry-After": "7"}, 7.0, id="retry-after-seconds"),
        pytest.param({"retry-after-ms": "250", "Retry-After": "7"}, 0.25, id="ms-wins"),
        pytest.param({}, None, id="none"),
    ],
)
@pytest.mark.anyio
async def test_429_is_rate_limited_with_retry_after(headers: dict[str, str], expected: float | None) -> None:
    """A 429 raises RateLimited carrying the server's delay in seconds."""
    body = {"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}}
    exc = await failure(answer(429, body, headers=headers))
    assert isinstance(exc, RateLimited)
    assert exc.status == 429
    assert exc.code == "rate_limit_exceeded"
    assert exc.retry_after == expected


@pytest.mark.anyio
async def test_429_retry_after_as_http_date() -> None:
    """A Retry-After HTTP date becomes the seconds from now until then."""
    when = email.utils.formatdate(time.time() + 120, usegmt=True)
    exc = await failure(answer(429, {"error": {"message": "slow down"}}, headers={"Retry-After": when}))
    assert isinstance(exc, RateLimited)
    assert exc.retry_after is not None
    assert 110 <= exc.retry_after <= 121


@pytest.mark.parametrize(
    ("status", "raw", "kind", "code", "message"),
    [
        pytest.param(
            401,
            b'{"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",'
            b' "code": "invalid_api_key"}}',
            ClientError,
            "invalid_api_key",
            "Incorrect API key provided",
            id="openai-401",
        ),
        pytest.param(
            400,
            b'{"error": {"message": "Bad temperature", "type": "invalid_request_error", "code": null}}',
            ClientError,
            "invalid_request_error",
            "Bad temperature",
            id="openai-400-type-as-code",
        ),
        pytest.param(
            404,
            b'{"error": {"message": "The model x does not exist", "type": "invalid_request_error",'
            b' "code": "model_not_found"}}',
            ClientError,
            "model_not_found",
            "The model x does not exist",
            id="openai-404",
        ),
        pytest.param(
            400,
            b'{"object": "error", "message": "This model\'s maximum context length is 4096 tokens.",'
            b' "type": "BadRequestError", "param": null, "code": 400}',
            ClientError,
            "BadRequestError",
            "maximum context length is 4096 tokens",
            id="vllm-400",
        ),
        pytest.param(404, b'{"detail": "Not Found"}', ClientError, None, "Not Found", id="fastapi-404"),
        pytest.param(
            422,
            b'{"detail": [{"loc": ["body", "messages"], "msg": "field required"}]}',
            ClientError,
            None,
            "field required",
            id="fastapi-422-list",
        ),
        pytest.param(404, b"404 page not found", ClientError, None, "404 page not found", id="plain-text"),
        pytest.param(400, b"", ClientError, None, "HTTP 400", id="empty-body"),
        pytest.param(
            500,
            b'{"error": {"message": "The server had an error", "type": "server_error"}}',
            ServerError,
            "server_error",
            "The server had an error",
            id="openai-500",
        ),
        pytest.param(503, b"Service Unavailable", ServerError, None, "Service Unavailable", id="plain-503"),
    ],
)
@pytest.mark.anyio
async def test_error_status_becomes_typed_error_with_code_and_message(
    status: int, raw: bytes, kind: type[HTTPStatusError], code: str | None, message: str
) -> None:
    """Error answers of every common shape raise the right class with status, code and message."""
    exc = await failure(answer(status, raw=raw, headers={"x-request-id": "req-1"}))
    assert type(exc) is kind
    assert exc.status == status
    assert exc.code == code
    assert message in exc.message
    assert str(exc).startswith(f"HTTP {status}: ")
    assert exc.provider_request_id == "req-1"


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b'{"id": "x", "choices": [', id="truncated-json"),
        pytest.param(b"<html>oops</html>", id="html"),
        pytest.param(b"", id="empty"),
        pytest.param(b'{"id": "x", "choices": []}', id="empty-choices"),
        pytest.param(b'{"id": "x"}', id="no-choices"),
        pytest.param(b'["not", "an", "object"]', id="not-an-object"),
        pytest.param(b'{"choices": ["x"]}', id="choice-not-an-object"),
    ],
)
@pytest.mark.anyio
async def test_unusable_200_is_invalid_response(raw: bytes) -> None:
    """A 200 whose body is not a usable chat.completion raises InvalidResponse."""
    exc = await failure(answer(200, raw=raw))
    assert type(exc) is InvalidResponse


@pytest.mark.anyio
async def test_openrouter_error_in_a_200_body_is_a_server_error() -> None:
    """OpenRouter's upstream error inside a 200 body raises ServerError with the body's status."""
    exc = await failure(answer(200, {"error": {"code": 502, "message": "Upstream provider failed"}}))
    assert type(exc) is ServerError
    assert exc.status == 502
    assert "Upstream provider failed" in exc.message


@pytest.mark.anyio
async def test_finish_reason_error_is_invalid_response_carrying_the_completion() -> None:
    """finish_reason "error" raises InvalidResponse(code finish_reason_error) holding the parsed answer."""
    body = completion_body(finish_reason="error", message={"content": "partial"})
    exc = await failure(answer(200, body))
    assert type(exc) is InvalidResponse
    assert exc.code == "finish_reason_error"
    assert isinstance(exc.completion, Completion)
    assert exc.completion.first.content == "partial"
    assert exc.completion.usage is not None
    assert (exc.completion.usage.prompt, exc.completion.usage.completion) == (10, 2)


@pytest.mark.parametrize(
    ("error", "what"),
    [
        pytest.param(httpx.ConnectError, "connect", id="connect"),
        pytest.param(httpx.ConnectTimeout, "connect_timeout", id="connect-timeout"),
        pytest.param(httpx.ReadTimeout, "read_timeout", id="read-timeout"),
        pytest.param(httpx.RemoteProtocolError, "truncated", id="remote-protocol"),
        pytest.param(httpx.ReadError, "reset", id="read-error"),
    ],
)
@pytest.mark.anyio
async def test_httpx_failures_become_transport_errors(error: type[httpx.TransportError], what: str) -> None:
    """httpx's own exceptions never escape: each becomes TransportError with its kind in ``what``."""

    def handler(request: httpx.Request) -> httpx.Response:
        raise error("boom", request=request)

    exc = await failure(handler)
    assert type(exc) is TransportError
    assert exc.what == what
    assert isinstance(exc.__cause__, error)


# ----------------------------------------------------------------------------- the aiohttp transport


@pytest.fixture
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The transport trusts the environment: make sure no proxy stands between it and loopback."""
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)


AioHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def aiohttp_server(handler: AioHandler) -> AsyncIterator[str]:
    """Serve ``handler`` for every path on 127.0.0.1 at a free port; yields the base URL."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


@pytest.mark.usefixtures("no_proxy")
@pytest.mark.anyio
async def test_aiohttp_transport_json_round_trip_through_the_client() -> None:
    """ChatClient over AiohttpTransport sends the JSON body and headers and parses the answer."""
    received: list[tuple[str, str, dict[str, Any]]] = []

    async def handler(request: web.Request) -> web.Response:
        data = await request.json()
        received.append((request.method, request.path, data))
        reply = completion_body(message={"content": f"echo: {data['messages'][0]['content']}"})
        return web.json_response(
            reply, headers={"x-request-id": "req-aio", "authz": request.headers["Authorization"]}
        )

    async with aiohttp_server(handler) as base:
        endpoint = EndpointSpec(name="local", base_url=base)
        client = ChatClient(
            endpoint,
            base_url=base + "/v1",
            api_key="sk-local",
            retry=RetrySpec(),
            transport=AiohttpTransport(),
        )
        try:
            completion, status = await client.complete("m", {"messages": MESSAGES})
        finally:
            await client.aclose()

    assert status == 200
    assert received == [("POST", "/v1/chat/completions", {"model": "m", "messages": MESSAGES})]
    assert completion.first.content == "echo: Hello"
    assert completion.provider_request_id == "req-aio"


@pytest.mark.usefixtures("no_proxy")
@pytest.mark.anyio
async def test_aiohttp_transport_decodes_gzip_exactly_once() -> None:
    """A gzip-encoded body arrives decoded once: the exact original bytes, not still compressed or broken."""
    original = orjson.dumps(completion_body(message={"content": "x" * 5000}))

    async def handler(request: web.Request) -> web.Response:
        return web.Response(
            body=gzip.compress(original),
            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        )

    async with aiohttp_server(handler) as base, httpx.AsyncClient(transport=AiohttpTransport()) as http:
        response = await http.get(base + "/gz")

    assert response.headers["content-encoding"] == "gzip"
    assert response.content == original


@pytest.mark.usefixtures("no_proxy")
@pytest.mark.anyio
async def test_aiohttp_transport_body_cut_short_is_remote_protocol_error() -> None:
    """A server that closes the connection mid-body gives httpx.RemoteProtocolError."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json", "Content-Length": "1000"})
        await response.prepare(request)
        await response.write(b'{"choices": [')
        assert request.transport is not None
        request.transport.close()
        return response

    async with aiohttp_server(handler) as base, httpx.AsyncClient(transport=AiohttpTransport()) as http:
        with pytest.raises(httpx.RemoteProtocolError):
            await http.get(base + "/cut")


@pytest.mark.usefixtures("no_proxy")
@pytest.mark.anyio
async def test_aiohttp_transport_silent_server_is_read_timeout() -> None:
    """A server that never answers gives httpx.ReadTimeout once the read timeout passes."""
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="too late")

    async with aiohttp_server(handler) as base:
        try:
            async with httpx.AsyncClient(
                transport=AiohttpTransport(), timeout=httpx.Timeout(5.0, read=0.2)
            ) as http:
                started = time.monotonic()
                with pytest.raises(httpx.ReadTimeout):
                    await http.get(base + "/hang")
                assert time.monotonic() - started < 3.0
        finally:
            release.set()


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        pytest.param("1s", 1.0, id="seconds"),
        pytest.param("6m0s", 360.0, id="minutes"),
        pytest.param("120ms", 0.12, id="millis"),
        pytest.param("1h2m3.5s", 3723.5, id="mixed"),
        pytest.param("0.5", 0.5, id="plain-number"),
        pytest.param("soon", None, id="nonsense"),
    ],
)
def test_openai_reset_durations_parse_to_seconds(text: str, seconds: float | None) -> None:
    """x-ratelimit-reset-* values ("6m0s", "120ms") become seconds."""
    assert parse_duration(text) == (None if seconds is None else pytest.approx(seconds))


def test_rate_limit_headers_parse_and_absent_headers_give_none() -> None:
    """The six x-ratelimit-* headers become a RateInfo; a response without them gives None."""
    headers = httpx.Headers(
        {
            "x-ratelimit-limit-requests": "1200",
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": "2.5s",
            "x-ratelimit-limit-tokens": "150000",
            "x-ratelimit-remaining-tokens": "149000",
            "x-ratelimit-reset-tokens": "400ms",
        }
    )
    info = parse_rate_headers(headers)
    assert info == RateInfo(1200, 0, 2.5, 150000, 149000, 0.4)
    assert parse_rate_headers(httpx.Headers({"content-type": "application/json"})) is None


@pytest.mark.usefixtures("no_proxy")
@pytest.mark.anyio
@pytest.mark.parametrize("stream", [False, True])
async def test_a_header_value_outside_ascii_does_not_break_an_answer(stream: bool) -> None:
    """Servers send UTF-8 in header values now and then (a provider name, a message): the
    answer still arrives, streamed or not, and the header reads as httpx reads it."""
    body = completion_body(message={"content": "fine"})

    async def handler(request: web.Request) -> web.StreamResponse:
        headers = {"x-request-id": "req-utf8", "x-note": "café"}
        if not stream:
            return web.json_response(body, headers=headers)
        resp = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream"})
        await resp.prepare(request)
        chunk = {**body, "object": "chat.completion.chunk"}
        chunk["choices"] = [
            {"index": 0, "delta": {"role": "assistant", "content": "fine"}, "finish_reason": "stop"}
        ]
        await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async with aiohttp_server(handler) as base:
        client = ChatClient(
            EndpointSpec(name="local", base_url=base),
            base_url=base + "/v1",
            api_key=None,
            retry=RetrySpec(),
            transport=AiohttpTransport(),
        )
        try:
            completion, status = await client.complete("m", {"messages": MESSAGES}, stream=stream)
        finally:
            await client.aclose()
    assert status == 200 and completion.first.content == "fine"
    assert completion.provider_request_id == "req-utf8"
