"""The hot path's HTTP/1.1 client (pipeline/h1.py) against servers that send exactly the bytes
each test scripts: keep-alive, body framings, every way an answer can break, timeouts, TLS;
and the transport's Post choosing it (no proxy) or aiohttp (a proxy)."""

from __future__ import annotations

import asyncio
import gzip
import re
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest
import trustme

from pipeline.h1 import Origin
from pipeline.transport import AiohttpTransport

Script = Callable[["Conn"], Awaitable[None]]
BODY = b'{"model":"m","messages":[]}'
ANSWER = b'{"id":"x","choices":[]}'


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Conn:
    """One accepted connection, as the script sees it."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    server: Server

    async def request(self) -> tuple[bytes, dict[str, str], bytes] | None:
        """The next request (head line, headers, body), or None when the client closed."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        line, *rest = head[:-4].split(b"\r\n")
        headers = {}
        for h in rest:
            k, _, v = h.partition(b":")
            headers[k.decode().strip().lower()] = v.decode().strip()
        body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        self.server.requests.append((line, headers, body))
        return line, headers, body

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def reset(self) -> None:
        """Close with a TCP RST instead of a FIN."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


@dataclass
class Server:
    url: str = ""
    connections: int = 0
    requests: list[tuple[bytes, dict[str, str], bytes]] = field(default_factory=list)


def answer(body: bytes = ANSWER, *headers: str, status: str = "200 OK") -> bytes:
    lines = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def serve_forever(conn: Conn) -> None:
    """A well-behaved keep-alive server."""
    while await conn.request() is not None:
        conn.send(answer())
        await conn.writer.drain()


@asynccontextmanager
async def server(
    script: Script = serve_forever, *, tls: ssl.SSLContext | None = None
) -> AsyncIterator[Server]:
    state = Server()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.connections += 1
        try:
            await script(Conn(reader, writer, state))
        finally:
            writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=tls)
    port = srv.sockets[0].getsockname()[1]
    state.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}/v1/chat/completions"
    try:
        yield state
    finally:
        srv.close()


def origin(url: str, **kw: Any) -> Origin:
    return Origin(httpx.URL(url), [("content-type", "application/json"), ("authorization", "Bearer k")], **kw)


async def post(o: Origin, *, read: float | None = 5.0) -> tuple[int, dict[str, str], bytes]:
    status, headers, _, body = await o.request(BODY, connect_timeout=5.0, read_timeout=read)
    return status, headers, body


# ----------------------------------------------------------------------------- the wire


@pytest.mark.anyio
async def test_requests_carry_the_url_host_headers_and_body_and_reuse_one_connection() -> None:
    """Ten requests, one after another: one TCP connection, each request whole on the wire."""
    async with server() as s:
        o = origin(s.url)
        for _ in range(10):
            assert await post(o) == (200, {"content-length": str(len(ANSWER))}, ANSWER)
        o.close()
    assert s.connections == 1
    line, headers, body = s.requests[0]
    assert line == b"POST /v1/chat/completions HTTP/1.1"
    assert headers["host"] == s.url.split("/")[2]
    assert headers["content-type"] == "application/json" and headers["authorization"] == "Bearer k"
    assert headers["content-length"] == str(len(BODY)) and body == BODY


@pytest.mark.anyio
async def test_concurrent_requests_each_get_a_connection_of_their_own() -> None:
    """No pipelining: 8 requests at once open 8 connections, then reuse them."""

    async def slow(conn: Conn) -> None:
        while await conn.request() is not None:
            await asyncio.sleep(0.05)
            conn.send(answer())

    async with server(slow) as s:
        o = origin(s.url)
        for _ in range(2):
            results = await asyncio.gather(*(post(o) for _ in range(8)))
            assert all(r[0] == 200 for r in results)
        o.close()
    assert s.connections == 8 and len(s.requests) == 16


@pytest.mark.anyio
@pytest.mark.parametrize(
    "header",
    [pytest.param("Connection: close", id="connection-close"), pytest.param(None, id="http-1.0")],
)
async def test_an_answer_that_ends_the_connection_is_not_reused(header: str | None) -> None:
    """``Connection: close`` or an HTTP/1.0 answer: the next request opens a new connection."""

    async def once(conn: Conn) -> None:
        if await conn.request() is not None:
            if header is None:
                conn.send(answer().replace(b"HTTP/1.1", b"HTTP/1.0", 1))
            else:
                conn.send(answer(ANSWER, header))
            await conn.writer.drain()
            await asyncio.sleep(0.2)  # the client must not wait for the close to decide

    async with server(once) as s:
        o = origin(s.url)
        assert (await post(o))[0] == 200
        assert (await post(o))[0] == 200
        o.close()
    assert s.connections == 2


@pytest.mark.anyio
async def test_a_chunked_body_is_read_whole() -> None:
    async def chunked(conn: Conn) -> None:
        await conn.request()
        conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for part in (ANSWER[:5], ANSWER[5:]):
            conn.send(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            await conn.writer.drain()
            await asyncio.sleep(0.01)
        conn.send(b"0\r\n\r\n")
        await conn.request()

    async with server(chunked) as s:
        o = origin(s.url)
        assert (await post(o))[2] == ANSWER
        o.close()


@pytest.mark.anyio
async def test_a_body_delimited_by_the_end_of_the_connection_is_read_whole() -> None:
    """No Content-Length, not chunked: the body is what arrives until the server closes."""

    async def until_close(conn: Conn) -> None:
        await conn.request()
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n" + ANSWER[:7])
        await conn.writer.drain()
        await asyncio.sleep(0.02)
        conn.send(ANSWER[7:])

    async with server(until_close) as s:
        o = origin(s.url)
        assert await post(o) == (200, {"content-type": "application/json"}, ANSWER)
        assert (await post(o))[2] == ANSWER  # a new connection: that one ended
        o.close()
    assert s.connections == 2


@pytest.mark.anyio
async def test_repeated_headers_are_joined_and_names_read_in_lower_case() -> None:
    """As httpx reads them: ``X-A: 1`` and ``x-a: 2`` give ``x-a: 1, 2``; UTF-8 values survive."""

    async def headers(conn: Conn) -> None:
        await conn.request()
        conn.send(answer(ANSWER, "X-A: 1", "x-a: 2", "X-Note: caf\u00e9"))
        await conn.request()

    async with server(headers) as s:
        o = origin(s.url)
        _, h, _ = await post(o)
        o.close()
    assert h["x-a"] == "1, 2" and h["x-note"] == "caf\u00e9"


@pytest.mark.anyio
async def test_an_interim_100_continue_is_skipped() -> None:
    async def interim(conn: Conn) -> None:
        await conn.request()
        conn.send(b"HTTP/1.1 100 Continue\r\n\r\n" + answer(b"{}", status="201 Created"))
        await conn.request()

    async with server(interim) as s:
        o = origin(s.url)
        assert await post(o) == (201, {"content-length": "2"}, b"{}")
        o.close()


# ----------------------------------------------------------------------------- broken answers


async def failure(script: Script, *, read: float | None = 5.0) -> Exception:
    async with server(script) as s:
        o = origin(s.url)
        with pytest.raises(httpx.HTTPError) as info:
            await post(o, read=read)
        o.close()
    return info.value


async def closes_at_once(conn: Conn) -> None:
    await conn.request()


async def cuts_the_body(conn: Conn) -> None:
    await conn.request()
    conn.send(answer(b"x" * 1000)[:-600])


async def resets(conn: Conn) -> None:
    await conn.request()
    conn.reset()


async def speaks_nonsense(conn: Conn) -> None:
    await conn.request()
    conn.send(b"HTTP/1.1 abc nonsense\r\n\r\n")
    await conn.request()


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("script", "error", "words"),
    [
        pytest.param(closes_at_once, httpx.RemoteProtocolError, "disconnected", id="closed-without-answer"),
        pytest.param(cuts_the_body, httpx.RemoteProtocolError, "cut short", id="body-cut-short"),
        pytest.param(resets, httpx.ReadError, "connection error", id="connection-reset"),
        pytest.param(speaks_nonsense, httpx.RemoteProtocolError, "invalid HTTP", id="invalid-http"),
    ],
)
async def test_a_broken_answer_is_the_httpx_error_the_transport_mapping_names(
    script: Script, error: type[httpx.HTTPError], words: str
) -> None:
    """The same exception types (and so the same attempt records) as over aiohttp."""
    exc = await failure(script)
    assert type(exc) is error and words in str(exc)


@pytest.mark.anyio
async def test_a_silent_server_is_a_read_timeout() -> None:
    async def silent(conn: Conn) -> None:
        await conn.request()
        await asyncio.sleep(5)

    started = time.monotonic()
    exc = await failure(silent, read=0.2)
    assert isinstance(exc, httpx.ReadTimeout) and 0.2 <= time.monotonic() - started < 2.0


@pytest.mark.anyio
async def test_the_read_timeout_is_the_wait_between_bytes_not_for_the_whole_answer() -> None:
    """Bytes every 0.1 s for 0.6 s under a 0.25 s read timeout: the answer arrives."""

    async def trickle(conn: Conn) -> None:
        await conn.request()
        data = answer()
        step = len(data) // 6 + 1
        for i in range(0, len(data), step):
            conn.send(data[i : i + step])
            await conn.writer.drain()
            await asyncio.sleep(0.1)
        await conn.request()

    async with server(trickle) as s:
        o = origin(s.url)
        assert (await post(o, read=0.25))[2] == ANSWER
        o.close()


@pytest.mark.anyio
async def test_a_refused_connection_is_a_connect_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nobody listens there once closed
    o = origin(f"http://127.0.0.1:{port}/v1/chat/completions")
    with pytest.raises(httpx.ConnectError, match=re.escape(f"127.0.0.1:{port}")):
        await post(o)


@pytest.mark.anyio
async def test_a_connection_that_failed_or_was_cancelled_is_never_reused() -> None:
    """A request cancelled mid-answer leaves a connection in an unknown state: it is dropped."""

    async def slow_then_fine(conn: Conn) -> None:
        while await conn.request() is not None:
            if len(conn.server.requests) == 1:
                await asyncio.sleep(1.0)
            conn.send(answer())

    async with server(slow_then_fine) as s:
        o = origin(s.url)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await post(o)
        assert (await post(o))[0] == 200
        o.close()
    assert s.connections == 2


# ----------------------------------------------------------------------------- idle connections


@pytest.mark.anyio
async def test_a_connection_the_server_closed_while_idle_is_not_used_again() -> None:
    """The server closes after each answer without saying so: the next request still succeeds,
    on a new connection, with no failed attempt."""

    async def one_per_connection(conn: Conn) -> None:
        await conn.request()
        conn.send(answer())
        await conn.writer.drain()

    async with server(one_per_connection) as s:
        o = origin(s.url)
        for _ in range(3):
            assert (await post(o))[0] == 200
            await asyncio.sleep(0.05)  # the close reaches the client
        o.close()
    assert s.connections == 3


@pytest.mark.anyio
async def test_idle_connections_are_dropped_before_the_servers_keep_alive_timeout() -> None:
    """``Keep-Alive: timeout=2``: the connection is kept 1 s (a second's margin), not longer."""

    async def keep_alive(conn: Conn) -> None:
        while await conn.request() is not None:
            conn.send(answer(ANSWER, "Keep-Alive: timeout=2"))

    async with server(keep_alive) as s:
        o = origin(s.url)
        await post(o)
        await post(o)  # at once: reused
        await asyncio.sleep(1.1)
        await post(o)  # past 1 s idle: a new one
        o.close()
    assert s.connections == 2


@pytest.mark.anyio
async def test_idle_connections_are_dropped_after_keepalive_s() -> None:
    async with server() as s:
        o = origin(s.url, keepalive_s=0.2)
        await post(o)
        await asyncio.sleep(0.3)
        await post(o)
        o.close()
    assert s.connections == 2


# ----------------------------------------------------------------------------- TLS


def tls_server_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    return ctx


@pytest.mark.anyio
async def test_https_with_a_trusted_certificate() -> None:
    ca = trustme.CA()

    def trusting() -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        return ctx

    async with server(tls=tls_server_context(ca)) as s:
        o = origin(s.url, ssl_context=trusting)
        assert (await post(o))[2] == ANSWER
        assert (await post(o))[2] == ANSWER
        o.close()
    assert s.connections == 1


@pytest.mark.anyio
async def test_https_with_an_untrusted_certificate_is_a_connect_error() -> None:
    """httpx's default trust (certifi) does not know a home-made CA: refused, clearly."""
    ca = trustme.CA()
    async with server(tls=tls_server_context(ca)) as s:
        o = origin(s.url)
        with pytest.raises(httpx.ConnectError, match=r"TLS with 127\.0\.0\.1"):
            await post(o)


# ----------------------------------------------------------------------------- through the transport


@pytest.fixture
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.usefixtures("no_proxy")
@pytest.mark.anyio
async def test_the_transports_post_decodes_gzip_exactly_once() -> None:
    original = orjson.dumps({"choices": [{"message": {"content": "x" * 5000}}]})

    async def gzipped(conn: Conn) -> None:
        await conn.request()
        conn.send(answer(gzip.compress(original), "Content-Encoding: gzip"))
        await conn.request()

    async with server(gzipped) as s:
        transport = AiohttpTransport()
        post_ = transport.post(httpx.URL(s.url), [("content-type", "application/json")], {"read": 5.0})
        status, headers, body = await post_(BODY)
        await transport.aclose()
    assert (status, headers["content-encoding"], body) == (200, "gzip", original)


@pytest.mark.anyio
async def test_with_a_proxy_configured_the_post_goes_through_the_proxy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """HTTP_PROXY set: the request goes to the proxy in absolute form (aiohttp's path), not
    straight to the server."""
    async with server() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url.rsplit("/v1", 1)[0])
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        transport = AiohttpTransport()
        target = "http://api.example.invalid/v1/chat/completions"
        post_ = transport.post(httpx.URL(target), [("content-type", "application/json")], {"read": 5.0})
        status, _, body = await post_(BODY)
        await transport.aclose()
    assert (status, body) == (200, ANSWER)
    assert proxy.requests[0][0] == f"POST {target} HTTP/1.1".encode()
