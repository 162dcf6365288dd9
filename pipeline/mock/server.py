"""A fake OpenAI-compatible chat-completions provider: fast, deterministic, fault-injecting.

Users dry-run jobs against it, tests and benchmarks use it. It speaks the real wire format
(``chat.completion`` and ``chat.completion.chunk`` objects, OpenAI error bodies and headers)
and can misbehave on purpose: sliding-window RPM/TPM limits, seeded random 429/500/invalid
JSON answers, deterministic "fail the first N times" faults, added latency, and per-model
faults (:class:`ModelFaults`: any error status with its real body and headers, quota and key
refusals, context length, content filters, ``finish_reason: "error"``, a request that hangs, a
reset connection, a body cut short, invalid JSON), permanent or for the first N sightings of
each request body.

Endpoints (each also without the ``/v1`` prefix):

* ``POST /v1/chat/completions``: the answer, streamed as server-sent events if ``stream``.
* ``GET /v1/chat/completions`` (list stored, filter ``metadata[k]=v``, ``model``, ``limit``,
  ``after``, ``order``), ``GET|DELETE /v1/chat/completions/{id}``,
  ``GET /v1/chat/completions/{id}/messages``: completions made with ``"store": true``.
* ``GET /v1/models`` and ``GET /v1/models/{id}``.
* ``GET /mock/stats`` and ``POST /mock/reset``: for tests and benchmarks.

Answers are deterministic: the content depends only on the messages (and the choice index),
so the same request gives the same text, streamed or not. A ``json_schema`` response format
gets JSON valid against its schema (see :mod:`pipeline.mock.schema_fake`), ``json_object``
gets ``{"answer": ...}``, and a ``tool_choice`` of ``"required"`` (the first tool) or naming a
function gets a ``tool_calls`` answer whose arguments match the function's parameters.

Token counts are estimates:
``prompt_tokens = ceil(chars of message text / 4) + 3 per message`` and
``completion_tokens = ceil(len(content) / 4)`` per choice, plus the configured reasoning
tokens. With ``report_cost`` the usage carries an OpenRouter-style ``cost`` in USD at the
toy prices :data:`PRICE_INPUT_PER_MTOK` (uncached prompt tokens),
:data:`PRICE_CACHED_INPUT_PER_MTOK` (cached prompt tokens) and
:data:`PRICE_OUTPUT_PER_MTOK` (completion tokens, reasoning included), per million tokens.

Rate limits use a real sliding 60 s window over accepted requests (tokens counted as the
prompt estimate plus ``n * max_tokens``, or the answer's tokens when no maximum is given).
``Retry-After`` says when the request could next succeed; ``x-ratelimit-reset-*`` says when
the window will be empty again ("resets to its initial state", as OpenAI documents it).

The server is aiohttp's low-level :class:`aiohttp.web.Server` with no access log; JSON goes
through orjson. All state lives on the server's event loop; :class:`MockServer` reads and
resets it from other threads by scheduling the work on that loop. For benchmarks, run the
server in its own process (``pipeline mock-server``): in a thread of the measuring process it
shares the GIL with the client under test.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import email.utils
import hashlib
import importlib
import math
import random
import signal
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar

import orjson
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

from pipeline.mock import stream_faults
from pipeline.mock.schema_fake import fake_instance

__all__ = [
    "FAULT_KINDS",
    "PRICE_CACHED_INPUT_PER_MTOK",
    "PRICE_INPUT_PER_MTOK",
    "PRICE_OUTPUT_PER_MTOK",
    "MockConfig",
    "MockServer",
    "MockStats",
    "ModelFaults",
    "main",
    "parse_fault",
    "serve",
]

PRICE_INPUT_PER_MTOK = 1.00
"""Toy price in USD per million uncached prompt tokens (used for ``usage.cost``)."""
PRICE_CACHED_INPUT_PER_MTOK = 0.25
"""Toy price in USD per million cached prompt tokens."""
PRICE_OUTPUT_PER_MTOK = 4.00
"""Toy price in USD per million completion tokens (reasoning tokens included)."""

_T = TypeVar("_T")
_WINDOW_S = 60.0
_MAX_BODY = 64 * 1024 * 1024
_GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1
_CHAT_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})
_JSON = "application/json"
_SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Everything is working exactly as a mock should.",
    "Here is a short, deterministic reply for your request.",
    "This answer was produced without any model at all.",
    "A fixed sentence stands in for real generated text.",
    "Your prompt was received and counted, token by token.",
    "Nothing here is meaningful, but the shape is real.",
    "Batch pipelines love predictable answers like this one.",
)
_INVALID_JSON = b'{"id": "chatcmpl-broken", "object": "chat.completion", "choices": [{"ind'
_INVALID_SSE = b'data: {"id": "chatcmpl-broken", "object": "chat.completion.chunk", "cho\n\n'


FAULT_KINDS: tuple[str, ...] = (
    "status",
    "insufficient_quota",
    "unauthorized",
    "context_length",
    "content_filter_400",
    "content_filter_finish",
    "finish_error",
    "bad_request",
    "hang",
    "reset",
    "truncated",
    "invalid_json",
    "schema_violation",
    "refusal",
    "reasoning_exhausted",
)
"""The kinds of :class:`ModelFaults`."""

_FAULT_STATUSES: dict[str, tuple[int, ...]] = {
    "insufficient_quota": (429, 402),
    "unauthorized": (401, 403),
    "bad_request": (400, 422),
}
_RETRY_AFTER_FORMATS = ("seconds", "date", "ms", "both", "none")


@dataclass(frozen=True)
class ModelFaults:
    """How requests for one model misbehave, in the wire formats real providers use.

    ``kind`` is one of :data:`FAULT_KINDS`:

    * ``status``: HTTP ``status`` (400-599) with that status's real error body: 400
      ``invalid_request_error``, 401 ``invalid_api_key``, 402 OpenRouter's "Insufficient
      credits", 403 ``request_forbidden``, 404 ``model_not_found``, 408, 409, 413, 422, 429
      ``rate_limit_exceeded`` (with ``retry_after_s`` said as ``retry_after``), 500, 502, 503,
      504, Cloudflare's 520-529; any other status gets a generic OpenAI-shaped body.
    * ``insufficient_quota``: 429 ``insufficient_quota`` (OpenAI, no ``Retry-After``), or with
      ``status=402`` OpenRouter's ``{"error": {"code": 402, "message": "Insufficient credits..."}}``.
    * ``unauthorized``: 401 ``invalid_api_key``, or with ``status=403`` a 403.
    * ``context_length``: 400 ``context_length_exceeded`` on ``param: "messages"``.
    * ``content_filter_400``: Azure's 400 ``content_filter`` (``param: "prompt"``).
    * ``content_filter_finish``: a 200 whose choices end with ``finish_reason:
      "content_filter"`` and ``content: null``, usage included (streamed too).
    * ``finish_error``: a 200 whose choices end with ``finish_reason: "error"``, usage
      included, as OpenRouter bills such answers (streamed too).
    * ``bad_request``: 400 ``invalid_request_error`` (``invalid_type``), or with ``status=422``
      an unprocessable-entity error.
    * ``hang``: the request is read and never answered: the connection stays open until the
      client gives up (or the server stops). Other requests are served meanwhile.
    * ``reset``: the TCP connection is aborted without any response.
    * ``truncated``: the answer's headers announce the full ``Content-Length`` (a streamed
      answer: chunked), half the body is sent, then the connection is closed.
    * ``schema_violation``: a 200 whose content is JSON that matches no structured-output
      schema (``{"mock_unexpected": true}``), usage included.
    * ``refusal``: a 200 whose message has ``content: null`` and a ``refusal`` text.
    * ``reasoning_exhausted``: a 200 with ``finish_reason: "length"``, empty content, and every
      completion token spent on reasoning (a reasoning model that ran out of ``max_tokens``).
    * ``invalid_json``: a 200 whose body is not JSON (an SSE stream with a broken event when
      streamed).

    ``first`` 0 misbehaves on every request (a permanent fault); ``first=N`` only on the first
    N sightings of each distinct request body, which are then answered normally (a transient
    fault, like :attr:`MockConfig.fail_first`). ``retry_after`` is how a 429 ``status`` fault
    asks for ``retry_after_s``: ``"seconds"`` (``Retry-After: <ceil seconds>``), ``"date"``
    (``Retry-After: <HTTP date>``), ``"ms"`` (``retry-after-ms`` only), ``"both"``
    (``Retry-After`` and ``retry-after-ms``, as OpenAI sends) or ``"none"``. ``html`` sends a
    5xx as a CDN's HTML error page (as Cloudflare in front of a provider does) instead of JSON.
    ``match``, when set, limits the fault to requests whose raw body contains that text (a
    "poison row" among good ones); the others are answered normally.
    """

    kind: str
    first: int = 0
    status: int | None = None
    retry_after_s: float = 1.0
    retry_after: str = "seconds"
    html: bool = False
    match: str | None = None

    def __post_init__(self) -> None:
        _require(self.kind in FAULT_KINDS, f"fault kind must be one of {', '.join(FAULT_KINDS)}")
        _require(self.first >= 0, "fault first must be >= 0 (0 = always)")
        _require(self.retry_after_s >= 0, "fault retry_after_s must be >= 0")
        _require(
            self.retry_after in _RETRY_AFTER_FORMATS,
            f"fault retry_after must be one of {', '.join(_RETRY_AFTER_FORMATS)}",
        )
        if self.kind == "status":
            _require(
                self.status is not None and 400 <= self.status <= 599,
                "a status fault needs an HTTP error status (400-599)",
            )
        elif self.kind in _FAULT_STATUSES:
            allowed = _FAULT_STATUSES[self.kind]
            _require(
                self.status is None or self.status in allowed,
                f"a {self.kind} fault's status must be one of {', '.join(map(str, allowed))}",
            )
        else:
            _require(self.status is None, f"a {self.kind} fault takes no status")
        _require(not self.html or self.http_status >= 500, "html applies to 5xx faults only")

    @property
    def http_status(self) -> int:
        """The status line this fault answers with (200 for faults inside a 200; 0: none)."""
        if self.status is not None:
            return self.status
        return _FAULT_DEFAULT_STATUS.get(self.kind, 0)


_FAULT_DEFAULT_STATUS = {
    "insufficient_quota": 429,
    "unauthorized": 401,
    "context_length": 400,
    "content_filter_400": 400,
    "bad_request": 400,
    "content_filter_finish": 200,
    "finish_error": 200,
    "schema_violation": 200,
    "refusal": 200,
    "reasoning_exhausted": 200,
    "truncated": 200,
    "invalid_json": 200,
}
_CLI_ALIASES = {"429-date": ("status", 429, "date"), "429-ms": ("status", 429, "ms")}


def parse_fault(text: str, *, retry_after_s: float = 1.0) -> tuple[str, ModelFaults]:
    """``MODEL=KIND[:N]`` (the ``--fault`` flag) into ``(model, ModelFaults)``.

    KIND is a :data:`FAULT_KINDS` name other than ``status``, an HTTP status 400-599 (429 says
    ``Retry-After`` in seconds), ``429-date`` (an HTTP-date ``Retry-After``) or ``429-ms``
    (``retry-after-ms`` only). ``:N`` makes it transient: only the first N sightings of each
    distinct body misbehave. Raises ValueError with a readable message.
    """
    model, eq, spec = text.rpartition("=")
    if not eq or not model or not spec:
        raise ValueError(f"{text!r}: expected MODEL=KIND[:N]")
    name, colon, count = spec.partition(":")
    first = 0
    if colon:
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"{text!r}: N must be a positive integer")
        first = int(count)
    status: int | None = None
    retry_after = "seconds"
    if name in _CLI_ALIASES:
        kind, status, retry_after = _CLI_ALIASES[name]
    elif name.isdigit():
        kind, status = "status", int(name)
    elif name in FAULT_KINDS and name != "status":
        kind = name
    else:
        kinds = [k for k in FAULT_KINDS if k != "status"]
        raise ValueError(
            f"{text!r}: unknown fault {name!r}; expected an HTTP status, 429-date, 429-ms or one of "
            + ", ".join(kinds)
        )
    try:
        fault = ModelFaults(
            kind, first=first, status=status, retry_after_s=retry_after_s, retry_after=retry_after
        )
    except ValueError as exc:
        raise ValueError(f"{text!r}: {exc}") from None
    return model, fault


@dataclass(frozen=True)
class MockConfig:
    """How the mock provider behaves. All faults are off and all limits open by default.

    ``port`` 0 picks a free port. ``latency_ms`` (+ uniform ``0..jitter_ms``) is slept before
    each answer. ``rpm`` / ``tpm`` (0 = unlimited) are sliding 60 s windows answering 429.
    ``rate_429`` / ``rate_500`` / ``rate_invalid_json`` are probabilities (one seeded draw per
    request, so they must add up to at most 1). ``fail_first`` fails the first N sightings of
    each distinct request body with ``fail_status`` (0 = a 200 with invalid JSON).
    ``retry_after_s`` is sent on injected 429s. ``models`` None accepts any model name.
    ``api_key`` requires ``Authorization: Bearer <key>``. ``seed`` seeds the fault and jitter
    draws. ``reasoning_tokens`` (per choice) and ``cached_tokens`` shape the usage;
    ``report_cost`` adds ``usage.cost`` at the module's toy prices. ``finish_error_first``
    answers the first N sightings of each body (non-streamed) with a 200 whose
    ``finish_reason`` is ``"error"``, usage included, as providers bill such answers.
    ``model_faults`` maps a model name to the :class:`ModelFaults` its requests get (a model
    named there is served even when ``models`` does not list it); requests for other models
    pay nothing for the feature.
    """

    host: str = "127.0.0.1"
    port: int = 0
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    rpm: int = 0
    tpm: int = 0
    rate_429: float = 0.0
    rate_500: float = 0.0
    rate_invalid_json: float = 0.0
    fail_first: int = 0
    fail_status: int = 429
    retry_after_s: float = 1.0
    models: tuple[str, ...] | None = (
        "mock-small",
        "mock-large",
        "gpt-4o-mini",
        "gpt-4o",
        "gpt-4.1-mini",
    )
    api_key: str | None = None
    seed: int = 0
    reasoning_tokens: int = 0
    cached_tokens: int = 0
    report_cost: bool = False
    finish_error_first: int = 0
    # chunk size, pacing and mid-stream faults of streamed answers: see stream_faults.py
    streaming: stream_faults.StreamFaults = field(default_factory=stream_faults.StreamFaults)
    model_faults: Mapping[str, ModelFaults] = field(default_factory=lambda: MappingProxyType({}), hash=False)

    def __post_init__(self) -> None:
        faults = dict(self.model_faults)
        _require(
            all(isinstance(k, str) and isinstance(v, ModelFaults) for k, v in faults.items()),
            "model_faults maps model names to ModelFaults",
        )
        object.__setattr__(self, "model_faults", MappingProxyType(faults))
        for name in ("latency_ms", "jitter_ms", "retry_after_s"):
            _require(getattr(self, name) >= 0, f"{name} must be >= 0")
        for name in (
            "port",
            "rpm",
            "tpm",
            "fail_first",
            "finish_error_first",
            "reasoning_tokens",
            "cached_tokens",
        ):
            _require(getattr(self, name) >= 0, f"{name} must be >= 0")
        rates = (self.rate_429, self.rate_500, self.rate_invalid_json)
        _require(all(0.0 <= r <= 1.0 for r in rates), "fault rates must be within 0..1")
        _require(sum(rates) <= 1.0 + 1e-9, "fault rates must add up to at most 1")
        _require(
            self.fail_status == 0 or 400 <= self.fail_status <= 599,
            "fail_status must be 0 (invalid JSON) or an HTTP error status",
        )


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class MockStats:
    """A snapshot of what the server has seen since it started or was last reset."""

    requests_total: int
    by_status: dict[int, int]
    by_model: dict[str, int]
    completions: int
    #: model faults injected, by kind (``hang``, ``reset`` and ``truncated`` send no whole
    #: answer, so they are in no ``by_status`` count)
    faults: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; status codes become string keys."""
        return {
            "requests_total": self.requests_total,
            "by_status": {str(k): v for k, v in sorted(self.by_status.items())},
            "by_model": dict(self.by_model),
            "completions": self.completions,
            "faults": dict(self.faults),
        }


# --------------------------------------------------------------------------- request model


class _Drop(Exception):
    """No HTTP answer at all: ``hang`` or ``reset``."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


class _Fail(Exception):
    """An answer other than a completion, raised from anywhere in the request flow."""

    def __init__(
        self,
        status: int,
        body: bytes,
        headers: Mapping[str, str] | None = None,
        content_type: str = _JSON,
    ) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = headers
        self.content_type = content_type


def _error_body(message: str, kind: str, param: str | None, code: str | None) -> bytes:
    error = {"message": message, "type": kind, "param": param, "code": code}
    return orjson.dumps({"error": error})


def _bad_request(message: str, param: str | None, code: str | None = None) -> _Fail:
    return _Fail(400, _error_body(message, "invalid_request_error", param, code))


def _not_found(message: str, code: str | None = None) -> _Fail:
    return _Fail(404, _error_body(message, "invalid_request_error", None, code))


@dataclass(slots=True)
class _Chat:
    """The parts of a chat-completions request the mock acts on."""

    body: dict[str, Any]
    model: str
    messages: list[Any]
    n: int
    max_tokens: int | None
    stream: bool
    include_usage: bool
    store: bool
    tool: Mapping[str, Any] | None
    response_format: Mapping[str, Any] | None


def _parse_chat(raw: bytes) -> _Chat:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict):
        raise _bad_request(
            "We could not parse the JSON body of your request. The OpenAI API expects a JSON "
            "payload, but what was sent was not valid JSON.",
            None,
        )
    messages = _check_messages(body.get("messages"))
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad_request("Missing required parameter: 'model'.", "model")
    stream = body.get("stream") is True
    options = body.get("stream_options")
    if options is not None and not stream:
        raise _bad_request(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            "stream_options",
        )
    return _Chat(
        body=body,
        model=model,
        messages=messages,
        n=_int_param(body, "n", 1, 128) or 1,
        max_tokens=_max_tokens(body),
        stream=stream,
        include_usage=isinstance(options, dict) and options.get("include_usage") is True,
        store=body.get("store") is True,
        tool=_forced_tool(body),
        response_format=_response_format(body),
    )


def _check_messages(messages: Any) -> list[Any]:
    if messages is None:
        raise _bad_request("Missing required parameter: 'messages'.", "messages")
    if not isinstance(messages, list):
        raise _bad_request(
            f"Invalid type for 'messages': expected an array, but got {_json_type(messages)} instead.",
            "messages",
        )
    if not messages:
        raise _bad_request(
            "Invalid 'messages': empty array. Expected an array with minimum length 1, "
            "but got an empty array instead.",
            "messages",
        )
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _bad_request(f"Missing required parameter: 'messages[{index}].role'.", "messages")
    return messages


def _json_type(value: Any) -> str:
    names = {str: "a string", dict: "an object", int: "an integer", float: "a number"}
    return names.get(type(value), "a boolean" if isinstance(value, bool) else "null")


def _int_param(body: Mapping[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise _bad_request(
            f"Invalid '{name}': expected an integer between {low} and {high}, got {value!r}.",
            name,
            "integer_below_min_value" if isinstance(value, int) and value < low else None,
        )
    return value


def _max_tokens(body: Mapping[str, Any]) -> int | None:
    value = _int_param(body, "max_completion_tokens", 1, 1 << 31)
    return value if value is not None else _int_param(body, "max_tokens", 1, 1 << 31)


def _forced_tool(body: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The function definition a ``tool_choice`` forces the model to call, if any."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if choice is None or choice in ("auto", "none"):
        return None
    functions: list[Mapping[str, Any]] = [
        t["function"] for t in (tools if isinstance(tools, list) else ()) if _is_function_tool(t)
    ]
    if not functions:
        raise _bad_request(
            "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified.",
            "tool_choice",
        )
    if choice == "required":
        return functions[0]
    named = choice.get("function") if isinstance(choice, dict) else None
    wanted = named.get("name") if isinstance(named, dict) else None
    for function in functions:
        if function.get("name") == wanted:
            return function
    raise _bad_request(
        f"Invalid value for 'tool_choice': function {wanted!r} is not among the tools.",
        "tool_choice",
    )


def _is_function_tool(tool: Any) -> bool:
    return (
        isinstance(tool, dict)
        and isinstance(tool.get("function"), dict)
        and isinstance(tool["function"].get("name"), str)
    )


def _response_format(body: Mapping[str, Any]) -> Mapping[str, Any] | None:
    fmt = body.get("response_format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind not in ("text", "json_object", "json_schema"):
        raise _bad_request(
            "Invalid value for 'response_format.type': expected one of 'text', 'json_object' "
            "or 'json_schema'.",
            "response_format",
        )
    return None if kind == "text" else fmt


# --------------------------------------------------------------------------- answer planning


@dataclass(slots=True)
class _Choice:
    """One choice of an answer: content or a tool call, plus its token account."""

    content: str | None
    tool_name: str | None
    arguments: str | None
    reasoning: str | None
    finish_reason: str
    completion_tokens: int
    reasoning_tokens: int
    refusal: str | None = None


@dataclass(slots=True)
class _Plan:
    """The deterministic part of an answer, worked out before any fault or delay."""

    choices: list[_Choice]
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    cached_tokens: int
    rate_tokens: int
    finish_error: bool = False  # answer with finish_reason "error" (billed usage kept)
    truncated: bool = False  # send half the answer under headers announcing all of it


def _tokens(text: str) -> int:
    return (len(text) + 3) // 4


def _prompt_tokens(messages: list[Any]) -> int:
    chars = 0
    for message in messages:
        chars += _text_chars(message.get("content"))
        for call in message.get("tool_calls") or ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                chars += len(str(function.get("name", "")))
                chars += len(str(function.get("arguments", "")))
    return (chars + 3) // 4 + 3 * len(messages)


def _text_chars(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(
            len(part["text"])
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return 0


def _plan(chat: _Chat, config: MockConfig) -> _Plan:
    digest = hashlib.blake2b(orjson.dumps(chat.messages), digest_size=8).digest()
    base = int.from_bytes(digest, "big")
    choices = [_make_choice(chat, config, (base + i * _GOLDEN) & _MASK64) for i in range(chat.n)]
    prompt = _prompt_tokens(chat.messages)
    completion = sum(c.completion_tokens for c in choices)
    budget = chat.max_tokens * chat.n if chat.max_tokens is not None else completion
    return _Plan(
        choices=choices,
        prompt_tokens=prompt,
        completion_tokens=completion,
        reasoning_tokens=sum(c.reasoning_tokens for c in choices),
        cached_tokens=min(config.cached_tokens, prompt),
        rate_tokens=prompt + budget,
    )


def _make_choice(chat: _Chat, config: MockConfig, h: int) -> _Choice:
    text = _draft(chat, h)
    reasoning = config.reasoning_tokens
    finish = "tool_calls" if chat.tool is not None else "stop"
    if chat.max_tokens is not None:
        reasoning = min(reasoning, chat.max_tokens)
        room = chat.max_tokens - reasoning
        if _tokens(text) > room:
            text = text[: room * 4]
            finish = "length"
    is_tool = chat.tool is not None
    return _Choice(
        content=None if is_tool else text,
        tool_name=str(chat.tool["name"]) if chat.tool is not None else None,
        arguments=text if is_tool else None,
        reasoning=_reasoning_text(h) if config.reasoning_tokens > 0 else None,
        finish_reason=finish,
        completion_tokens=reasoning + _tokens(text),
        reasoning_tokens=reasoning,
    )


def _draft(chat: _Chat, h: int) -> str:
    """The full, untruncated text of one choice: content, or tool-call arguments."""
    sentence = _SENTENCES[h % len(_SENTENCES)]
    if chat.tool is not None:
        params = chat.tool.get("parameters")
        return _fake_json(params if isinstance(params, dict) else {"type": "object"}, h, "tools")
    fmt = chat.response_format
    if fmt is not None and fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        return _fake_json(schema if isinstance(schema, dict) else {}, h, "response_format")
    if fmt is not None:
        return orjson.dumps({"answer": sentence}).decode()
    return f"Mock answer {h >> 32:08x}: {sentence}"


def _fake_json(schema: dict[str, Any], h: int, param: str) -> str:
    try:
        return orjson.dumps(fake_instance(schema, h)).decode()
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, RecursionError) as exc:
        raise _bad_request(f"Invalid schema in '{param}': {type(exc).__name__}.", param) from exc


def _reasoning_text(h: int) -> str:
    return f"Mock reasoning {h & 0xFFFF:04x}: read the conversation, weighed it, kept it short."


# --------------------------------------------------------------------------- answer rendering


def _usage(plan: _Plan, config: MockConfig) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": plan.prompt_tokens,
        "completion_tokens": plan.completion_tokens,
        "total_tokens": plan.prompt_tokens + plan.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": plan.cached_tokens, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": plan.reasoning_tokens,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }
    if config.report_cost:
        usage["cost"] = _cost(plan)
    return usage


def _cost(plan: _Plan) -> float:
    uncached = plan.prompt_tokens - plan.cached_tokens
    total = (
        uncached * PRICE_INPUT_PER_MTOK
        + plan.cached_tokens * PRICE_CACHED_INPUT_PER_MTOK
        + plan.completion_tokens * PRICE_OUTPUT_PER_MTOK
    )
    return round(total / 1_000_000, 12)


@dataclass(slots=True)
class _Answer:
    """Everything random or time-dependent about one answer: ids and the creation time."""

    id: str
    created: int
    model: str
    call_ids: list[str]


def _message(choice: _Choice, call_id: str) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": choice.content}
    if choice.tool_name is not None:
        function = {"name": choice.tool_name, "arguments": choice.arguments}
        message["tool_calls"] = [{"id": call_id, "type": "function", "function": function}]
    message["refusal"] = choice.refusal
    message["annotations"] = []
    if choice.reasoning is not None:
        message["reasoning"] = choice.reasoning
    return message


def _completion(answer: _Answer, plan: _Plan, config: MockConfig) -> dict[str, Any]:
    choices = [
        {
            "index": i,
            "message": _message(choice, answer.call_ids[i]),
            "logprobs": None,
            "finish_reason": choice.finish_reason,
        }
        for i, choice in enumerate(plan.choices)
    ]
    return {
        "id": answer.id,
        "object": "chat.completion",
        "created": answer.created,
        "model": answer.model,
        "choices": choices,
        "usage": _usage(plan, config),
        "service_tier": "default",
        "system_fingerprint": "fp_mock",
    }


# --------------------------------------------------------------------------- rate limits


def _duration(seconds: float) -> str:
    """OpenAI's duration format: ``120ms``, ``1.2s``, ``6m0s``, ``1h2m3s``."""
    seconds = round(seconds, 3)
    if seconds < 1.0:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    hours, rest = divmod(seconds, 3600.0)
    minutes, secs = divmod(rest, 60.0)
    text = f"{secs:.3f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{int(hours)}h{int(minutes)}m{text}"
    return f"{int(minutes)}m{text}" if minutes else text


def _retry_headers(wait_s: float) -> dict[str, str]:
    return {
        "retry-after": str(max(1, math.ceil(wait_s))),
        "retry-after-ms": str(max(0, math.ceil(wait_s * 1000))),
    }


class _Window:
    """A real sliding 60 s window over accepted requests and their token estimates."""

    def __init__(self, rpm: int, tpm: int) -> None:
        self.rpm = rpm
        self.tpm = tpm
        self.events: deque[tuple[float, int]] = deque()
        self.tokens = 0

    def _prune(self, now: float) -> None:
        events = self.events
        horizon = now - _WINDOW_S
        while events and events[0][0] <= horizon:
            self.tokens -= events.popleft()[1]

    def admit(self, now: float, tokens: int, model: str) -> None:
        """Record the request, or raise a 429 saying when it could succeed."""
        self._prune(now)
        if self.rpm and len(self.events) >= self.rpm:
            wait = self.events[len(self.events) - self.rpm][0] + _WINDOW_S - now
            raise self._reject("requests", model, len(self.events), 1, wait)
        if self.tpm and self.tokens + tokens > self.tpm:
            raise self._reject("tokens", model, self.tokens, tokens, self._token_wait(now, tokens))
        self.events.append((now, tokens))
        self.tokens += tokens

    def _token_wait(self, now: float, tokens: int) -> float:
        if tokens > self.tpm:
            return _WINDOW_S
        used = self.tokens
        for stamp, spent in self.events:
            used -= spent
            if used + tokens <= self.tpm:
                return stamp + _WINDOW_S - now
        return _WINDOW_S

    def _reject(self, kind: str, model: str, used: int, asked: int, wait: float) -> _Fail:
        limit = self.rpm if kind == "requests" else self.tpm
        unit = "requests per min (RPM)" if kind == "requests" else "tokens per min (TPM)"
        if kind == "tokens" and asked > limit:
            message = (
                f"Request too large for {model} in organization org-mock on {unit}: "
                f"Limit {limit}, Requested {asked}. The input or output tokens must be reduced "
                "in order to run successfully."
            )
        else:
            message = (
                f"Rate limit reached for {model} in organization org-mock on {unit}: "
                f"Limit {limit}, Used {used}, Requested {asked}. "
                f"Please try again in {_duration(wait)}."
            )
        body = _error_body(message, kind, None, "rate_limit_exceeded")
        return _Fail(429, body, _retry_headers(wait))

    def headers(self, now: float) -> dict[str, str]:
        """The ``x-ratelimit-*`` headers; "reset" is when the window is empty again."""
        self._prune(now)
        reset = _duration(self.events[-1][0] + _WINDOW_S - now) if self.events else "0s"
        out: dict[str, str] = {}
        if self.rpm:
            out["x-ratelimit-limit-requests"] = str(self.rpm)
            out["x-ratelimit-remaining-requests"] = str(max(0, self.rpm - len(self.events)))
            out["x-ratelimit-reset-requests"] = reset
        if self.tpm:
            out["x-ratelimit-limit-tokens"] = str(self.tpm)
            out["x-ratelimit-remaining-tokens"] = str(max(0, self.tpm - self.tokens))
            out["x-ratelimit-reset-tokens"] = reset
        return out


# --------------------------------------------------------------------------- state


@dataclass(slots=True)
class _Stored:
    completion: dict[str, Any]
    messages: list[Any]
    metadata: dict[str, Any]


@dataclass
class _State:
    """Everything the server remembers; only ever touched from the server's event loop."""

    config: MockConfig
    requests_total: int = 0
    by_status: dict[int, int] = field(default_factory=dict)
    by_model: dict[str, int] = field(default_factory=dict)
    completions: int = 0
    seen: dict[bytes, int] = field(default_factory=dict)
    seen_finish: dict[bytes, int] = field(default_factory=dict)
    seen_fault: dict[bytes, int] = field(default_factory=dict)
    faults_by_kind: dict[str, int] = field(default_factory=dict)
    stored: dict[str, _Stored] = field(default_factory=dict)
    window: _Window | None = None
    faults: random.Random = field(default_factory=random.Random)
    jitter: random.Random = field(default_factory=random.Random)
    ids: random.Random = field(default_factory=random.Random)
    closing: asyncio.Event | None = None  # set when the server stops: hung requests end

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything and re-seed, as if freshly started."""
        cfg = self.config
        self.requests_total = 0
        self.completions = 0
        self.by_status = {}
        self.by_model = {}
        self.seen = {}
        self.seen_finish = {}
        self.seen_fault = {}
        self.faults_by_kind = {}
        self.stored = {}
        self.window = _Window(cfg.rpm, cfg.tpm) if cfg.rpm or cfg.tpm else None
        self.faults = random.Random(cfg.seed)
        self.jitter = random.Random(cfg.seed + 1)

    def snapshot(self) -> MockStats:
        return MockStats(
            requests_total=self.requests_total,
            by_status=dict(self.by_status),
            by_model=dict(self.by_model),
            completions=self.completions,
            faults=dict(self.faults_by_kind),
        )


# --------------------------------------------------------------------------- HTTP handling


class _Provider:
    """The request handler given to :class:`aiohttp.web.Server`."""

    def __init__(self, state: _State) -> None:
        self.state = state
        self.config = state.config
        self.model_faults = state.config.model_faults
        auth = state.config.api_key
        self.auth = None if auth is None else f"Bearer {auth}"

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        path = request.path
        if request.method == "POST" and path in _CHAT_PATHS:
            return await self._chat(request, started)
        try:
            status, body = await self._other(request, path.removeprefix("/v1"))
        except _Fail as fail:
            status, body = fail.status, fail.body
        return web.Response(status=status, body=body, headers=self._headers(started), content_type=_JSON)

    # ---------------------------------------------------------------- common

    def _headers(self, started: float) -> dict[str, str]:
        elapsed = (time.perf_counter() - started) * 1000.0
        headers = {
            "x-request-id": f"req_{self.state.ids.getrandbits(128):032x}",
            "openai-processing-ms": str(int(elapsed)),
            "openai-organization": "org-mock",
            "openai-version": "2020-10-01",
        }
        window = self.state.window
        if window is not None:
            headers.update(window.headers(time.monotonic()))
        return headers

    def _count(self, status: int) -> None:
        by_status = self.state.by_status
        by_status[status] = by_status.get(status, 0) + 1

    def _fail_response(self, fail: _Fail, started: float) -> web.Response:
        headers = self._headers(started)
        if fail.headers:
            headers.update(fail.headers)
        self._count(fail.status)
        return web.Response(
            status=fail.status, body=fail.body, headers=headers, content_type=fail.content_type
        )

    # ---------------------------------------------------------------- chat completions

    async def _chat(self, request: web.BaseRequest, started: float) -> web.StreamResponse:
        self.state.requests_total += 1
        try:
            chat, plan = await self._admit(request)
            await self._delay()
        except _Fail as fail:
            return self._fail_response(fail, started)
        except _Drop as drop:
            return await self._drop(request, drop.kind)
        answer = self._new_answer(chat)
        completion = _completion(answer, plan, self.config) if chat.store or not chat.stream else {}
        if plan.finish_error and not chat.stream:
            for choice in completion["choices"]:
                choice["finish_reason"] = "error"
        if chat.store:
            self._store(chat, completion)
        if plan.truncated:
            return await self._truncated(request, chat, plan, answer, completion, started)
        if chat.stream:
            return await self._stream(request, chat, plan, answer, started)
        body = orjson.dumps(completion)
        self._count(200)
        self.state.completions += 1
        return web.Response(body=body, headers=self._headers(started), content_type=_JSON)

    async def _drop(self, request: web.BaseRequest, kind: str) -> web.StreamResponse:
        """``hang``: wait until the client gives up (the handler is cancelled then) or the
        server stops; ``reset``: abort at once. Either way no byte of an answer is sent."""
        if kind == "hang":
            closing = self.state.closing
            if closing is not None:
                await closing.wait()
        transport = request.transport
        if transport is not None:
            transport.abort()
        return web.Response()  # never sent: aiohttp sees the closed transport and drops it

    async def _truncated(
        self,
        request: web.BaseRequest,
        chat: _Chat,
        plan: _Plan,
        answer: _Answer,
        completion: dict[str, Any],
        started: float,
    ) -> web.StreamResponse:
        """Headers promising the whole answer, half of its bytes, then the connection closes."""
        response = web.StreamResponse(headers=self._headers(started))
        if chat.stream:
            usage = _usage(plan, self.config) if chat.include_usage else None
            events = stream_faults.render(answer, plan, usage, self.config.streaming.chunk_chars)
            events.append(b"data: [DONE]\n\n")
            body = b"".join(events[: max(1, len(events) // 2)])
            response.content_type = "text/event-stream"  # chunked: the end chunk never comes
        else:
            whole = orjson.dumps(completion)
            body = whole[: len(whole) // 2]
            response.content_type = _JSON
            response.content_length = len(whole)
        with contextlib.suppress(ConnectionError):
            await response.prepare(request)
            await response.write(body)
        transport = request.transport
        if transport is not None:
            transport.close()  # FIN after the bytes sent: the body is cut short, not reset
        return response

    async def _admit(self, request: web.BaseRequest) -> tuple[_Chat, _Plan]:
        """Run every check in the documented order; raise :class:`_Fail` to refuse."""
        state = self.state
        if self.auth is not None and request.headers.get("Authorization") != self.auth:
            raise _Fail(401, _UNAUTHORIZED)
        raw = await _read_body(request)
        chat = _parse_chat(raw)
        state.by_model[chat.model] = state.by_model.get(chat.model, 0) + 1
        fault = self.model_faults.get(chat.model) if self.model_faults else None
        models = self.config.models
        if models is not None and chat.model not in models and fault is None:
            raise _not_found(
                f"The model `{chat.model}` does not exist or you do not have access to it.",
                "model_not_found",
            )
        plan = _plan(chat, self.config)
        if state.window is not None:
            state.window.admit(time.monotonic(), plan.rate_tokens, chat.model)
        if self.config.fail_first:
            self._fail_first(raw, chat)
        if fault is not None:
            self._model_fault(fault, raw, chat, plan)
        if self.config.finish_error_first:
            key = hashlib.blake2b(raw, digest_size=16).digest()
            seen = state.seen_finish.get(key, 0)
            if seen < self.config.finish_error_first:
                state.seen_finish[key] = seen + 1
                plan.finish_error = True
        if self.config.rate_429 or self.config.rate_500 or self.config.rate_invalid_json:
            self._random_fault(chat)
        return chat, plan

    def _fail_first(self, raw: bytes, chat: _Chat) -> None:
        key = hashlib.blake2b(raw, digest_size=16).digest()
        seen = self.state.seen.get(key, 0)
        if seen < self.config.fail_first:
            self.state.seen[key] = seen + 1
            raise self._injected(self.config.fail_status, chat)

    def _model_fault(self, fault: ModelFaults, raw: bytes, chat: _Chat, plan: _Plan) -> None:
        """Apply the model's fault, if this sighting of the body gets it: raise, or mark the plan."""
        state = self.state
        if fault.match is not None and fault.match.encode() not in raw:
            return
        if fault.first:
            key = hashlib.blake2b(raw, digest_size=16).digest()
            seen = state.seen_fault.get(key, 0)
            if seen >= fault.first:
                return
            state.seen_fault[key] = seen + 1
        kind = fault.kind
        state.faults_by_kind[kind] = state.faults_by_kind.get(kind, 0) + 1
        if kind in ("hang", "reset"):
            raise _Drop(kind)
        if kind == "truncated":
            plan.truncated = True
        elif kind == "content_filter_finish":
            for choice in plan.choices:
                choice.finish_reason = "content_filter"
                choice.content = choice.tool_name = choice.arguments = None
        elif kind == "finish_error":
            for choice in plan.choices:
                choice.finish_reason = "error"
        elif kind == "schema_violation":
            for choice in plan.choices:
                choice.content = '{"mock_unexpected": true}'
                choice.tool_name = choice.arguments = None
        elif kind == "refusal":
            for choice in plan.choices:
                choice.content = choice.tool_name = choice.arguments = None
                choice.refusal = "I'm sorry, but I can't help with that request."
                choice.finish_reason = "stop"
        elif kind == "reasoning_exhausted":
            for choice in plan.choices:
                choice.content = ""
                choice.tool_name = choice.arguments = None
                choice.finish_reason = "length"
                choice.reasoning_tokens = choice.completion_tokens
            plan.reasoning_tokens = plan.completion_tokens
        elif kind == "invalid_json":
            raise self._injected(0, chat)
        else:
            raise _fault_fail(fault, chat.model)

    def _random_fault(self, chat: _Chat) -> None:
        cfg = self.config
        draw = self.state.faults.random()
        if draw < cfg.rate_429:
            raise self._injected(429, chat)
        if draw < cfg.rate_429 + cfg.rate_500:
            raise self._injected(500, chat)
        if draw < cfg.rate_429 + cfg.rate_500 + cfg.rate_invalid_json:
            raise self._injected(0, chat)

    def _injected(self, status: int, chat: _Chat) -> _Fail:
        if status == 0:
            if chat.stream:
                return _Fail(200, _INVALID_SSE + b"data: [DONE]\n\n", None, "text/event-stream")
            return _Fail(200, _INVALID_JSON)
        if status == 429:
            wait = self.config.retry_after_s
            message = (
                f"Rate limit reached for {chat.model} in organization org-mock on requests per "
                f"min (RPM). Please try again in {_duration(wait)}."
            )
            body = _error_body(message, "requests", None, "rate_limit_exceeded")
            return _Fail(429, body, _retry_headers(wait))
        return _Fail(status, _SERVER_ERRORS.get(status) or _generic_error(status))

    async def _delay(self) -> None:
        cfg = self.config
        if cfg.latency_ms or cfg.jitter_ms:
            jitter = self.state.jitter.uniform(0.0, cfg.jitter_ms) if cfg.jitter_ms else 0.0
            await asyncio.sleep((cfg.latency_ms + jitter) / 1000.0)

    def _new_answer(self, chat: _Chat) -> _Answer:
        ids = self.state.ids
        calls = [f"call_{ids.getrandbits(96):024x}" for _ in range(chat.n if chat.tool else 0)]
        return _Answer(
            id=f"chatcmpl-{ids.getrandbits(96):024x}",
            created=int(time.time()),
            model=chat.model,
            call_ids=calls or [""] * chat.n,
        )

    async def _stream(
        self,
        request: web.BaseRequest,
        chat: _Chat,
        plan: _Plan,
        answer: _Answer,
        started: float,
    ) -> web.StreamResponse:
        headers = self._headers(started)
        headers["Cache-Control"] = "no-cache"
        response = web.StreamResponse(headers=headers)
        response.content_type = "text/event-stream"
        self._count(200)
        self.state.completions += 1
        with contextlib.suppress(ConnectionError):
            await response.prepare(request)
            # chunk size, pacing and mid-stream faults: pipeline/mock/stream_faults.py
            await stream_faults.send(request, response, chat, plan, answer, self.config)
        return response

    # ---------------------------------------------------------------- stored completions

    def _store(self, chat: _Chat, completion: dict[str, Any]) -> None:
        metadata = chat.body.get("metadata")
        self.state.stored[completion["id"]] = _Stored(
            completion=completion,
            messages=chat.messages,
            metadata=dict(metadata) if isinstance(metadata, dict) else {},
        )

    async def _other(self, request: web.BaseRequest, path: str) -> tuple[int, bytes]:
        """Every endpoint but chat creation; ``path`` has no ``/v1`` prefix."""
        method = request.method
        if method == "GET" and path == "/models":
            return 200, self._models()
        if method == "GET" and path.startswith("/models/"):
            return 200, self._model(path.removeprefix("/models/"))
        if method == "GET" and path == "/chat/completions":
            return 200, self._list(request.query)
        if path.startswith("/chat/completions/"):
            return 200, self._stored_route(method, path.removeprefix("/chat/completions/"))
        if method == "GET" and path == "/mock/stats":
            return 200, orjson.dumps(self.state.snapshot().to_dict())
        if method == "POST" and path == "/mock/reset":
            self.state.reset()
            return 200, b'{"reset": true}'
        raise _not_found(f"Invalid URL ({method} {request.path})")

    def _models(self) -> bytes:
        names = self.config.models or ()
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "mock"} for m in names]
        return orjson.dumps({"object": "list", "data": data})

    def _model(self, name: str) -> bytes:
        models = self.config.models
        if models is not None and name not in models:
            raise _not_found(
                f"The model `{name}` does not exist or you do not have access to it.",
                "model_not_found",
            )
        return orjson.dumps({"id": name, "object": "model", "created": 0, "owned_by": "mock"})

    def _stored_route(self, method: str, rest: str) -> bytes:
        completion_id, _, tail = rest.partition("/")
        stored = self.state.stored.get(completion_id)
        if stored is None or tail not in ("", "messages") or method not in ("GET", "DELETE"):
            raise _not_found(f"No chat completion found with id '{completion_id}'.")
        if method == "DELETE" and not tail:
            del self.state.stored[completion_id]
            deleted = {"object": "chat.completion.deleted", "id": completion_id, "deleted": True}
            return orjson.dumps(deleted)
        if tail == "messages":
            return orjson.dumps(_messages_page(completion_id, stored))
        return orjson.dumps(_stored_view(stored))

    def _list(self, query: Mapping[str, str]) -> bytes:
        wanted = {k[9:-1]: v for k, v in query.items() if k.startswith("metadata[") and k[-1:] == "]"}
        model = query.get("model")
        items = [
            s
            for s in self.state.stored.values()
            if all(s.metadata.get(k) == v for k, v in wanted.items())
            and (model is None or s.completion["model"] == model)
        ]
        if query.get("order") == "desc":
            items.reverse()
        return orjson.dumps(_page([_stored_view(s) for s in items], query))


_UNAUTHORIZED = _error_body("Incorrect API key provided.", "invalid_request_error", None, "invalid_api_key")
_SERVER_ERRORS = {
    500: _error_body(
        "The server had an error while processing your request. Sorry about that!",
        "server_error",
        None,
        None,
    ),
    503: _error_body("The server is overloaded or not ready yet.", "server_error", None, None),
}


_QUOTA = _error_body(
    "You exceeded your current quota, please check your plan and billing details. For more "
    "information on this error, read the docs: "
    "https://platform.openai.com/docs/guides/error-codes/api-errors.",
    "insufficient_quota",
    None,
    "insufficient_quota",
)
_NO_CREDITS = orjson.dumps(
    {
        "error": {
            "code": 402,
            "message": "Insufficient credits. Add more using https://openrouter.ai/settings/credits",
        }
    }
)
_CONTENT_FILTER = orjson.dumps(
    {
        "error": {
            "code": "content_filter",
            "message": (
                "The response was filtered due to the prompt triggering Azure OpenAI's content "
                "management policy. Please modify your prompt and retry. To learn more about our "
                "content filtering policies please read our documentation: "
                "https://go.microsoft.com/fwlink/?linkid=2198766"
            ),
            "param": "prompt",
            "type": None,
            "status": 400,
            "innererror": {
                "code": "ResponsibleAIPolicyViolation",
                "content_filter_result": {
                    "hate": {"filtered": False, "severity": "safe"},
                    "self_harm": {"filtered": False, "severity": "safe"},
                    "sexual": {"filtered": False, "severity": "safe"},
                    "violence": {"filtered": True, "severity": "medium"},
                },
            },
        }
    }
)
_STATUS_ERRORS: dict[int, tuple[str, str, str | None, str | None]] = {
    # status: (message, type, param, code), as OpenAI-compatible providers send them
    400: (
        "Invalid type for 'temperature': expected a decimal, but got a string instead.",
        "invalid_request_error",
        "temperature",
        "invalid_type",
    ),
    403: ("Country, region, or territory not supported", "request_forbidden", None,
          "unsupported_country_region_territory"),
    408: ("Request timed out.", "timeout", None, None),
    409: ("Conflict: another request with the same idempotency key is being processed.",
          "invalid_request_error", None, "conflict"),
    413: ("Request entity too large: the body exceeds the maximum allowed size.",
          "invalid_request_error", None, "request_too_large"),
    422: ("Unprocessable entity: 'messages[0].content' must be a string or an array of parts.",
          "invalid_request_error", "messages", "invalid_value"),
    500: ("The server had an error while processing your request. Sorry about that!",
          "server_error", None, None),
    502: ("Bad gateway.", "server_error", None, None),
    503: ("The server is overloaded or not ready yet.", "server_error", None, None),
    504: ("Gateway timeout: the upstream server did not answer in time.", "server_error", None, None),
    520: ("Web server returned an unknown error (Cloudflare 520).", "server_error", None, None),
    521: ("Web server is down (Cloudflare 521).", "server_error", None, None),
    522: ("Connection timed out (Cloudflare 522).", "server_error", None, None),
    523: ("Origin is unreachable (Cloudflare 523).", "server_error", None, None),
    524: ("A timeout occurred (Cloudflare 524).", "server_error", None, None),
    529: ("Overloaded", "overloaded_error", None, None),
}  # fmt: skip


def _status_body(status: int, model: str) -> bytes:
    if status == 401:
        return _UNAUTHORIZED
    if status == 402:
        return _NO_CREDITS
    if status == 404:
        message = f"The model `{model}` does not exist or you do not have access to it."
        return _error_body(message, "invalid_request_error", None, "model_not_found")
    known = _STATUS_ERRORS.get(status)
    return _generic_error(status) if known is None else _error_body(*known)


def _html_error(status: int) -> bytes:
    """The HTML page a CDN (Cloudflare) in front of a provider sends for a 5xx."""
    title = f"{status} {_HTML_TITLES.get(status, 'Server Error')}"
    return (
        f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n"
        f"<center><h1>{title}</h1></center>\r\n<hr><center>cloudflare</center>\r\n"
        "</body>\r\n</html>\r\n"
    ).encode()


_HTML_TITLES = {
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Temporarily Unavailable",
    504: "Gateway Time-out",
    520: "Web server is returning an unknown error",
    521: "Web server is down",
    522: "Connection timed out",
    523: "Origin is unreachable",
    524: "A timeout occurred",
}


def _fault_fail(fault: ModelFaults, model: str) -> _Fail:
    """The error answer of a status-like fault."""
    kind, status = fault.kind, fault.http_status
    if kind == "insufficient_quota":
        return _Fail(402, _NO_CREDITS) if status == 402 else _Fail(429, _QUOTA)
    if kind == "context_length":
        message = (
            "This model's maximum context length is 128000 tokens. However, your messages "
            "resulted in 130000 tokens. Please reduce the length of the messages."
        )
        return _Fail(
            400, _error_body(message, "invalid_request_error", "messages", "context_length_exceeded")
        )
    if kind == "content_filter_400":
        return _Fail(400, _CONTENT_FILTER)
    if status == 429:
        wait = fault.retry_after_s
        message = (
            f"Rate limit reached for {model} in organization org-mock on requests per min (RPM): "
            f"Limit 500, Used 500, Requested 1. Please try again in {_duration(wait)}."
        )
        body = _error_body(message, "requests", None, "rate_limit_exceeded")
        return _Fail(429, body, _retry_after_headers(wait, fault.retry_after))
    if fault.html:
        return _Fail(status, _html_error(status), None, "text/html")
    return _Fail(status, _status_body(status, model))


def _retry_after_headers(wait_s: float, how: str) -> dict[str, str]:
    if how == "both":
        return _retry_headers(wait_s)
    if how == "seconds":
        return {"retry-after": str(max(0, math.ceil(wait_s)))}
    if how == "date":  # whole seconds: the first second boundary at least wait_s away
        return {"retry-after": email.utils.formatdate(math.ceil(time.time() + wait_s), usegmt=True)}
    if how == "ms":
        return {"retry-after-ms": str(max(0, math.ceil(wait_s * 1000)))}
    return {}


def _generic_error(status: int) -> bytes:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return _error_body(f"Injected failure (HTTP {status}).", kind, None, None)


async def _read_body(request: web.BaseRequest) -> bytes:
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        message = f"Request body too large: the limit is {_MAX_BODY} bytes."
        raise _Fail(413, _error_body(message, "invalid_request_error", None, None)) from exc


def _stored_view(stored: _Stored) -> dict[str, Any]:
    return {**stored.completion, "metadata": stored.metadata}


def _messages_page(completion_id: str, stored: _Stored) -> dict[str, Any]:
    data = [{**message, "id": f"{completion_id}-{index}"} for index, message in enumerate(stored.messages)]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": False,
    }


def _page(items: list[dict[str, Any]], query: Mapping[str, str]) -> dict[str, Any]:
    """OpenAI cursor pagination: ``after`` (an id, exclusive) and ``limit`` (default 20)."""
    after = query.get("after")
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    try:
        limit = max(1, min(100, int(query.get("limit", "20"))))
    except ValueError:
        raise _bad_request("Invalid 'limit': expected an integer.", "limit") from None
    page = items[:limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(items) > limit,
    }


# --------------------------------------------------------------------------- running


def _request_factory() -> Callable[..., web.BaseRequest]:
    """Like aiohttp's default factory, with room for large prompts (64 MiB bodies)."""
    loop = asyncio.get_running_loop()

    def make(
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        return web.BaseRequest(message, payload, protocol, writer, task, loop, client_max_size=_MAX_BODY)

    return make


async def _serve(
    state: _State,
    ready: Callable[[int], None] | None,
    until: Callable[[], Awaitable[Any]],
) -> None:
    """Listen, report the port, wait for ``until()`` to finish, then close everything."""
    config = state.config
    # handler_cancellation: a client that gives up (closes the connection) cancels its
    # handler, so a hung request does not outlive its client.
    server = web.Server(
        _Provider(state),
        request_factory=_request_factory(),
        access_log=None,
        handler_cancellation=True,
    )
    runner = web.ServerRunner(server, shutdown_timeout=1.0)
    state.closing = asyncio.Event()
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port, backlog=1024, reuse_address=True)
        await site.start()
        if ready is not None:
            ready(int(runner.addresses[0][1]))
        await until()
    finally:
        state.closing.set()  # hung requests end (their connections are aborted)
        await runner.cleanup()


async def serve(config: MockConfig, *, ready: Callable[[int], None] | None = None) -> None:
    """Serve ``config`` in the running loop until cancelled; ``ready(port)`` once listening."""
    await _serve(_State(config), ready, asyncio.Event().wait)


def _url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/v1"


_DEFAULT_CONFIG = MockConfig()


class MockServer:
    """Runs the server in a background thread with its own asyncio loop."""

    def __init__(self, config: MockConfig = _DEFAULT_CONFIG) -> None:
        self.config = config
        self._state = _State(self.config)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._port: int | None = None
        self._error: BaseException | None = None

    def start(self) -> MockServer:
        """Start listening; blocks until the port is open (or raises why it could not)."""
        if self._thread is not None:
            raise RuntimeError("MockServer is already running")
        self._ready.clear()
        self._error = None
        thread = threading.Thread(target=self._run, name="mock-provider", daemon=True)
        self._thread = thread
        thread.start()
        self._ready.wait()
        error = self._take_error()
        if error is not None:
            thread.join()
            self._thread = None
            raise error
        return self

    def _take_error(self) -> BaseException | None:
        error, self._error = self._error, None
        return error

    def stop(self) -> None:
        """Close every connection and the listening socket; wait for the thread to end."""
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None:
            return
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop may already be closed
                loop.call_soon_threadsafe(stop.set)
        thread.join()
        self._thread = self._loop = self._stop = None

    def __enter__(self) -> MockServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("MockServer is not started")
        return self._port

    @property
    def base_url(self) -> str:
        """The OpenAI-style base URL, ``/v1`` included."""
        return _url(self.config.host, self.port)

    def stats(self) -> MockStats:
        """A consistent snapshot, safe to take from any thread."""
        return self._on_loop(self._state.snapshot)

    def reset(self) -> None:
        """Clear stats, fail-first memory, rate windows and stored completions; re-seed."""
        self._on_loop(self._state.reset)

    def _on_loop(self, work: Callable[[], _T]) -> _T:
        loop = self._loop
        if loop is None or threading.current_thread() is self._thread:
            return work()
        future: concurrent.futures.Future[_T] = concurrent.futures.Future()

        def call() -> None:
            try:
                future.set_result(work())
            except BaseException as exc:  # handed to the caller's thread
                future.set_exception(exc)

        try:
            loop.call_soon_threadsafe(call)
        except RuntimeError:  # the loop closed meanwhile: nothing else touches the state
            return work()
        return future.result(timeout=30)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by start()
            self._error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        try:
            await _serve(self._state, self._on_ready, self._stop.wait)
        finally:
            self._loop = None

    def _on_ready(self, port: int) -> None:
        self._port = port
        self._ready.set()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def main(config: MockConfig) -> None:
    """Blocking CLI entry: announce the URL on stdout, serve until SIGINT/SIGTERM."""

    def announce(port: int) -> None:
        print(f"mock server listening on {_url(config.host, port)}", flush=True)  # noqa: T201

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, stop.set)
        await _serve(_State(config), announce, stop.wait)

    with (
        contextlib.suppress(KeyboardInterrupt),
        asyncio.Runner(loop_factory=_loop_factory()) as runner,
    ):
        runner.run(run())
