"""An httpx transport backed by one aiohttp session, and the client's prepared POST.

Chosen by measurement (``bench/transport.py``, figures in ``bench/README.md``): at 256-1,024
concurrent requests httpx's own pool spends 10-20 ms of CPU per request (and with its default
limits ends in ``PoolTimeout``), while this transport spends about 0.4-0.6 ms. The code above
this module speaks httpx; this is the one place that knows aiohttp, and it translates
aiohttp's exceptions into httpx's
(a cut body, a reset and a read timeout stay distinguishable, unlike in httpx-aiohttp,
which maps every ``ClientConnectionError`` to ``ConnectTimeout``).

The client's hot path (one non-streamed POST) skips even httpx's Request and Response objects:
:meth:`AiohttpTransport.post` prepares a :class:`Post` that hands back the status, the headers
(read as httpx reads them) and the (decoded) body. With no proxy for the URL it sends through
:mod:`pipeline.h1` (keep-alive HTTP/1.1 over asyncio protocols: ~0.03 ms of CPU a request,
where aiohttp itself spends ~0.10 ms); behind a proxy, through the aiohttp session. Either way
the same headers go on the wire, with the same timeouts, decoding and httpx exceptions.

It never retries: the pipeline has exactly one retry layer (``pipeline.worker``).
"""

from __future__ import annotations

import ssl
import urllib.request
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import contextmanager

import aiohttp
import httpx
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from pipeline.h1 import Origin, default_ssl_context

__all__ = ["AiohttpTransport", "Post", "ResponseHeaders"]


def _httpx_error(exc: aiohttp.ClientError | TimeoutError, request: httpx.Request | None) -> httpx.HTTPError:
    """aiohttp's exception as httpx's (raised ``from`` it by the caller)."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(str(exc) or "connect timeout", request=request)
    if isinstance(exc, (TimeoutError, aiohttp.SocketTimeoutError, aiohttp.ServerTimeoutError)):
        return httpx.ReadTimeout(str(exc) or "read timeout", request=request)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return httpx.ConnectError(str(exc), request=request)
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return httpx.RemoteProtocolError("server disconnected before a full answer", request=request)
    if isinstance(exc, aiohttp.ClientPayloadError):
        return httpx.RemoteProtocolError(f"response body cut short: {exc}", request=request)
    if isinstance(exc, aiohttp.ClientResponseError):
        return httpx.RemoteProtocolError(f"invalid HTTP response: {exc.message}", request=request)
    if isinstance(exc, aiohttp.ClientOSError):
        return httpx.ReadError(f"connection error: {exc}", request=request)
    return httpx.NetworkError(f"{type(exc).__name__}: {exc}", request=request)


@contextmanager
def _mapped(request: httpx.Request | None) -> Iterator[None]:
    try:
        yield
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise _httpx_error(exc, request) from exc


class _Body(httpx.AsyncByteStream):
    def __init__(self, response: aiohttp.ClientResponse, request: httpx.Request) -> None:
        self._response = response
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _mapped(self._request):
            async for chunk in self._response.content.iter_any():
                yield chunk

    async def aclose(self) -> None:
        self._response.release()


class ResponseHeaders(Mapping[str, str]):
    """aiohttp's response headers read as httpx reads them: names case-insensitive and
    listed in lower case, a repeated header's values joined with ", "."""

    __slots__ = ("_headers",)

    def __init__(self, headers: CIMultiDictProxy[str]) -> None:
        self._headers = headers

    def __getitem__(self, key: str) -> str:
        values = self._headers.getall(key)  # KeyError when absent
        return values[0] if len(values) == 1 else ", ".join(values)

    def __contains__(self, key: object) -> bool:
        return key in self._headers

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys(k.lower() for k in self._headers))

    def __len__(self) -> int:
        return len({k.lower() for k in self._headers})


class _Unset:
    pass


_UNSET = _Unset()


class Post:
    """One prepared ``POST`` (URL, headers, timeouts fixed): the client's hot path.

    A non-streamed request needs none of httpx's Request/Response machinery, which costs more
    CPU than the HTTP itself. The proxy is looked up on the first send: with none, every send
    goes through a :class:`pipeline.h1.Origin` (its own keep-alive connections); with one,
    through the aiohttp session. What goes on the wire, the timeouts, the decoding of a
    compressed body and the exceptions raised (httpx's) are those of
    :meth:`AiohttpTransport.handle_async_request`.
    """

    __slots__ = (
        "_connect_s",
        "_header_pairs",
        "_headers",
        "_origin",
        "_proxy",
        "_read_s",
        "_timeout",
        "_transport",
        "_url",
        "_yarl",
    )

    def __init__(
        self,
        transport: AiohttpTransport,
        url: httpx.URL,
        headers: Sequence[tuple[str, str]],
        timeout: Mapping[str, float | None],
    ) -> None:
        self._transport = transport
        self._url = url
        self._yarl = URL(str(url))
        self._header_pairs = _request_headers(headers)
        self._headers = CIMultiDict(self._header_pairs)
        self._timeout = _client_timeout(timeout)
        self._connect_s = timeout.get("connect")
        self._read_s = timeout.get("read")
        self._proxy: str | _Unset | None = _UNSET  # looked up on the first send, as the transport does
        self._origin: Origin | None = None  # no proxy: sent by pipeline.h1

    async def __call__(self, content: bytes) -> tuple[int, Mapping[str, str], bytes]:
        """Send ``content``; the status, the headers and the (decoded) body."""
        transport = self._transport
        proxy = self._proxy
        if isinstance(proxy, _Unset):
            proxy = self._proxy = transport._proxy(self._url)
            if proxy is None:  # straight to the server: the small HTTP/1.1 client
                self._origin = transport._origin(self._url, self._header_pairs)
        origin = self._origin
        if origin is not None:
            status, headers, raw, body = await origin.request(
                content, connect_timeout=self._connect_s, read_timeout=self._read_s
            )
            if "content-encoding" in headers:
                body = await _decode(status, raw, body)
            return status, headers, body
        session = transport._get_session()
        try:
            response = await session.request(
                "POST",
                self._yarl,
                headers=self._headers,
                data=content or None,
                timeout=self._timeout,
                allow_redirects=False,
                proxy=proxy,
            )
            try:
                body = await response.read()
            finally:
                response.release()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _httpx_error(exc, None) from exc
        aio_headers = ResponseHeaders(response.headers)
        if "content-encoding" in aio_headers:
            body = await _decode(response.status, _decoded_headers(response), body)
        return response.status, aio_headers, body


async def _decode(status: int, raw_headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    """A compressed body, decoded by httpx as it would on the slow path."""
    decoded = httpx.Response(status_code=status, headers=raw_headers, stream=httpx.ByteStream(body))
    return await decoded.aread()


def _request_headers(headers: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """What goes on the wire: aiohttp sets Host and Content-Length itself."""
    return [(k, v) for k, v in headers if k.lower() not in ("host", "content-length")]


def _client_timeout(t: Mapping[str, float | None]) -> aiohttp.ClientTimeout:
    # httpx's "write" has no aiohttp twin (a request body is small); "pool" is moot: the
    # connector holds a connection per request in flight, bounded by the route limits.
    return aiohttp.ClientTimeout(total=None, sock_connect=t.get("connect"), sock_read=t.get("read"))


def _decoded_headers(response: aiohttp.ClientResponse) -> list[tuple[bytes, bytes]]:
    """The response headers as the server sent them: bytes, which httpx takes as they are
    (a str value outside ASCII would make httpx raise UnicodeEncodeError)."""
    return list(response.raw_headers)


class AiohttpTransport(httpx.AsyncBaseTransport):
    """One aiohttp ``ClientSession`` shared by every request (created on first use)."""

    def __init__(self, *, max_connections: int = 0, keepalive_s: float = 30.0) -> None:
        self._max_connections = max_connections
        self._keepalive_s = keepalive_s
        self._session: aiohttp.ClientSession | None = None
        self._proxies: dict[tuple[str, str], str | None] = {}
        self._origins: list[Origin] = []
        self._ssl: ssl.SSLContext | None = None

    def _origin(self, url: httpx.URL, headers: Sequence[tuple[str, str]]) -> Origin:
        """A pool of pipeline.h1 connections for one prepared Post (closed with the transport)."""
        origin = Origin(url, headers, keepalive_s=self._keepalive_s, ssl_context=self._ssl_context)
        self._origins.append(origin)
        return origin

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = default_ssl_context()
        return self._ssl

    def _proxy(self, url: httpx.URL) -> str | None:
        """The proxy for a host from HTTP(S)_PROXY / NO_PROXY, looked up once per host.

        (aiohttp's ``trust_env`` would look it up, and read ~/.netrc, on every request: 0.2 ms
        of CPU each, and a .netrc entry for the host breaks the Bearer header.)
        """
        key = (url.scheme, url.host)
        if key not in self._proxies:
            proxy = urllib.request.getproxies().get(url.scheme)
            if proxy and urllib.request.proxy_bypass(url.host):
                proxy = None
            self._proxies[key] = proxy or None
        return self._proxies[key]

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections,
                limit_per_host=0,
                keepalive_timeout=self._keepalive_s,
            )
            # httpx decodes Content-Encoding itself, so aiohttp must hand over the raw bytes.
            self._session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,
                trust_env=False,  # proxies: see _proxy; never ~/.netrc (it clashes with Bearer)
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._get_session()
        timeout = _client_timeout(request.extensions.get("timeout", {}))
        body = await request.aread()
        headers = _request_headers(request.headers.multi_items())
        with _mapped(request):
            response = await session.request(
                request.method,
                str(request.url),
                headers=headers,
                data=body or None,
                timeout=timeout,
                allow_redirects=False,
                proxy=self._proxy(request.url),
            )
        return httpx.Response(
            status_code=response.status,
            headers=_decoded_headers(response),
            stream=_Body(response, request),
            extensions={"http_version": b"HTTP/1.1"},
        )

    def post(
        self, url: httpx.URL, headers: Sequence[tuple[str, str]], timeout: Mapping[str, float | None]
    ) -> Post:
        """A prepared POST to ``url`` with these headers and timeouts (see :class:`Post`)."""
        return Post(self, url, headers, timeout)

    async def aclose(self) -> None:
        for origin in self._origins:
            origin.close()
        self._origins.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None
