"""HTTP: send one attempt to ``POST {base_url}/chat/completions`` and parse the answer.

Returns a :class:`~pipeline.records.Completion` or raises one of the
:class:`~pipeline.errors.RequestError` kinds; httpx's exceptions never leave this module.
Error bodies are read in the shapes real servers use: OpenAI and OpenRouter
(``{"error": {"message", "type", "code"}}``), vLLM (``{"object": "error", "message", ...}``),
FastAPI/LiteLLM proxies (``{"detail": ...}``) and plain text. No retries here.

Streamed (``stream=True``): the server-sent events are parsed by :class:`SSEParser` and
assembled by :class:`StreamAssembler` into the same Completion, with time to first and last
token; a stream that breaks raises the same RequestError kinds, carrying what arrived.
"""

from __future__ import annotations

import email.utils
import re
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import anyio
import httpx
import orjson

from pipeline.errors import (
    ClientError,
    HTTPStatusError,
    InvalidResponse,
    RateLimited,
    RequestError,
    ServerError,
    TransportError,
)
from pipeline.records import Choice, Completion, RateInfo, StreamTiming, Usage
from pipeline.spec import EndpointSpec, RetrySpec
from pipeline.tokens import count_text, estimate_prompt_tokens
from pipeline.transport import AiohttpTransport, Post

__all__ = ["ChatClient", "parse_completion", "parse_duration", "parse_rate_headers", "parse_retry_after"]

USER_AGENT = "llm-batch-pipeline/0.1"


class ChatClient:
    """Sends chat-completion requests to one endpoint."""

    def __init__(
        self,
        endpoint: EndpointSpec,
        *,
        base_url: str,
        api_key: str | None,
        retry: RetrySpec,
        transport: httpx.AsyncBaseTransport,
    ) -> None:
        self.endpoint = endpoint
        headers = {
            "user-agent": USER_AGENT,
            "content-type": "application/json",
            **dict(endpoint.headers),
        }
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._http = httpx.AsyncClient(
            transport=transport,
            headers=headers,
            timeout=httpx.Timeout(
                connect=retry.connect_timeout_s,
                read=retry.read_timeout_s,
                write=retry.read_timeout_s,
                pool=None,
            ),
            follow_redirects=False,
        )
        # Streamed: the read timeout is the idle timeout between chunks; the total is the
        # worker's deadline.
        idle = retry.stream_idle_timeout_s
        self._stream_timeout = httpx.Timeout(
            connect=retry.connect_timeout_s,
            read=idle if idle > 0 else None,
            write=retry.read_timeout_s,
            pool=None,
        )

        # The hot path (one non-streamed attempt) hands a ready httpx.Request straight to the
        # transport: AsyncClient's per-request URL merging, cookie extraction, auth and
        # redirect machinery cost about a fifth of the pipeline's CPU per request and do
        # nothing here (no cookies, no redirects, the key is a fixed header).
        self._transport = transport
        self._post_url = httpx.URL(self._url)
        self._post_headers = list(self._http.headers.multi_items())
        t = self._http.timeout
        self._post_timeout = {"connect": t.connect, "read": t.read, "write": t.write, "pool": t.pool}
        # Over the pipeline's own transport, not even an httpx.Request/Response: the prepared
        # Post sends through aiohttp directly, with the same headers, timeouts and errors.
        self._fast: Post | None = None
        if type(transport) is AiohttpTransport:
            self._fast = transport.post(self._post_url, self._post_headers, self._post_timeout)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _post(self, payload: bytes) -> tuple[int, Mapping[str, str], bytes]:
        """Status, headers and body of one non-streamed POST (raises httpx's exceptions)."""
        if self._fast is not None:
            return await self._fast(payload)
        request = httpx.Request(
            "POST",
            self._post_url,
            headers=self._post_headers,
            content=payload,
            extensions={"timeout": self._post_timeout},
        )
        response = await self._transport.handle_async_request(request)
        try:
            await response.aread()
        finally:
            await response.aclose()
        return response.status_code, response.headers, response.content

    async def find_stored(self, metadata: Mapping[str, str]) -> Completion | None:
        """A completion stored at the provider (``store: true``) whose metadata matches, if any.

        Uses ``GET /chat/completions?metadata[k]=v``. Any failure means "not found": the
        caller then sends the request again, which is what it would do without recovery.
        """
        params = {f"metadata[{k}]": v for k, v in metadata.items()}
        params["limit"] = "1"
        try:
            response = await self._http.get(self._url, params=params)
        except httpx.HTTPError:
            return None
        if response.status_code != 200:
            return None
        try:
            data = orjson.loads(response.content).get("data")
        except (orjson.JSONDecodeError, AttributeError):
            return None
        if not isinstance(data, list) or not data or not isinstance(data[0], dict):
            return None
        try:
            return parse_completion(orjson.dumps(data[0]), request_id=response.headers.get("x-request-id"))
        except RequestError:
            return None

    async def complete(
        self, model: str, body: Mapping[str, Any], *, stream: bool = False
    ) -> tuple[Completion, int]:
        """One attempt. Returns the completion and the HTTP status, or raises RequestError.

        With ``stream`` the answer is read as server-sent events and assembled into the same
        Completion (see :meth:`_complete_stream`).
        """
        if stream:
            return await self._complete_stream(model, body)
        payload = orjson.dumps({"model": model, **body})
        try:
            status, headers, content = await self._post(payload)
        except (httpx.TransportError, httpx.DecodingError) as exc:
            raise _transport_error(exc, streamed=False) from exc
        request_id = headers.get("x-request-id") or headers.get("request-id")
        rate = parse_rate_headers(headers)
        if 200 <= status < 300:
            try:
                return parse_completion(content, request_id=request_id, rate=rate), status
            except RequestError as exc:  # a 200 whose body is unusable: keep its status
                exc.rate = rate
                exc.status = exc.status or status
                raise
        error = error_from_response(status, content, headers, request_id)
        error.rate = rate
        raise error

    async def _complete_stream(self, model: str, body: Mapping[str, Any]) -> tuple[Completion, int]:
        """One streamed attempt: ``stream: true`` with ``include_usage``, read as SSE.

        A broken stream (a cut, an error event, an idle timeout, an end before ``[DONE]``)
        raises the RequestError kind the policy table knows, carrying what arrived as a
        partial Completion (``.completion``, ``partial=True``) so the bill and the audit see it.
        """
        payload = orjson.dumps(_stream_body(model, body))
        # Straight to the transport, as the non-streamed hot path does (see _post).
        request = httpx.Request(
            "POST",
            self._post_url,
            headers=self._post_headers,
            content=payload,
            extensions={"timeout": self._stream_timeout.as_dict()},
        )
        t0 = time.perf_counter()
        try:
            response = await self._transport.handle_async_request(request)
        except httpx.HTTPError as exc:
            raise _transport_error(exc, self._stream_timeout.read) from exc
        try:
            return await self._read_stream(response, body, t0)
        finally:
            await response.aclose()

    async def _read_stream(
        self, response: httpx.Response, body: Mapping[str, Any], t0: float
    ) -> tuple[Completion, int]:
        request_id = response.headers.get("x-request-id") or response.headers.get("request-id")
        status = response.status_code
        rate = parse_rate_headers(response.headers)
        idle = self._stream_timeout.read
        if not 200 <= status < 300 or "json" in response.headers.get("content-type", ""):
            # An error before the stream began, or a server that answered without streaming.
            try:
                raw = await response.aread()
            except httpx.HTTPError as exc:
                raise _transport_error(exc, idle) from exc
            try:
                if 200 <= status < 300:
                    completion = parse_completion(raw, request_id=request_id)
                    return (completion._replace(rate=rate) if rate else completion), status
                raise error_from_response(status, raw, response.headers, request_id)
            except RequestError as exc:  # a 200 whose body is unusable: keep its status
                exc.rate = rate
                exc.status = exc.status or status
                raise
        assembler = StreamAssembler(t0, request_id=request_id)
        parser = SSEParser()
        done = False
        chunks = response.aiter_bytes()
        try:
            try:
                async for data in chunks:
                    if assembler.take_all(parser.feed(data), time.perf_counter()):
                        done = True
                        break
                else:
                    done = assembler.take_all(parser.close(), time.perf_counter())
            except httpx.HTTPError as exc:
                raise _transport_error(exc, idle) from exc
            if done:
                await _drain(chunks)
            completion = assembler.finish(body, done=done)
        except RequestError as exc:  # broken after the 200: keep it (an error event has its own code)
            exc.rate = rate
            exc.status = exc.status or status
            if exc.completion is None:
                exc.completion = assembler.partial(body)
            raise
        return (completion._replace(rate=rate) if rate else completion), status


def parse_completion(
    raw: bytes, *, request_id: str | None = None, rate: RateInfo | None = None
) -> Completion:
    """A ``chat.completion`` body into a Completion, or InvalidResponse / an error in the body.

    ``rate``: the rate-limit headers that came with it, kept on the Completion."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidResponse(
            f"invalid JSON in a 200 response: {exc}",
            provider_request_id=request_id,
            body=_snippet(raw),
        ) from None
    if not isinstance(data, dict):
        raise InvalidResponse("a 200 response that is not a JSON object", provider_request_id=request_id)
    usage = Usage.from_api(data.get("usage"))
    choices_raw = data.get("choices")
    if "error" in data and not choices_raw:
        # OpenRouter and some proxies put an upstream error in a 200 body.
        status, message, code = _error_fields(data)
        raise _status_error(status or 502, message, code, None, request_id, data)
    if not isinstance(choices_raw, list) or not choices_raw:
        raise InvalidResponse(
            "a 200 response without choices", provider_request_id=request_id, body=_snippet(raw)
        )
    choices = []
    failed = False
    for i, c in enumerate(choices_raw):
        if not isinstance(c, dict):
            raise InvalidResponse(f"choices[{i}] is not an object", provider_request_id=request_id)
        msg = c.get("message") or {}
        if not isinstance(msg, dict):
            raise InvalidResponse(f"choices[{i}].message is not an object", provider_request_id=request_id)
        index = c.get("index", i)
        finish = c.get("finish_reason")
        if finish == "error":
            failed = True
        choices.append(
            Choice(  # positional, in the order of the fields (faster than keywords)
                index if isinstance(index, int) else i,  # index
                finish,  # finish_reason
                _text(msg.get("content")),  # content
                _text(msg.get("reasoning") or msg.get("reasoning_content")),  # reasoning
                _text(msg.get("refusal")),  # refusal
                msg.get("tool_calls") or None,  # tool_calls
            )
        )
    created = data.get("created")
    completion = Completion(  # positional, in the order of the fields
        _str(data.get("id")),  # response_id
        _str(data.get("model")),  # model
        _str(data.get("provider")),  # provider
        _str(data.get("system_fingerprint")),  # system_fingerprint
        created if isinstance(created, int) else None,  # created
        tuple(choices),  # choices
        usage,  # usage
        raw,  # raw
        request_id,  # provider_request_id
        None,  # stream
        False,  # partial
        None if failed else rate,  # rate (an error carries it itself)
    )
    if failed:
        err = InvalidResponse(
            'the provider ended the answer with finish_reason "error"',
            code="finish_reason_error",
            provider_request_id=request_id,
        )
        err.completion = completion
        raise err
    return completion


def error_from_response(
    status: int, raw: bytes, headers: Mapping[str, str], request_id: str | None
) -> HTTPStatusError:
    try:
        data: Any = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, dict):
        _, message, code = _error_fields(data)
    else:
        message, code = (_snippet(raw) or f"HTTP {status}"), None
    return _status_error(status, message, code, parse_retry_after(headers), request_id, data, dict(headers))


def _status_error(
    status: int,
    message: str,
    code: str | None,
    retry_after: float | None,
    request_id: str | None,
    body: Any,
    headers: dict[str, str] | None = None,
) -> HTTPStatusError:
    kw: dict[str, Any] = dict(
        status=status,
        code=code,
        retry_after=retry_after,
        provider_request_id=request_id,
        body=body,
        headers=headers,
    )
    text = f"HTTP {status}: {message}"
    if status == 429:
        return RateLimited(text, **kw)
    if status >= 500:
        return ServerError(text, **kw)
    return ClientError(text, **kw)


def _error_fields(data: dict[str, Any]) -> tuple[int | None, str, str | None]:
    """(status found in the body, message, code) from the error shapes servers use."""
    err = data.get("error")
    status: int | None = None
    if isinstance(err, dict):
        message = err.get("message") or err.get("msg") or orjson.dumps(err).decode()
        code_raw = err.get("code") if err.get("code") is not None else err.get("type")
        if isinstance(err.get("code"), int):
            status = err["code"]
            code_raw = err.get("type") or _meta_code(err)
    elif isinstance(err, str):
        message, code_raw = err, data.get("code") or data.get("type")
    elif "detail" in data:
        detail = data["detail"]
        message, code_raw = (
            (detail if isinstance(detail, str) else orjson.dumps(detail).decode()),
            None,
        )
    else:
        message = data.get("message") or orjson.dumps(data).decode()
        code_raw = data.get("code") if not isinstance(data.get("code"), int) else data.get("type")
    return status, str(message)[:2000], None if code_raw is None else str(code_raw)


def _meta_code(err: dict[str, Any]) -> str | None:
    meta = err.get("metadata")
    if isinstance(meta, dict) and isinstance(meta.get("error_type"), str):
        return str(meta["error_type"])
    return None


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_duration(text: str) -> float | None:
    """OpenAI's reset durations: "1s", "6m0s", "120ms", "1h2m3.5s"; or plain seconds."""
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    parts = _DURATION.findall(text)
    if not parts:
        return None
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(n) * scale[unit] for n, unit in parts)


def parse_rate_headers(headers: Mapping[str, str]) -> RateInfo | None:
    """The ``x-ratelimit-*`` headers (OpenAI, Azure, OpenRouter, vLLM routers), if present."""
    if "x-ratelimit-limit-requests" not in headers and "x-ratelimit-limit-tokens" not in headers:
        return None

    def num(name: str) -> int | None:
        try:
            return int(float(headers[name]))
        except (KeyError, ValueError):
            return None

    def dur(name: str) -> float | None:
        value = headers.get(name)
        return None if value is None else parse_duration(value)

    return RateInfo(
        limit_requests=num("x-ratelimit-limit-requests"),
        remaining_requests=num("x-ratelimit-remaining-requests"),
        reset_requests_s=dur("x-ratelimit-reset-requests"),
        limit_tokens=num("x-ratelimit-limit-tokens"),
        remaining_tokens=num("x-ratelimit-remaining-tokens"),
        reset_tokens_s=dur("x-ratelimit-reset-tokens"),
    )


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms``, or ``Retry-After`` (seconds or an HTTP date)."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _text(v: Any) -> str | None:
    if v is None or isinstance(v, str):
        return v
    return orjson.dumps(v).decode()


def _str(v: Any) -> str | None:
    return v if isinstance(v, str) else None


def _snippet(raw: bytes, limit: int = 300) -> str:
    return raw[:limit].decode("utf-8", "replace")


# ----------------------------------------------------------------------------- streaming

_DONE = b"[DONE]"
_DRAIN_S = 1.0  # after [DONE], how long to wait for the end of the body (to keep the connection)


def _stream_body(model: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """The request as streamed: ``stream: true`` and usage asked for, the row's options kept."""
    options = body.get("stream_options")
    merged = {**options, "include_usage": True} if isinstance(options, dict) else {"include_usage": True}
    return {"model": model, **body, "stream": True, "stream_options": merged}


def _transport_error(
    exc: httpx.HTTPError, idle_s: float | None = None, *, streamed: bool = True
) -> TransportError:
    """httpx's exceptions as the attempt record names them. A streamed read that times out
    is an idle stream (``idle_s`` without a byte); a cut is a cut stream."""
    if isinstance(exc, httpx.ConnectTimeout):
        return TransportError(f"connect timeout: {exc}", what="connect_timeout")
    if isinstance(exc, httpx.ConnectError):
        return TransportError(f"cannot connect: {exc}", what="connect")
    if isinstance(exc, httpx.ReadTimeout):
        if not streamed:
            return TransportError("read timeout: no answer in time", what="read_timeout")
        wait = f" for {idle_s:g} s" if idle_s else ""
        return TransportError(f"stream idle: no data arrived{wait}", what="read_timeout")
    if isinstance(exc, httpx.TimeoutException):
        return TransportError(f"timeout: {exc}", what="read_timeout")
    if isinstance(exc, httpx.RemoteProtocolError):
        return TransportError(f"stream cut: {exc}" if streamed else str(exc), what="truncated")
    if isinstance(exc, httpx.DecodingError):
        return TransportError(f"undecodable body: {exc}", what="truncated")
    return TransportError(str(exc) or type(exc).__name__, what="reset")


async def _drain(chunks: AsyncIterator[bytes]) -> None:
    """Read what follows ``[DONE]`` (the end of the body) so the connection can be reused; a
    server that keeps the stream open after it is not waited for long."""
    with anyio.move_on_after(_DRAIN_S):
        try:
            async for _ in chunks:
                pass
        except httpx.HTTPError:
            pass


class SSEParser:
    """Server-sent events framing, as the WHATWG spec reads it, fed bytes as they arrive.

    Lines end with LF, CRLF or CR (a CRLF split between two reads stays one line end); a
    line may be split anywhere between reads. ``data:`` lines accumulate and a blank line
    dispatches them joined with LF (multi-line data); ``:`` comments (keep-alives, OpenRouter's
    ``: OPENROUTER PROCESSING``) are skipped; ``event:``, ``id:``, ``retry:`` and unknown
    fields are ignored. :meth:`feed` returns the data of every event the bytes completed.
    """

    __slots__ = ("_buf", "_cr")

    def __init__(self) -> None:
        self._buf = b""  # the event not yet ended by a blank line
        self._cr = False  # the last read ended with CR: its LF may come in the next one

    def feed(self, chunk: bytes) -> list[bytes]:
        if self._cr:
            chunk = b"\r" + chunk
            self._cr = False
        if b"\r" in chunk:
            if chunk.endswith(b"\r"):
                chunk = chunk[:-1]
                self._cr = True
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if self._buf:
            chunk = self._buf + chunk
        end = chunk.rfind(b"\n\n")  # a blank line ends each event
        if end < 0:
            self._buf = chunk
            return []
        self._buf = chunk[end + 2 :]
        chunk = chunk[:end]
        if chunk[:6] == b"data: ":
            # The usual stream: every event one "data: " line. The line breaks prove it (two
            # per separator, none inside: JSON data has no raw line break).
            events = chunk[6:].split(b"\n\ndata: ")
            if chunk.count(b"\n") == 2 * len(events) - 2:
                return events
        out: list[bytes] = []
        for block in chunk.split(b"\n\n"):
            if block[:6] == b"data: " and b"\n" not in block:
                out.append(block[6:])
            elif block:
                _event_lines(block, out)
        return out

    def close(self) -> list[bytes]:
        """At the end of the body: the last event, if the server did not end it with a blank
        line (lenient: the spec would drop it)."""
        if self._buf or self._cr:
            return self.feed(b"\n\n")
        return []


def _event_lines(block: bytes, out: list[bytes]) -> None:
    """One event's lines, by the spec's rules: its data lines joined with LF."""
    data: list[bytes] = []
    for line in block.split(b"\n"):
        if line.startswith(b"data:"):
            data.append(line[6:] if line[5:6] == b" " else line[5:])
        elif not line:  # blank lines in a row: the first one ended the previous event
            if data:
                out.append(b"\n".join(data))
                data = []
        elif line[0] != 0x3A:  # not a ":" comment
            name, _, value = line.partition(b":")
            if name == b"data":  # "data" alone: an empty data line
                data.append(value[1:] if value[:1] == b" " else value)
    if data:
        out.append(b"\n".join(data))


class _Parts:
    """One choice while its deltas arrive."""

    __slots__ = (
        "annotations",
        "content",
        "finish_reason",
        "logprobs",
        "reasoning",
        "refusal",
        "role",
        "tools",
    )

    def __init__(self) -> None:
        self.role: str | None = None
        self.content: list[str] | None = None
        self.reasoning: list[str] | None = None
        self.refusal: list[str] | None = None
        self.tools: dict[int, dict[str, Any]] = {}
        self.finish_reason: str | None = None
        self.logprobs: dict[str, list[Any]] | None = None
        self.annotations: list[Any] | None = None

    def tool_calls(self) -> list[dict[str, Any]] | None:
        if not self.tools:
            return None
        return [
            {
                "id": t["id"],
                "type": t["type"] or "function",
                "function": {"name": t["name"], "arguments": "".join(t["arguments"])},
            }
            for _, t in sorted(self.tools.items())
        ]

    def output_text(self) -> str:
        """Everything the model wrote, for a token estimate."""
        pieces = [x for part in (self.reasoning, self.content, self.refusal) if part for x in part]
        for t in self.tools.values():
            pieces.append(t["name"] or "")
            pieces.extend(t["arguments"])
        return "".join(pieces)


def _join(parts: list[str] | None) -> str | None:
    return None if parts is None else "".join(parts)


class StreamAssembler:
    """Builds one Completion from the ``chat.completion.chunk`` events of a stream.

    Per choice (``index``): content, reasoning (``reasoning`` or ``reasoning_content``) and
    refusal deltas are concatenated; tool calls are assembled from their fragments by their
    ``index``, id, type and name taken from the first fragment that has them; the finish
    reason is the last one seen. Usage comes from the usage chunk (the last one wins). The
    response id, model, system fingerprint and provider come from the chunks. ``raw`` is the
    ``chat.completion`` a non-streamed call would have returned, so exports look the same.
    """

    def __init__(self, t0: float, *, request_id: str | None = None) -> None:
        self.t0 = t0
        self.request_id = request_id
        self.events = 0
        self.choices: dict[int, _Parts] = {}
        self.head: dict[str, Any] = {}
        self.usage: dict[str, Any] | None = None
        self.first: float | None = None  # perf_counter of the first token
        self.last: float | None = None

    # -- events ------------------------------------------------------------------------

    def take(self, event: bytes, now: float) -> bool:
        """One event's data. True at ``[DONE]``; raises on an error event or a bad chunk."""
        if event[:1] == b"[" and event.strip() == _DONE:
            return True
        try:
            data = orjson.loads(event)
        except orjson.JSONDecodeError:
            if b"\n" in event:  # events not separated by blank lines: read them one a line
                return any(self.take(line, now) for line in event.split(b"\n") if line.strip())
            if not event.strip():
                return False
            raise InvalidResponse(
                "invalid JSON in a stream chunk", provider_request_id=self.request_id, body=_snippet(event)
            ) from None
        self._apply(data, now)
        return False

    def take_all(self, events: list[bytes], now: float) -> bool:
        """The events of one read, in order; True at ``[DONE]`` (what follows is not read).

        The usual chunk (one choice, a delta that is only a content string, no finish, no
        usage, no error) is applied here directly; every other one goes through the general
        rules of :meth:`take`.
        """
        loads = orjson.loads
        by_index = self.choices
        token = False
        try:
            for event in events:
                data: Any = None
                if event[:1] == b"{":
                    try:
                        data = loads(event)
                    except orjson.JSONDecodeError:
                        data = None
                if data.__class__ is not dict:
                    if self.take(event, now):
                        return True
                    continue
                if self.head and "error" not in data:
                    choices = data.get("choices")
                    if choices.__class__ is list and len(choices) == 1 and data.get("usage") is None:
                        c = choices[0]
                        delta = c.get("delta") if c.__class__ is dict else None
                        if (
                            delta.__class__ is dict
                            and len(delta) == 1
                            and c.get("finish_reason") is None
                            and not c.get("logprobs")
                        ):
                            text = delta.get("content")
                            parts = by_index.get(c.get("index", 0))
                            if text.__class__ is str and parts is not None and parts.content is not None:
                                self.events += 1
                                if text:
                                    parts.content.append(text)
                                    token = True
                                continue
                self._apply(data, now)
            return False
        finally:
            if token:
                if self.first is None:
                    self.first = now
                self.last = now

    def _apply(self, data: Any, now: float) -> None:
        """One parsed chunk, by the general rules."""
        if data.__class__ is not dict:
            raise InvalidResponse(
                "a stream chunk that is not a JSON object", provider_request_id=self.request_id
            )
        self.events += 1
        if "error" in data and data["error"] is not None:
            raise self._error_event(data)
        if not self.head:
            self._head(data)
        choices = data.get("choices")
        if choices:
            if self._choices(choices):
                if self.first is None:
                    self.first = now
                self.last = now
        elif data.get("object") == "error":  # vLLM's error object
            raise self._error_event(data)
        usage = data.get("usage")
        if usage is not None and usage.__class__ is dict:
            self.usage = usage
            self._head(data)  # what the first chunk did not say

    def _head(self, data: dict[str, Any]) -> None:
        head = self.head
        for key in ("id", "model", "created", "system_fingerprint", "provider", "service_tier"):
            if key not in head and data.get(key) is not None:
                head[key] = data[key]

    def _choices(self, choices: Any) -> bool:
        """Apply one chunk's choices; True if any carried a token."""
        if choices.__class__ is not list:
            raise InvalidResponse(
                "a stream chunk whose choices is not a list", provider_request_id=self.request_id
            )
        token = False
        for position, c in enumerate(choices):
            if c.__class__ is not dict:
                raise InvalidResponse(
                    "a stream chunk choice that is not an object", provider_request_id=self.request_id
                )
            index = c.get("index", position)
            if index.__class__ is not int:
                index = position
            parts = self.choices.get(index)
            if parts is None:
                parts = self.choices[index] = _Parts()
            delta = c.get("delta")
            if delta and delta.__class__ is dict:
                for key, value in delta.items():
                    if key == "content":
                        if value.__class__ is str:
                            if parts.content is None:
                                parts.content = []
                            if value:
                                parts.content.append(value)
                                token = True
                    elif key == "reasoning" or key == "reasoning_content":
                        if value and value.__class__ is str:
                            if parts.reasoning is None:
                                parts.reasoning = []
                            parts.reasoning.append(value)
                            token = True
                    elif key == "tool_calls":
                        if value and value.__class__ is list:
                            token = True
                            for i, fragment in enumerate(value):
                                if fragment.__class__ is dict:
                                    self._tool_fragment(parts, fragment, i)
                    elif key == "role":
                        if parts.role is None and value is not None:
                            parts.role = value
                    elif key == "refusal":
                        if value and value.__class__ is str:
                            if parts.refusal is None:
                                parts.refusal = []
                            parts.refusal.append(value)
                            token = True
                    elif key == "annotations" and value and value.__class__ is list:
                        parts.annotations = (parts.annotations or []) + value
            finish = c.get("finish_reason")
            if finish is not None:
                parts.finish_reason = finish
            logprobs = c.get("logprobs")
            if logprobs and logprobs.__class__ is dict:
                merged = parts.logprobs if parts.logprobs is not None else {}
                for key, items in logprobs.items():
                    if items.__class__ is list:
                        merged.setdefault(key, []).extend(items)
                parts.logprobs = merged
        return token

    def _tool_fragment(self, parts: _Parts, fragment: dict[str, Any], position: int) -> None:
        index = fragment.get("index")
        tools = parts.tools
        if not isinstance(index, int):  # no index: a new id starts a call, else the last one goes on
            known = {t["id"] for t in tools.values()}
            new = fragment.get("id") is not None and fragment.get("id") not in known
            index = len(tools) if new or not tools else max(tools)
        call = tools.get(index)
        if call is None:
            call = tools[index] = {"id": None, "type": None, "name": None, "arguments": []}
        if call["id"] is None and fragment.get("id") is not None:
            call["id"] = fragment["id"]
        if call["type"] is None and fragment.get("type") is not None:
            call["type"] = fragment["type"]
        function = fragment.get("function")
        if isinstance(function, dict):
            if call["name"] is None and function.get("name") is not None:
                call["name"] = function["name"]
            arguments = function.get("arguments")
            if isinstance(arguments, str) and arguments:
                call["arguments"].append(arguments)

    def _error_event(self, data: dict[str, Any]) -> HTTPStatusError:
        """An error event mid-stream (OpenRouter, vLLM, OpenAI): classified by its code."""
        status, message, code = _error_fields(data)
        if status is None and isinstance(data.get("code"), int) and not isinstance(data.get("code"), bool):
            status = data["code"]  # vLLM: {"object": "error", "code": 400, ...}
        if status is None or not 400 <= status <= 599:
            status = 502
        return _status_error(
            status, f"error event in the stream: {message}", code, None, self.request_id, data
        )

    # -- the end -------------------------------------------------------------------------

    def finish(self, body: Mapping[str, Any], *, done: bool) -> Completion:
        """The Completion of a stream that ended; raises if it ended broken."""
        complete = bool(self.choices) and all(p.finish_reason is not None for p in self.choices.values())
        if not done and not complete:
            # A clean end of the body before [DONE] and before every choice finished: cut.
            # (Every choice finished but no [DONE]: the answer is whole; taking it beats paying twice.)
            raise TransportError("stream ended before [DONE]", what="truncated")
        if not self.choices:
            raise InvalidResponse("a stream without choices", provider_request_id=self.request_id)
        completion = self._build(body, partial=False)
        if any(ch.finish_reason == "error" for ch in completion.choices):
            err = InvalidResponse(
                'the provider ended the answer with finish_reason "error"',
                code="finish_reason_error",
                provider_request_id=self.request_id,
            )
            err.completion = completion
            raise err
        return completion

    def partial(self, body: Mapping[str, Any]) -> Completion | None:
        """What arrived before the stream broke, if any choice did."""
        return self._build(body, partial=True) if self.choices else None

    def _build(self, body: Mapping[str, Any], *, partial: bool) -> Completion:
        order = sorted(self.choices.items())
        choices = tuple(
            Choice(
                index=i,
                finish_reason=p.finish_reason,
                content=_join(p.content),
                reasoning=_join(p.reasoning),
                refusal=_join(p.refusal),
                tool_calls=p.tool_calls(),
            )
            for i, p in order
        )
        usage = Usage.from_api(self.usage)
        if usage is None:  # no usage chunk: estimate, flagged, so the bill is never silently short
            prompt = estimate_prompt_tokens(body)
            output = sum(count_text(p.output_text()) for _, p in order)
            reasoning = sum(count_text("".join(p.reasoning)) for _, p in order if p.reasoning)
            usage = Usage(
                prompt=prompt, completion=output, total=prompt + output, reasoning=reasoning, estimated=True
            )
        head = self.head
        message_choices = []
        for (i, p), ch in zip(order, choices, strict=True):
            message: dict[str, Any] = {"role": p.role or "assistant", "content": ch.content}
            if ch.reasoning is not None:
                message["reasoning"] = ch.reasoning
            if ch.tool_calls is not None:
                message["tool_calls"] = ch.tool_calls
            message["refusal"] = ch.refusal
            if p.annotations is not None:
                message["annotations"] = p.annotations
            message_choices.append(
                {"index": i, "message": message, "logprobs": p.logprobs, "finish_reason": ch.finish_reason}
            )
        raw: dict[str, Any] = {
            "id": head.get("id"),
            "object": "chat.completion",
            "created": head.get("created"),
            "model": head.get("model"),
        }
        if "provider" in head:
            raw["provider"] = head["provider"]
        raw["choices"] = message_choices
        raw["usage"] = self.usage if self.usage is not None else _estimated_usage(usage)
        for key in ("service_tier", "system_fingerprint"):
            if key in head:
                raw[key] = head[key]
        first = None if self.first is None else (self.first - self.t0) * 1000.0
        last = None if self.last is None else (self.last - self.t0) * 1000.0
        rate = None
        if first is not None and last is not None and last > first and usage.completion > 0:
            rate = usage.completion / ((last - first) / 1000.0)
        created = head.get("created")
        return Completion(
            response_id=_str(head.get("id")),
            model=_str(head.get("model")),
            provider=_str(head.get("provider")),
            system_fingerprint=_str(head.get("system_fingerprint")),
            created=created if isinstance(created, int) else None,
            choices=choices,
            usage=usage,
            raw=orjson.dumps(raw),
            provider_request_id=self.request_id,
            stream=StreamTiming(ttft_ms=first, ttlt_ms=last, output_tokens_per_s=rate),
            partial=partial,
        )


def _estimated_usage(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt,
        "completion_tokens": usage.completion,
        "total_tokens": usage.total,
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning},
        "estimated": True,
    }
