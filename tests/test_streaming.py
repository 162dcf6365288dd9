"""Streaming: the SSE parser and the assembler (over httpx.MockTransport), then whole runs
with ``stream`` over real HTTP on loopback to the mock server, into a real SQLite file."""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from helpers import dict_rows, plain_rows, query, spec_file, write_jsonl

from pipeline.client import ChatClient, SSEParser
from pipeline.errors import InvalidResponse, RateLimited, RequestError, ServerError, TransportError
from pipeline.mock import MockServer
from pipeline.mock.stream_faults import StreamFaults
from pipeline.records import Completion
from pipeline.spec import EndpointSpec, RetrySpec, load_spec

BASE = "https://api.example.com/v1"
MESSAGES = [{"role": "user", "content": "Hello"}]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# --------------------------------------------------------------------------- the SSE parser


def feed_all(pieces: Iterable[bytes]) -> list[bytes]:
    parser = SSEParser()
    events: list[bytes] = []
    for piece in pieces:
        events += parser.feed(piece)
    return events + parser.close()


def splits(data: bytes, rng: random.Random) -> list[bytes]:
    """``data`` cut at random places (some pieces empty)."""
    cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.randrange(1, 12)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


SSE_TEXT = (
    b": OPENROUTER PROCESSING\n\n"
    b"event: message\n"
    b'data: {"a": 1}\n\n'
    b":keep-alive\n"
    b"id: 7\n"
    b"retry: 1000\n"
    b'data: {"b":\n'
    b"data: 2}\n\n"
    b"unknown-field: x\n"
    b"data:no-space\n\n"
    b"\n\n"
    b"data: [DONE]\n\n"
)
SSE_EVENTS = [b'{"a": 1}', b'{"b":\n2}', b"no-space", b"[DONE]"]


def test_sse_parser_skips_comments_and_joins_multi_line_data() -> None:
    """Comments and keep-alives are skipped, id/retry/unknown fields ignored, event: tolerated,
    multi-line data joined with LF, one leading space after the colon removed."""
    assert feed_all([SSE_TEXT]) == SSE_EVENTS


@pytest.mark.parametrize("ending", [b"\r\n", b"\r"], ids=["crlf", "cr"])
def test_sse_parser_reads_crlf_and_cr_line_endings(ending: bytes) -> None:
    assert feed_all([SSE_TEXT.replace(b"\n", ending)]) == SSE_EVENTS


@pytest.mark.parametrize("ending", [b"\n", b"\r\n", b"\r"], ids=["lf", "crlf", "cr"])
def test_sse_parser_is_indifferent_to_where_reads_split_the_bytes(ending: bytes) -> None:
    """Byte by byte, or cut anywhere (inside "data:", inside a CRLF, inside the JSON): the
    same events."""
    text = SSE_TEXT.replace(b"\n", ending)
    assert feed_all(text[i : i + 1] for i in range(len(text))) == SSE_EVENTS
    rng = random.Random(5)
    for _ in range(300):
        assert feed_all(splits(text, rng)) == SSE_EVENTS


def test_sse_parser_dispatches_a_last_event_the_body_did_not_end() -> None:
    parser = SSEParser()
    assert parser.feed(b"event: message\ndata: {}") == []
    assert parser.close() == [b"{}"]  # lenient: the body ended right after the data line
    assert parser.close() == []


# --------------------------------------------------------------------------- client over MockTransport


class Chunks(httpx.AsyncByteStream):
    """A response body that arrives in the given pieces, then optionally fails."""

    def __init__(self, pieces: Iterable[bytes], error: Exception | None = None) -> None:
        self.pieces = list(pieces)
        self.error = error

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for piece in self.pieces:
            yield piece
        if self.error is not None:
            raise self.error


def sse(*chunks: Any, done: bool = True, crlf: bool = False) -> bytes:
    text = b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks)
    text += b"data: [DONE]\n\n" if done else b""
    return text.replace(b"\n", b"\r\n") if crlf else text


def chunk(*choices: Any, **top: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-s1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "gpt-4o-mini-2024-07-18",
        "system_fingerprint": "fp_1",
        "choices": list(choices),
        **top,
    }


def delta(index: int = 0, finish: str | None = None, **d: Any) -> dict[str, Any]:
    return {"index": index, "delta": d, "finish_reason": finish}


USAGE = {
    "prompt_tokens": 9,
    "completion_tokens": 12,
    "total_tokens": 21,
    "completion_tokens_details": {"reasoning_tokens": 4},
}


class Sent:
    """The request bodies a handler saw."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []


def streaming(
    body: bytes, *, piece: int = 0, error: Exception | None = None, sent: Sent | None = None
) -> Any:
    def handler(request: httpx.Request) -> httpx.Response:
        if sent is not None:
            sent.bodies.append(orjson.loads(request.content))
        pieces = [body[i : i + piece] for i in range(0, len(body), piece)] if piece else [body]
        return httpx.Response(
            200,
            headers={"content-type": "text/event-stream", "x-request-id": "req_s"},
            stream=Chunks(pieces, error),
        )

    return handler


async def stream_once(handler: Any, body: dict[str, Any] | None = None, **retry: Any) -> Completion:
    client = ChatClient(
        EndpointSpec(name="e", base_url=BASE),
        base_url=BASE,
        api_key="sk-test",
        retry=RetrySpec(**retry),
        transport=httpx.MockTransport(handler),
    )
    try:
        completion, status = await client.complete("gpt-4o-mini", body or {"messages": MESSAGES}, stream=True)
        assert status == 200
        return completion
    finally:
        await client.aclose()


async def stream_failure(handler: Any, body: dict[str, Any] | None = None) -> RequestError:
    with pytest.raises(RequestError) as info:
        await stream_once(handler, body)
    return info.value


@pytest.mark.anyio
@pytest.mark.parametrize("piece", [0, 1, 7], ids=["whole", "byte-by-byte", "7-byte-reads"])
@pytest.mark.parametrize("crlf", [False, True], ids=["lf", "crlf"])
async def test_client_assembles_content_reasoning_and_usage_from_any_framing(piece: int, crlf: bool) -> None:
    body = sse(
        chunk(delta(role="assistant", content="")),
        chunk(delta(reasoning_content="Think")),
        chunk(delta(reasoning="ing.")),
        chunk(delta(content="Hel")),
        chunk(delta(content="lo!")),
        chunk(delta(finish="stop")),
        chunk(usage=USAGE),
        crlf=crlf,
    )
    body = b": keep-alive\n\n" + body  # a comment before the first event
    sent = Sent()
    c = await stream_once(streaming(body, piece=piece, sent=sent))
    assert (c.first.content, c.first.reasoning, c.first.finish_reason) == ("Hello!", "Thinking.", "stop")
    assert (c.response_id, c.model, c.system_fingerprint, c.provider_request_id) == (
        "chatcmpl-s1",
        "gpt-4o-mini-2024-07-18",
        "fp_1",
        "req_s",
    )
    assert c.usage is not None and (c.usage.prompt, c.usage.completion, c.usage.reasoning) == (9, 12, 4)
    assert not c.usage.estimated and not c.partial
    assert c.stream is not None and c.stream.ttft_ms is not None and c.stream.ttlt_ms is not None
    assert c.stream.ttlt_ms >= c.stream.ttft_ms
    # raw is the chat.completion a non-streamed call would have returned
    raw = orjson.loads(c.raw)
    assert raw == {
        "id": "chatcmpl-s1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Hello!",
                    "reasoning": "Thinking.",
                    "refusal": None,
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": USAGE,
        "system_fingerprint": "fp_1",
    }
    (request,) = sent.bodies
    assert request["stream"] is True and request["stream_options"] == {"include_usage": True}


@pytest.mark.anyio
async def test_client_reads_chunk_shapes_other_servers_send() -> None:
    """No role chunk first, the role repeated in every delta, usage on every chunk (the last
    wins), logprobs to merge, a choice index missing: the same assembly."""
    lp = {"content": [{"token": "a", "logprob": -0.1}]}
    body = sse(
        chunk(delta(content="Hel"), usage={"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}),
        chunk({"delta": {"role": "assistant", "content": "lo"}, "finish_reason": None, "logprobs": lp}),
        chunk(delta(role="assistant", content=" you"), usage={"prompt_tokens": 5, "completion_tokens": 3}),
        chunk(delta(finish="stop"), usage=USAGE),
    )
    c = await stream_once(streaming(body))
    assert (c.first.content, c.first.finish_reason) == ("Hello you", "stop")
    assert c.usage is not None and c.usage.completion == 12
    assert orjson.loads(c.raw)["choices"][0]["logprobs"] == lp


@pytest.mark.anyio
async def test_client_merges_the_rows_stream_options_and_forces_usage() -> None:
    sent = Sent()
    body = sse(chunk(delta(content="x", finish="stop")), chunk(usage=USAGE))
    row = {"messages": MESSAGES, "stream_options": {"include_usage": False, "include_obfuscation": False}}
    await stream_once(streaming(body, sent=sent), row)
    assert sent.bodies[0]["stream_options"] == {"include_usage": True, "include_obfuscation": False}
    assert sent.bodies[0]["model"] == "gpt-4o-mini"


@pytest.mark.anyio
async def test_client_reassembles_tool_calls_from_fragments_by_index() -> None:
    """Two parallel calls, their arguments in fragments, interleaved; id/type/name come from
    each call's first fragment."""

    def call(index: int, **f: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"index": index}
        for k in ("id", "type"):
            if k in f:
                out[k] = f.pop(k)
        out["function"] = f
        return out

    body = sse(
        chunk(
            delta(
                role="assistant",
                content=None,
                tool_calls=[call(0, id="call_a", type="function", name="f", arguments="")],
            )
        ),
        chunk(delta(tool_calls=[call(0, arguments='{"ci')])),
        chunk(delta(tool_calls=[call(1, id="call_b", type="function", name="g", arguments='{"x"')])),
        chunk(delta(tool_calls=[call(0, arguments='ty": "Paris"}')])),
        chunk(delta(tool_calls=[call(1, arguments=": 1}")])),
        chunk(delta(finish="tool_calls")),
        chunk(usage=USAGE),
    )
    c = await stream_once(streaming(body, piece=5))
    assert c.first.content is None and c.first.finish_reason == "tool_calls"
    assert c.first.tool_calls == [
        {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": '{"city": "Paris"}'}},
        {"id": "call_b", "type": "function", "function": {"name": "g", "arguments": '{"x": 1}'}},
    ]
    assert orjson.loads(c.raw)["choices"][0]["message"]["tool_calls"] == c.first.tool_calls


@pytest.mark.anyio
async def test_client_keeps_choices_apart_for_n_greater_than_1_and_refusals() -> None:
    body = sse(
        chunk(delta(0, role="assistant", content=""), delta(1, role="assistant", content="")),
        chunk(delta(1, content="B1")),
        chunk(delta(0, content="A1")),
        chunk(delta(1, refusal="I can't")),
        chunk(delta(0, content="A2", finish="stop"), delta(1, finish="stop")),
        chunk(usage=USAGE),
    )
    c = await stream_once(streaming(body))
    assert [(ch.index, ch.content, ch.refusal, ch.finish_reason) for ch in c.choices] == [
        (0, "A1A2", None, "stop"),
        (1, "B1", "I can't", "stop"),
    ]


@pytest.mark.anyio
async def test_a_stream_without_usage_gets_an_estimate_flagged_as_such() -> None:
    body = sse(chunk(delta(content="one two three four five six seven eight", finish="stop")))
    c = await stream_once(streaming(body))
    assert c.usage is not None and c.usage.estimated
    assert c.usage.prompt > 0 and c.usage.completion > 0
    assert c.usage.total == c.usage.prompt + c.usage.completion
    assert c.usage.raw is None  # nothing reported
    assert orjson.loads(c.raw)["usage"]["estimated"] is True


@pytest.mark.anyio
async def test_an_error_event_mid_stream_raises_by_its_code_with_the_partial_answer() -> None:
    """OpenRouter: HTTP 200, then {"error": {"code": 502, ...}} after some tokens."""
    body = sse(
        chunk(delta(content="Hel")),
        chunk(delta(content="", finish="error"), error={"code": 502, "message": "Provider disconnected"}),
    )
    exc = await stream_failure(streaming(body))
    assert isinstance(exc, ServerError) and exc.status == 502
    assert "Provider disconnected" in exc.message
    assert exc.completion is not None and exc.completion.partial
    assert exc.completion.first.content == "Hel" and exc.completion.usage.estimated


@pytest.mark.anyio
async def test_a_vllm_error_object_mid_stream_is_classified_by_its_code() -> None:
    body = sse(chunk(delta(content="x")), {"object": "error", "message": "context too long", "code": 400})
    exc = await stream_failure(streaming(body))
    assert exc.status == 400 and "context too long" in exc.message


@pytest.mark.anyio
async def test_a_cut_stream_is_truncated_with_what_arrived() -> None:
    body = sse(chunk(delta(content="Hello, wor")), done=False)
    cut = httpx.RemoteProtocolError("peer closed connection without sending complete message body")
    exc = await stream_failure(streaming(body, piece=4, error=cut))
    assert isinstance(exc, TransportError) and exc.what == "truncated"
    assert exc.completion is not None and exc.completion.partial
    assert exc.completion.first.content == "Hello, wor"


@pytest.mark.anyio
async def test_an_idle_stream_is_a_read_timeout() -> None:
    body = sse(chunk(delta(content="Hi")), done=False)
    exc = await stream_failure(streaming(body, error=httpx.ReadTimeout("no data")))
    assert isinstance(exc, TransportError) and exc.what == "read_timeout" and "idle" in exc.message
    assert exc.completion is not None and exc.completion.first.content == "Hi"


@pytest.mark.anyio
async def test_an_end_before_done_is_truncated_unless_every_choice_finished() -> None:
    unfinished = sse(chunk(delta(content="Hel")), done=False)
    exc = await stream_failure(streaming(unfinished))
    assert isinstance(exc, TransportError) and exc.what == "truncated" and "[DONE]" in exc.message
    # Every choice finished and usage came: the answer is whole, [DONE] alone is missing.
    finished = sse(chunk(delta(content="Hello", finish="stop")), chunk(usage=USAGE), done=False)
    c = await stream_once(streaming(finished))
    assert c.first.content == "Hello" and c.usage is not None and not c.usage.estimated


@pytest.mark.anyio
async def test_invalid_json_in_a_chunk_and_finish_reason_error_are_invalid_responses() -> None:
    bad = b'data: {"choices": [{"index": 0, "delta": {"content": "a"}}]}\n\ndata: {"cho\n\n'
    exc = await stream_failure(streaming(bad))
    assert isinstance(exc, InvalidResponse) and exc.code is None
    assert exc.completion is not None and exc.completion.first.content == "a"
    errored = sse(chunk(delta(content="a", finish="error")), chunk(usage=USAGE))
    exc = await stream_failure(streaming(errored))
    assert isinstance(exc, InvalidResponse) and exc.code == "finish_reason_error"
    assert exc.completion is not None and not exc.completion.partial and exc.completion.usage.prompt == 9


@pytest.mark.anyio
async def test_errors_before_the_stream_and_json_answers_are_read_as_usual() -> None:
    def rate_limited(request: httpx.Request) -> httpx.Response:
        error = {"error": {"message": "slow down", "type": "requests", "code": "rate_limit_exceeded"}}
        return httpx.Response(429, json=error, headers={"retry-after": "2"})

    exc = await stream_failure(rate_limited)
    assert isinstance(exc, RateLimited) and exc.retry_after == 2.0

    def not_streamed(request: httpx.Request) -> httpx.Response:  # a server that ignores stream
        message = {"role": "assistant", "content": "plain"}
        answer = {"id": "x", "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}
        return httpx.Response(200, json=answer)

    c = await stream_once(not_streamed)
    assert c.first.content == "plain"


# --------------------------------------------------------------------------- whole runs


def write_spec(workdir: Path, base_url: str, *, top: str = "", retry: str = "") -> Path:
    return spec_file(
        workdir / "job.toml",
        base_url,
        job="s",
        top=top,
        retry=retry,
        extra="\n[prices.mock-large]\ninput = 0.15\noutput = 0.60",
    )


def run(cli: Callable[..., Any], spec: Path, db: str, *more: str) -> Any:
    return cli("run", spec, "--db", db, "--out", "out", "-q", *more)


FINAL = """
SELECT r.custom_id, r.state, c.content, c.reasoning, c.refusal, c.finish_reason, c.tool_calls,
       c.choices_json, c.model AS response_model, a.prompt_tokens, a.completion_tokens,
       a.total_tokens, a.reasoning_tokens, a.cached_tokens, a.usage_estimated, a.cost_picousd
FROM request r
JOIN attempt a ON a.run_id = r.run_id AND a.custom_id = r.custom_id AND a.attempt_no = r.final_attempt_no
JOIN completion c ON c.run_id = a.run_id AND c.custom_id = a.custom_id AND c.attempt_no = a.attempt_no
ORDER BY r.seq
"""


def attempts(db: str, custom_id: str) -> list[dict[str, Any]]:
    return dict_rows(
        db,
        """SELECT a.*, c.content, c.finish_reason FROM attempt a LEFT JOIN completion c
           ON c.run_id = a.run_id AND c.custom_id = a.custom_id AND c.attempt_no = a.attempt_no
           WHERE a.custom_id = ? ORDER BY a.attempt_no""",
        custom_id,
    )


def exported(cli: Callable[..., Any], db: str, target: str) -> list[dict[str, Any]]:
    r = cli("export", "s", "--db", db, "--format", "jsonl", "-o", target)
    assert r.exit_code == 0, r.stderr
    return [orjson.loads(line) for line in Path(target).read_bytes().splitlines()]


def comparable(body: dict[str, Any]) -> dict[str, Any]:
    """A response body without what differs between any two calls (ids, times), nor the
    empty annotations list non-streamed answers carry."""
    out = {k: v for k, v in body.items() if k not in ("id", "created")}
    out["choices"] = [
        {**ch, "message": {k: v for k, v in ch["message"].items() if k != "annotations"}}
        for ch in body["choices"]
    ]
    return out


def test_streamed_and_non_streamed_runs_store_the_same_answers_usage_and_exports(
    workdir: Path,
    new_db: Callable[[str], str],
    mock_server: Callable[..., MockServer],
    cli: Callable[..., Any],
) -> None:
    """The same input, once plain and once with --stream (16- and 5-character deltas): the
    same content, reasoning, finish reasons (length included), n > 1 choices, usage and cost
    in the database, and the same exported response bodies."""
    plain_db = new_db("plain.db")
    streamed_db = new_db("streamed.db")
    plain_server = mock_server(reasoning_tokens=6)
    stream_server = mock_server(reasoning_tokens=6, streaming=StreamFaults(chunk_chars=5))
    data = plain_rows(6)
    data[4]["n"] = 2
    data[5]["max_tokens"] = 9  # the answer is cut: finish_reason "length"
    write_jsonl(workdir / "in.jsonl", data)
    spec = write_spec(workdir, plain_server.base_url)
    assert run(cli, spec, plain_db).exit_code == 0
    r = run(cli, spec, streamed_db, "--stream", "--base-url", stream_server.base_url)
    assert r.exit_code == 0, r.stderr

    plain, streamed = dict_rows(plain_db, FINAL), dict_rows(streamed_db, FINAL)
    assert len(plain) == 6 and plain == streamed
    assert {p["finish_reason"] for p in plain} == {"stop", "length"}
    assert all(p["reasoning"] and p["completion_tokens"] > 0 and not p["usage_estimated"] for p in plain)
    assert len(orjson.loads(plain[4]["choices_json"])) == 2

    flags = "SELECT stream, ttft_ms, ttlt_ms, partial FROM attempt"
    assert all(a["stream"] == 0 and a["ttft_ms"] is None for a in dict_rows(plain_db, flags))
    for a in dict_rows(streamed_db, flags):
        assert a["stream"] == 1 and a["partial"] == 0
        assert 0 < a["ttft_ms"] <= a["ttlt_ms"]

    plain_lines = exported(cli, plain_db, "plain.jsonl")
    streamed_lines = exported(cli, streamed_db, "streamed.jsonl")
    assert [comparable(x["response"]["body"]) for x in plain_lines] == [
        comparable(x["response"]["body"]) for x in streamed_lines
    ]
    assert streamed_lines[0]["response"]["body"]["object"] == "chat.completion"
    assert plain_server.stats().completions == stream_server.stats().completions == 6


def test_tool_call_fragments_are_reassembled(
    workdir: Path,
    new_db: Callable[[str], str],
    mock_server: Callable[..., MockServer],
    cli: Callable[..., Any],
) -> None:
    """tool_choice "required": the arguments arrive in 3-character fragments and are stored
    whole, as the non-streamed answer has them."""
    plain_db = new_db("plain.db")
    streamed_db = new_db("streamed.db")
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
                "required": ["city", "days"],
            },
        },
    }
    data = [dict(r, tools=[tool], tool_choice="required") for r in plain_rows(3)]
    write_jsonl(workdir / "in.jsonl", data)
    plain_server = mock_server()
    stream_server = mock_server(streaming=StreamFaults(chunk_chars=3))
    spec = write_spec(workdir, plain_server.base_url)
    assert run(cli, spec, plain_db).exit_code == 0
    r = run(cli, spec, streamed_db, "--stream", "--base-url", stream_server.base_url)
    assert r.exit_code == 0, r.stderr
    plain, streamed = dict_rows(plain_db, FINAL), dict_rows(streamed_db, FINAL)
    for p, s in zip(plain, streamed, strict=True):
        assert s["finish_reason"] == "tool_calls" and s["content"] is None
        (p_call,), (s_call,) = orjson.loads(p["tool_calls"]), orjson.loads(s["tool_calls"])
        assert s_call["id"].startswith("call_") and s_call["type"] == "function"
        assert s_call["function"] == p_call["function"]
        arguments = orjson.loads(s_call["function"]["arguments"])
        assert set(arguments) == {"city", "days"}
        assert (p["completion_tokens"], p["total_tokens"]) == (s["completion_tokens"], s["total_tokens"])


def test_a_stream_cut_mid_way_is_retried_and_the_partial_attempt_recorded(
    workdir: Path, db: str, mock_server: Callable[..., MockServer], cli: Callable[..., Any]
) -> None:
    """The first stream of each request is cut after 3 events: that attempt is recorded
    (transport, partial, what arrived, estimated usage priced), the retry succeeds."""
    server = mock_server(streaming=StreamFaults(chunk_chars=8, cut_after=3, first=1))
    write_jsonl(workdir / "in.jsonl", plain_rows(3))
    spec = write_spec(workdir, server.base_url, top="stream = true")
    r = run(cli, spec, db)
    assert r.exit_code == 0, r.stderr
    for i in range(3):
        cut, ok = attempts(db, f"q-{i}")
        assert (cut["outcome"], cut["error_class"], cut["stream"], cut["partial"]) == (
            "retry",
            "transport",
            1,
            1,
        )
        assert "cut" in cut["error_message"]
        assert cut["content"] == ok["content"][:16]  # role delta + two 8-character deltas
        assert cut["usage_estimated"] == 1 and cut["completion_tokens"] > 0 and cut["cost_picousd"] > 0
        assert cut["ttft_ms"] is not None and cut["http_status"] == 200  # the stream broke after its 200
        assert (ok["outcome"], ok["partial"], ok["usage_estimated"], ok["http_status"]) == (
            "success",
            0,
            0,
            200,
        )
    assert query(db, "SELECT state, attempts FROM request") == [("succeeded", 2)] * 3


@pytest.mark.parametrize(
    ("status", "rule", "outcome", "exit_code"),
    [(502, "server_error", "retry", 0), (400, "bad_request", "fail", 1)],
)
def test_an_error_event_mid_stream_is_classified_by_the_policy_table(
    workdir: Path,
    db: str,
    mock_server: Callable[..., MockServer],
    cli: Callable[..., Any],
    status: int,
    rule: str,
    outcome: str,
    exit_code: int,
) -> None:
    """An error event after two events (HTTP 200 already sent): a 502 code is retried, a 400
    fails the request; either way the partial answer is kept with the attempt."""
    server = mock_server(streaming=StreamFaults(error_after=2, error_status=status, first=1))
    write_jsonl(workdir / "in.jsonl", plain_rows(2))
    spec = write_spec(workdir, server.base_url)
    r = run(cli, spec, db, "--stream")
    assert r.exit_code == exit_code, r.stderr
    first, *rest = attempts(db, "q-0")
    assert (first["http_status"], first["error_class"], first["outcome"]) == (status, rule, outcome)
    assert first["partial"] == 1 and first["content"] and "error event" in first["error_message"]
    if outcome == "retry":
        assert [a["outcome"] for a in rest] == ["success"]
    else:
        assert rest == [] and query(db, "SELECT DISTINCT state FROM request") == [("failed",)]


def test_a_stream_without_usage_gets_estimated_usage_flagged_and_priced(
    workdir: Path, db: str, mock_server: Callable[..., MockServer], cli: Callable[..., Any]
) -> None:
    server = mock_server(streaming=StreamFaults(no_usage=True))
    write_jsonl(workdir / "in.jsonl", plain_rows(3))
    spec = write_spec(workdir, server.base_url, top="stream = true")
    assert run(cli, spec, db).exit_code == 0
    for a in dict_rows(db, "SELECT * FROM attempt"):
        assert (a["outcome"], a["usage_estimated"], a["partial"]) == ("success", 1, 0)
        assert a["prompt_tokens"] > 0 and a["completion_tokens"] > 0 and a["cost_picousd"] > 0
    # the equivalent chat.completion stored carries the estimate, flagged as one
    for c in dict_rows(db, "SELECT raw FROM completion"):
        assert orjson.loads(c["raw"])["usage"]["estimated"] is True
    assert query(db, "SELECT COUNT(*) FROM attempt_bill WHERE usage_estimated") == [(3,)]


def test_the_idle_timeout_fires_on_a_stalled_stream_before_the_deadline(
    workdir: Path, db: str, mock_server: Callable[..., MockServer], cli: Callable[..., Any]
) -> None:
    """The first stream stalls after two events; with a 0.3 s idle timeout (and long read
    timeout and deadline) the attempt fails as a read timeout within a second, the retry
    succeeds."""
    server = mock_server(streaming=StreamFaults(stall_after=2, first=1, stall_s=30))
    write_jsonl(workdir / "in.jsonl", plain_rows(1))
    spec = write_spec(
        workdir,
        server.base_url,
        top="stream = true",
        retry="stream_idle_timeout_s = 0.3\nread_timeout_s = 600\ndeadline_s = 1800",
    )
    t0 = time.monotonic()
    r = run(cli, spec, db)
    assert r.exit_code == 0, r.stderr
    assert time.monotonic() - t0 < 10
    stalled, ok = attempts(db, "q-0")
    assert (stalled["outcome"], stalled["error_class"], stalled["partial"]) == ("retry", "transport", 1)
    assert "idle" in stalled["error_message"]
    assert 250 <= stalled["latency_ms"] < 1000
    assert ok["outcome"] == "success"


def test_an_end_before_done_is_retried_and_a_missing_done_alone_is_accepted(
    workdir: Path,
    new_db: Callable[[str], str],
    mock_server: Callable[..., MockServer],
    cli: Callable[..., Any],
) -> None:
    a_db = new_db("a.db")
    b_db = new_db("b.db")
    short = mock_server(streaming=StreamFaults(end_after=2, first=1))
    write_jsonl(workdir / "in.jsonl", plain_rows(1))
    spec = write_spec(workdir, short.base_url, top="stream = true")
    assert run(cli, spec, a_db).exit_code == 0
    ended, ok = attempts(a_db, "q-0")
    assert (ended["error_class"], ended["partial"], ok["outcome"]) == ("transport", 1, "success")
    assert "[DONE]" in ended["error_message"]

    no_done = mock_server(streaming=StreamFaults(no_done=True, comments=True))
    assert run(cli, spec, b_db, "--base-url", no_done.base_url).exit_code == 0
    (only,) = attempts(b_db, "q-0")
    assert (only["outcome"], only["partial"], only["usage_estimated"]) == ("success", 0, 0)


def test_stream_is_set_per_job_per_route_and_by_flag(
    workdir: Path, db: str, mock_server: Callable[..., MockServer], cli: Callable[..., Any]
) -> None:
    """The job's ``stream`` is every route's default; a route table's own ``stream`` wins; an
    error before the stream starts (a 404) falls back as usual."""
    server = mock_server()
    write_jsonl(workdir / "in.jsonl", plain_rows(2))
    spec = write_spec(
        workdir,
        server.base_url,
        top='stream = true\nfallbacks = [{ model = "mock-large", stream = false }]',
    )
    r = run(cli, spec, db, "--model", "no-such-model")
    assert r.exit_code == 0, r.stderr
    missing, ok = attempts(db, "q-0")
    assert (missing["model"], missing["stream"], missing["http_status"], missing["outcome"]) == (
        "no-such-model",
        1,
        404,
        "fallback",
    )
    assert (ok["model"], ok["stream"], ok["ttft_ms"], ok["outcome"]) == ("mock-large", 0, None, "success")

    assert [r.stream for r in load_spec(spec).routes] == [True, False]
    job = load_spec(spec, {"stream": False})  # what --no-stream does
    assert [r.stream for r in job.routes] == [False, False] and job.retry.stream_idle_timeout_s == 60.0
    job = load_spec(None, {"input": {"path": str(workdir / "in.jsonl")}, "base_url": BASE, "model": "m"})
    assert job.routes[0].stream is False and job.redacted()["routes"][0]["stream"] is False
