"""A small HTTP/1.1 client for the hot path: keep-alive connections over asyncio protocols,
responses parsed by httptools (llhttp, the parser of Node.js).

Chosen by measurement (``bench/transport.py``): against the same server, a bare aiohttp loop
spends ~0.10 ms of CPU per request, this client ~0.03 ms, and at 0 ms latency and 64
concurrent requests it is the server, not this client, that sets the rate. Every request
the pipeline sends without streaming and without a proxy goes through here (see
:class:`pipeline.transport.Post`); streaming, proxies and everything else keep aiohttp.

What it does: one request at a time per connection (no pipelining), its body sent whole; the
answer read whole, delimited by ``Content-Length``, chunked transfer coding or the end of the
connection. Connections are kept per origin and reused last-in first-out; ``Connection:
close``, HTTP/1.0 and ``Keep-Alive: timeout=N`` are respected, and an idle connection is
dropped after ``keepalive_s`` (or a little before the server's own timeout, when it says
one). TLS uses httpx's default context (certifi, or ``SSL_CERT_FILE``/``SSL_CERT_DIR``) with
ALPN ``http/1.1``. Timeouts: connect, and read as aiohttp's ``sock_read`` has it (the
longest wait for the next bytes of the answer). ``1xx`` interim answers are skipped.

It never retries. It raises httpx's exception types, with the meanings of
:mod:`pipeline.transport`'s mapping, so callers cannot tell the two transports apart:
``ConnectTimeout``, ``ConnectError``, ``ReadTimeout``, ``RemoteProtocolError`` (closed before
a full answer, body cut short, invalid HTTP) and ``ReadError`` (a reset connection).
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections import deque
from collections.abc import Callable, Sequence
from typing import cast

import httptools
import httpx

__all__ = ["Origin", "RawHeaders", "Response", "default_ssl_context"]

RawHeaders = list[tuple[bytes, bytes]]
Response = tuple[int, dict[str, str], RawHeaders, bytes]  # status, headers (httpx's reading), raw, body

_KEEP_ALIVE_TIMEOUT = re.compile(rb"timeout\s*=\s*(\d+)", re.IGNORECASE)
_SERVER_TIMEOUT_MARGIN_S = 1.0  # drop a connection this long before the server says it would


def _value(raw: bytes) -> str:
    """A header value as httpx reads it: ASCII, else UTF-8, else Latin-1."""
    if raw.isascii():
        return raw.decode("ascii")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection; at most one request on it at a time."""

    __slots__ = (
        "_body",
        "_headers",
        "_interim",
        "_keep_alive",
        "_keep_alive_s",
        "_last_read",
        "_loop",
        "_parser",
        "_raw",
        "_read_timeout",
        "_received",
        "_timer",
        "_transport",
        "_until_close",
        "_waiter",
        "idle_until",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[Response] | None = None
        self._headers: dict[str, str] = {}
        self._raw: RawHeaders = []
        self._body: list[bytes] = []
        self._received = False  # any byte of the current answer
        self._interim = False  # the message being parsed is a 1xx
        self._until_close = False  # the body ends with the connection
        self._keep_alive = False  # the server keeps the connection open after this answer
        self._keep_alive_s: float | None = None  # the server's Keep-Alive: timeout=N
        self._read_timeout: float | None = None
        self._last_read = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self.idle_until = 0.0

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        if self._waiter is None:  # bytes nobody asked for: the connection cannot be trusted
            self.close()
            return
        self._received = True
        if self._read_timeout is not None:
            self._last_read = self._loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(httpx.RemoteProtocolError("invalid HTTP response: an unexpected protocol upgrade"))
        except httptools.HttpParserError as exc:
            self._fail(httpx.RemoteProtocolError(f"invalid HTTP response: {exc}"))

    def eof_received(self) -> bool:
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if self._until_close and not self._interim:
            self._finish()
        elif isinstance(exc, OSError):
            self._fail(httpx.ReadError(f"connection error: {exc}"))
        elif not self._received:
            self._fail(httpx.RemoteProtocolError("server disconnected before a full answer"))
        else:
            self._fail(httpx.RemoteProtocolError("response body cut short: the connection closed"))

    # -- httptools callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._headers = {}
        self._raw = []
        self._body = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw.append((name, value))
        key = name.decode("latin-1").lower()
        text = _value(value)
        seen = self._headers.get(key)
        self._headers[key] = text if seen is None else f"{seen}, {text}"

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        self._interim = 100 <= status < 200
        headers = self._headers
        self._until_close = (
            status >= 200
            and status not in (204, 304)
            and "content-length" not in headers
            and "transfer-encoding" not in headers
        )
        # llhttp knows it now (HTTP version, Connection header), and forgets it once the message ends
        self._keep_alive = self._parser.should_keep_alive()
        alive = headers.get("keep-alive")
        if alive is not None and (m := _KEEP_ALIVE_TIMEOUT.search(alive.encode("latin-1", "replace"))):
            self._keep_alive_s = float(m.group(1))

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._interim:  # 100 Continue and friends: the real answer follows
            self._interim = False
            return
        self._finish()

    # -- requests ------------------------------------------------------------------------

    def _finish(self) -> None:
        waiter = self._waiter
        self._stop_timer()
        if waiter is None or waiter.done():
            return
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        waiter.set_result((self._parser.get_status_code(), self._headers, self._raw, body))

    def _fail(self, exc: Exception) -> None:
        waiter = self._waiter
        self._stop_timer()
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        self.close()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        timeout = self._read_timeout
        if self._waiter is None or self._waiter.done() or timeout is None:
            return
        due = self._last_read + timeout
        if self._loop.time() < due:  # bytes came since: wait for the rest of the timeout
            self._timer = self._loop.call_at(due, self._on_timer)
            return
        self._fail(httpx.ReadTimeout("read timeout"))

    async def exchange(self, data: bytes, read_timeout: float | None) -> Response:
        """Send one whole request, wait for its whole answer."""
        transport = self._transport
        if transport is None or transport.is_closing():
            raise httpx.RemoteProtocolError("server disconnected before a full answer")
        waiter: asyncio.Future[Response] = self._loop.create_future()
        self._waiter = waiter
        self._received = False
        self._until_close = False
        self._keep_alive = False
        self._interim = False
        self._read_timeout = read_timeout
        transport.write(data)
        if read_timeout is not None:
            self._last_read = self._loop.time()
            self._timer = self._loop.call_at(self._last_read + read_timeout, self._on_timer)
        try:
            return await waiter
        finally:
            self._waiter = None
            self._stop_timer()

    def ready(self, now: float) -> bool:
        """Idle, open and not past its keep-alive time: a request may go on it."""
        transport = self._transport
        return transport is not None and not transport.is_closing() and self.idle_until > now

    @property
    def reusable(self) -> bool:
        transport = self._transport
        return transport is not None and not transport.is_closing() and self._keep_alive

    def keep_for(self, keepalive_s: float) -> float:
        """How long this connection may wait idle for its next request."""
        server = self._keep_alive_s
        if server is not None:
            return max(0.0, min(keepalive_s, server - _SERVER_TIMEOUT_MARGIN_S))
        return keepalive_s

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()
            self._transport = None


def default_ssl_context() -> ssl.SSLContext:
    """httpx's default TLS context (certifi, or SSL_CERT_FILE / SSL_CERT_DIR), speaking HTTP/1.1.
    Loading the CA bundle costs ~20 ms: build it once per transport."""
    context = httpx.create_ssl_context()
    context.set_alpn_protocols(["http/1.1"])
    return context


class Origin:
    """Keep-alive connections to one origin (scheme, host, port) and the requests sent on them.

    ``head`` is everything of a request before its ``Content-Length`` value (request line,
    ``Host`` and the other headers, ending with ``Content-Length: ``), fixed once per URL and
    header set; :meth:`request` adds the length and the body.
    """

    def __init__(
        self,
        url: httpx.URL,
        headers: Sequence[tuple[str, str]],
        *,
        keepalive_s: float = 30.0,
        ssl_context: Callable[[], ssl.SSLContext] = default_ssl_context,
    ) -> None:
        if url.scheme not in ("http", "https"):
            raise ValueError(f"not an http(s) URL: {url}")
        self.host = url.host
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.ssl: ssl.SSLContext | None = None
        if url.scheme == "https":
            self.ssl = ssl_context()
        self.keepalive_s = keepalive_s
        lines = [b"POST " + url.raw_path + b" HTTP/1.1", b"Host: " + url.netloc]
        for name, value in headers:
            if name.lower() in ("host", "content-length", "transfer-encoding"):
                continue
            lines.append(_encode(name) + b": " + _encode(value))
        self.head = b"\r\n".join(lines) + b"\r\nContent-Length: "
        self._idle: deque[_Connection] = deque()
        self._closed = False

    async def request(
        self, body: bytes, *, connect_timeout: float | None, read_timeout: float | None
    ) -> Response:
        """POST ``body``; the status, the headers, the raw headers and the body of the answer."""
        loop = asyncio.get_running_loop()
        conn = self._take_idle(loop.time())
        if conn is None:
            conn = await self._connect(loop, connect_timeout)
        data = b"".join((self.head, str(len(body)).encode(), b"\r\n\r\n", body))
        try:
            response = await conn.exchange(data, read_timeout)
        except BaseException:  # failed, timed out or cancelled mid-answer: never reuse it
            conn.abort()
            raise
        if conn.reusable and not self._closed:
            conn.idle_until = loop.time() + conn.keep_for(self.keepalive_s)
            self._idle.append(conn)
        else:
            conn.close()
        return response

    def _take_idle(self, now: float) -> _Connection | None:
        idle = self._idle
        while idle and not idle[0].ready(now):  # the oldest first
            idle.popleft().close()
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to be stale
            if conn.ready(now):
                return conn
            conn.close()
        return None

    async def _connect(self, loop: asyncio.AbstractEventLoop, connect_s: float | None) -> _Connection:
        where = f"{self.host}:{self.port}"
        try:
            async with asyncio.timeout(connect_s):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop),
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self.host if self.ssl is not None else None,
                )
        except TimeoutError:
            raise httpx.ConnectTimeout(f"connect timeout to {where}") from None
        except ssl.SSLError as exc:  # a certificate error is one too
            raise httpx.ConnectError(f"TLS with {where} failed: {exc}") from exc
        except OSError as exc:
            raise httpx.ConnectError(f"cannot connect to {where}: {exc.strerror or exc}") from exc
        return conn

    def close(self) -> None:
        """Close the idle connections; those in use close when their answer is read."""
        self._closed = True
        while self._idle:
            self._idle.pop().close()


def _encode(text: str) -> bytes:
    """A header name or value as httpx encodes it: ASCII, else UTF-8."""
    try:
        return text.encode("ascii")
    except UnicodeEncodeError:
        return text.encode("utf-8")
