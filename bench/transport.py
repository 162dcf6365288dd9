"""How many chat completions per second each HTTP client gets through, and at what CPU cost.

The pipeline's code speaks httpx, but sends through :class:`pipeline.transport.AiohttpTransport`
(an httpx transport over one aiohttp ``ClientSession``) because httpx's own connection pool
stops scaling at the concurrency a batch job runs at; and its hot path (a non-streamed POST
with no proxy) goes through :mod:`pipeline.h1`, a keep-alive HTTP/1.1 client over asyncio
protocols parsed by httptools, because aiohttp itself costs more CPU per request than the
rest of the pipeline. This benchmark shows the ratios, in the same run and against the same
server, for four clients:

* ``aiohttp``: a bare aiohttp loop (one ``ClientSession``, ``TCPConnector(limit=0)``), the
  baseline: what the machine can do at all;
* ``httpx default``: ``httpx.AsyncClient(limits=httpx.Limits(max_connections=N))`` with its
  default transport and timeouts, which is what a user would configure;
* ``httpx+aiohttp``: ``httpx.AsyncClient(transport=AiohttpTransport(max_connections=N))``,
  what the pipeline uses for streaming and behind a proxy;
* ``pipeline h1``: ``AiohttpTransport().post(url, headers, timeouts)``, the prepared ``Post``
  the pipeline's client sends every other request with (:mod:`pipeline.h1` underneath).

Each client runs N worker coroutines that share one counter of requests to send; each request
is a small realistic ``POST /v1/chat/completions``, its answer read and JSON-parsed. Measured:
requests per second completed OK (wall time from the first request to the last answer), errors
by exception type (``PoolTimeout`` and friends are counted, not raised), and the CPU time of
the client process per completed request (``time.process_time``). A client that is still
going after the wall-time cap stops taking new requests; requests still unanswered a few
seconds later are cancelled and counted as ``unfinished``.

The server is the project's mock (``pipeline mock-server``) in a subprocess, restarted per
scenario with that scenario's added latency. On a machine with at least two cores the server is
pinned to core 1 (``taskset -c 1``) and this process to core 0, so they do not steal each
other's CPU. With a 100 ms server the ideal rate is ``concurrency / 0.1 s``.

Run ``python bench/transport.py`` (about 2.5 minutes), or ``--short`` for a few-second smoke
run of the harness. Figures are printed, never asserted; the exit status is non-zero only when
the harness itself is broken (the server does not start, or the baseline completes nothing).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Final

import aiohttp
import common
import httpx

from pipeline.transport import AiohttpTransport

BODY: Final = json.dumps(
    {
        "model": "mock-small",
        "messages": [
            {
                "role": "user",
                "content": "Summarise this support ticket in one sentence: my order arrived "
                "two weeks late and the box was damaged.",
            }
        ],
        "max_tokens": 16,
    }
).encode()
HEADERS: Final = {"Authorization": "Bearer sk-bench", "Content-Type": "application/json"}
TIMEOUT_S: Final = 5.0  # httpx's default; the bare aiohttp loop gets the same connect/read limit
GRACE_S: Final = 10.0  # after the cap, how long in-flight requests may still finish
LOAD_UNKNOWN: Final = "load average unknown"

Send = Callable[[], Awaitable[None]]
ClientFactory = Callable[[str, int], contextlib.AbstractAsyncContextManager[Send]]


@dataclass(frozen=True)
class Scenario:
    name: str
    latency_ms: float
    concurrency: int
    requests: int

    @property
    def ideal_rps(self) -> float | None:
        """The rate a zero-cost client would reach: every slot busy waiting on the server."""
        return common.ideal_rps(self.concurrency, self.latency_ms)


FULL: Final = (
    Scenario("a", 0.0, 64, 5_000),
    Scenario("b", 100.0, 256, 5_000),
    Scenario("c", 100.0, 1_024, 10_000),
)
SHORT: Final = (
    Scenario("a", 0.0, 16, 200),
    Scenario("b", 20.0, 16, 200),
)


@dataclass
class Result:
    scenario: Scenario
    client: str
    ok: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    capped: bool = False
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def rps(self) -> float:
        return self.ok / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def cpu_ms_per_request(self) -> float | None:
        return self.cpu_s * 1000.0 / self.ok if self.ok else None


class BadStatus(Exception):
    """The server answered something other than 200."""


# --------------------------------------------------------------------------- clients


@contextlib.asynccontextmanager
async def bare_aiohttp(url: str, concurrency: int) -> AsyncIterator[Send]:
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=TIMEOUT_S, sock_read=TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def send() -> None:
            async with session.post(url, data=BODY, headers=HEADERS) as response:
                raw = await response.read()
                if response.status != 200:
                    raise BadStatus(f"HTTP {response.status}")
                json.loads(raw)

        yield send


def _httpx_send(client: httpx.AsyncClient, url: str) -> Send:
    async def send() -> None:
        response = await client.post(url, content=BODY, headers=HEADERS)
        if response.status_code != 200:
            raise BadStatus(f"HTTP {response.status_code}")
        json.loads(response.content)

    return send


@contextlib.asynccontextmanager
async def httpx_default(url: str, concurrency: int) -> AsyncIterator[Send]:
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(limits=limits) as client:
        yield _httpx_send(client, url)


@contextlib.asynccontextmanager
async def httpx_over_aiohttp(url: str, concurrency: int) -> AsyncIterator[Send]:
    transport = AiohttpTransport(max_connections=concurrency)
    async with httpx.AsyncClient(transport=transport) as client:
        yield _httpx_send(client, url)


@contextlib.asynccontextmanager
async def pipeline_post(url: str, concurrency: int) -> AsyncIterator[Send]:
    """The pipeline's own hot path: the transport's prepared Post, sent by pipeline.h1."""
    transport = AiohttpTransport(max_connections=concurrency)
    post = transport.post(httpx.URL(url), list(HEADERS.items()), {"connect": TIMEOUT_S, "read": TIMEOUT_S})

    async def send() -> None:
        status, _, raw = await post(BODY)
        if status != 200:
            raise BadStatus(f"HTTP {status}")
        json.loads(raw)

    try:
        yield send
    finally:
        await transport.aclose()


BASELINE: Final = "aiohttp"
CLIENTS: Final[tuple[tuple[str, ClientFactory], ...]] = (
    (BASELINE, bare_aiohttp),
    ("httpx default", httpx_default),
    ("httpx+aiohttp", httpx_over_aiohttp),
    ("pipeline h1", pipeline_post),
)


# --------------------------------------------------------------------------- driving


async def drive(send: Send, result: Result, cap_s: float) -> None:
    """Send ``result.scenario.requests`` requests from N workers; fill in ``result``."""
    scenario = result.scenario
    loop = asyncio.get_running_loop()
    started = 0
    deadline = loop.time() + cap_s

    async def worker() -> None:
        nonlocal started
        while started < scenario.requests and loop.time() < deadline:
            started += 1
            try:
                await send()
            except Exception as exc:  # counted, never raised: PoolTimeout is a result here
                result.errors[type(exc).__name__] += 1
            else:
                result.ok += 1

    cpu0, t0 = time.process_time(), time.perf_counter()
    tasks = [asyncio.create_task(worker()) for _ in range(scenario.concurrency)]
    _, pending = await asyncio.wait(tasks, timeout=cap_s + GRACE_S)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    result.wall_s = time.perf_counter() - t0
    result.cpu_s = time.process_time() - cpu0
    result.capped = started < scenario.requests or bool(pending)
    unfinished = started - result.ok - sum(result.errors.values())
    if unfinished:
        result.errors["unfinished"] += unfinished


async def measure(factory: ClientFactory, url: str, result: Result, cap_s: float) -> None:
    async with factory(url, result.scenario.concurrency) as send:
        await drive(send, result, cap_s)


# --------------------------------------------------------------------------- the server


def _server_commands(latency_ms: float) -> list[list[str]]:
    """The CLI first; ``pipeline.mock.main`` directly if the CLI is not usable."""
    direct = (
        "import sys; from pipeline.mock import MockConfig, main; "
        "main(MockConfig(port=0, latency_ms=float(sys.argv[1])))"
    )
    return [
        common.mock_server_command("--latency-ms", str(latency_ms)),
        [sys.executable, "-c", direct, str(latency_ms)],
    ]


@contextlib.contextmanager
def mock_server(latency_ms: float) -> Iterator[str]:
    """Run the mock in a pinned subprocess; yield its chat-completions URL; always stop it."""
    for command in _server_commands(latency_ms):
        with tempfile.TemporaryFile() as stderr:
            pinned = [*common.pin_prefix(1), *command]
            process = subprocess.Popen(pinned, stdout=subprocess.PIPE, stderr=stderr)
            started = False
            try:
                base = common.read_announcement(process)
                if base is not None:
                    started = True
                    yield base + "/chat/completions"
                    return
            finally:
                common.stop(process, timeout_s=5)
                _report_stderr(stderr, command, started)
    raise RuntimeError("could not start the mock server (its output is above)")


def _report_stderr(stderr: IO[bytes], command: Sequence[str], started: bool) -> None:
    """All of it if the server did not start; else a one-line count (e.g. resets at the cap)."""
    stderr.seek(0)
    text = stderr.read().decode(errors="replace").strip()
    if not text:
        return
    if not started:
        print(f"mock server {' '.join(command)!r} failed:\n{text}", file=sys.stderr)
        return
    lines = text.splitlines()
    print(f"  (mock server wrote {len(lines)} lines to stderr; last: {lines[-1]})", file=sys.stderr)


# --------------------------------------------------------------------------- reporting


def _errors(counter: Counter[str]) -> str:
    if not counter:
        return "0"
    return ", ".join(f"{n:,} {kind}" for kind, n in counter.most_common())


def table(results: Sequence[Result]) -> str:
    header = ("scenario", "client", "ok", "req/s", "vs aiohttp", "CPU ms/req", "errors")
    rows: list[tuple[str, ...]] = []
    seen: set[str] = set()
    baseline = {r.scenario.name: r.rps for r in results if r.client == BASELINE}
    for r in results:
        s = r.scenario
        label = f"{s.name}: {s.latency_ms:g} ms, {s.concurrency:,} conc"
        if s.name not in seen:
            seen.add(s.name)
            if s.ideal_rps is not None:
                rows.append((label, "(ideal)", "", f"{s.ideal_rps:,.0f}", "", "", ""))
        base = baseline.get(s.name)
        ratio = f"{r.rps / base:.2f}x" if base else "-"
        cpu = r.cpu_ms_per_request
        rows.append(
            (
                label,
                r.client,
                f"{r.ok:,}/{s.requests:,}",
                f"{r.rps:,.0f}" + (" (capped)" if r.capped else ""),
                ratio,
                f"{cpu:.2f}" if cpu is not None else "-",
                _errors(r.errors),
            )
        )
    return common.render(header, rows, left={0, 1, 6})


# --------------------------------------------------------------------------- main


def run(scenarios: Sequence[Scenario], cap_s: float) -> list[Result]:
    results: list[Result] = []
    for scenario in scenarios:
        with mock_server(scenario.latency_ms) as url:
            for name, factory in CLIENTS:
                gc.collect()
                result = Result(scenario, name)
                asyncio.run(measure(factory, url, result, cap_s))
                results.append(result)
                print(
                    f"  {scenario.name} {name:<14} {result.rps:>8,.0f} req/s"
                    f"  {result.wall_s:6.1f} s  errors {_errors(result.errors)}",
                    file=sys.stderr,
                    flush=True,
                )
                time.sleep(0.3)  # let the server drop the closed connections
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--short", action="store_true", help="tiny smoke run (a few seconds)")
    parser.add_argument("--cap", type=float, default=None, help="wall-time cap per client and scenario, s")
    args = parser.parse_args(argv)
    scenarios = SHORT if args.short else FULL
    cap_s = args.cap if args.cap is not None else (10.0 if args.short else 45.0)

    pinning = "client on core 0, server on core 1" if common.pin_self() else common.NOT_PINNED
    print(
        f"python {platform.python_version()}, aiohttp {aiohttp.__version__}, "
        f"httpx {httpx.__version__}; {os.cpu_count()} cores, {pinning}; "
        f"cap {cap_s:g} s per client; {common.load_average(LOAD_UNKNOWN)}",
        flush=True,
    )
    try:
        results = run(scenarios, cap_s)
    except KeyboardInterrupt:
        print("interrupted; the mock server was stopped", file=sys.stderr)
        return 130
    print(table(results))
    print(f"after: {common.load_average(LOAD_UNKNOWN)} (other work on the machine skews the figures)")
    broken = [r.scenario.name for r in results if r.client == BASELINE and r.ok == 0]
    if broken:
        print(f"harness broken: the aiohttp baseline completed nothing in {broken}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
