"""How close the WHOLE `pipeline run` comes to what the machine and the provider allow.

For each scenario the mock server (``pipeline mock-server``) runs in its own process, pinned to
core 1 and restarted per scenario with that scenario's latency. Against it, one after another,
all pinned to core 0:

* ``aiohttp``: a bare aiohttp loop (one ``ClientSession``, C coroutines, POST + read + JSON
  parse of a small chat completion), the baseline: what a plain Python client gets through;
* ``raw``: hand-written HTTP/1.1 keep-alive requests over asyncio streams, the answer read by
  its Content-Length and not parsed, the ceiling: it shows the server is not the bottleneck;
* ``pipeline``: the whole ``python -m pipeline run --input F --base-url URL --model mock-small
  --concurrency C --db DB --out OUT -q`` in a subprocess (reader, database load, limiter,
  workers, recorder, Parquet parts and the final results.parquet).

The pipeline's clock starts when the run logs "N requests to send" (its stderr is read line by
line and time-stamped as it arrives: everything before that line is start-up and loading the
input into SQLite, shown apart as ``setup s``) and stops when the process exits (so the final
rebuild of results.parquet counts). ``CPU ms/req`` is the run's user+sys CPU time over that same
span (psutil reads the child's CPU times at the log line; ``os.wait4`` gives them at the exit)
per request; ``peak RSS`` is ``ru_maxrss`` from ``os.wait4`` (through a tiny launcher process, see
``common.LAUNCHER``); ``tail s`` is the time from the server's last answer (``/mock/stats``, polled
every 50 ms) to the exit: rebuilding results.parquet from the database and closing. The ratio
is the pipeline's rate over the aiohttp baseline's, or over the ideal ``C / latency`` where the
scenario says so.

Also measured: the wall time of ``python -m pipeline --help`` (median of 5), next to that of a
bare ``python -c pass``.

    python bench/throughput.py            # full: three scenarios, about 2 minutes
    python bench/throughput.py --short    # a few seconds: keeps the harness from rotting
    python bench/throughput.py --scenario 1   # one scenario (repeatable)

Figures are printed, never asserted. The exit status is non-zero only when the harness cannot
measure (the server does not start, a baseline completes nothing, the run does not finish).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

import aiohttp
import common
import orjson
import psutil

MODEL: Final = "mock-small"
PROMPT: Final = "Summarise this support ticket in one sentence: my order arrived late, box damaged. #{i}"
RUN_TIMEOUT_S: Final = 900.0
START_LINE: Final = re.compile(r"run \S+: (\d+) requests to send")
LOAD_UNKNOWN: Final = "load unknown"

Send = Callable[[bytes], Awaitable[None]]


@dataclass(frozen=True)
class Scenario:
    name: str
    latency_ms: float
    concurrency: int
    requests: int
    versus: str  # "aiohttp" or "ideal"
    target: float

    @property
    def label(self) -> str:
        return f"{self.name}: {self.latency_ms:g} ms, {self.concurrency:,} conc, {self.requests:,} req"

    @property
    def ideal_rps(self) -> float | None:
        return common.ideal_rps(self.concurrency, self.latency_ms)


FULL: Final = (
    Scenario("1", 0.0, 64, 20_000, "aiohttp", 0.5),
    Scenario("2", 1000.0, 1024, 20_000, "ideal", 0.9),
    Scenario("3", 100.0, 256, 20_000, "aiohttp", 0.95),
)
SHORT: Final = (
    Scenario("1", 0.0, 16, 300, "aiohttp", 0.5),
    Scenario("2", 20.0, 16, 300, "ideal", 0.9),
)


@dataclass
class Loop:
    """One in-process client loop's result."""

    ok: int = 0
    errors: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0

    @property
    def rps(self) -> float:
        return self.ok / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def cpu_ms(self) -> float | None:
        return self.cpu_s * 1000.0 / self.ok if self.ok else None


@dataclass
class Run:
    """One `pipeline run` subprocess."""

    exit_code: int = -1
    succeeded: int = 0
    setup_s: float = 0.0  # launch -> "N requests to send"
    wall_s: float = 0.0  # "N requests to send" -> exit
    cpu_s: float = 0.0  # user+sys over the same span
    cpu_total_s: float = 0.0  # user+sys of the whole process
    peak_rss_mb: float = 0.0
    tail_s: float | None = None  # the server's last answer -> exit (final results.parquet, close)
    started: bool = False
    stderr_tail: list[str] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return self.succeeded / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def cpu_ms(self) -> float | None:
        return self.cpu_s * 1000.0 / self.succeeded if self.succeeded else None


@dataclass
class Result:
    scenario: Scenario
    aiohttp: Loop
    raw: Loop
    run: Run

    @property
    def reference(self) -> float | None:
        if self.scenario.versus == "ideal":
            return self.scenario.ideal_rps
        return self.aiohttp.rps or None

    @property
    def ratio(self) -> float | None:
        ref = self.reference
        return self.run.rps / ref if ref else None


# --------------------------------------------------------------------------- the machine


def raise_fd_limit() -> None:
    """1,024 connections per client and as many on the server: lift the soft limit (inherited)."""
    try:
        import resource
    except ImportError:  # pragma: no cover (not POSIX)
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


# --------------------------------------------------------------------------- inputs


def request_body(i: int) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": PROMPT.format(i=i)}], "max_tokens": 16}


def write_input(path: Path, n: int) -> None:
    with path.open("wb") as f:
        for i in range(n):
            f.write(orjson.dumps({"custom_id": f"r{i:07d}", **request_body(i)}) + b"\n")


def wire_bodies(n: int) -> list[bytes]:
    """What the pipeline puts on the wire for request i (the route adds the model)."""
    return [orjson.dumps({"model": MODEL, **request_body(i)}) for i in range(n)]


# --------------------------------------------------------------------------- the baselines


async def _drive(concurrency: int, bodies: Sequence[bytes], send: Send) -> Loop:
    result = Loop()
    it = iter(bodies)

    async def worker() -> None:
        for body in it:
            try:
                await send(body)
            except Exception:
                result.errors += 1
            else:
                result.ok += 1

    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.wall_s = time.perf_counter() - t0
    result.cpu_s = time.process_time() - cpu0
    return result


async def bare_aiohttp(base: str, concurrency: int, bodies: Sequence[bytes]) -> Loop:
    url = base + "/chat/completions"
    headers = {"Authorization": "Bearer sk-bench", "Content-Type": "application/json"}
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=60)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def send(body: bytes) -> None:
            async with session.post(url, data=body, headers=headers) as response:
                raw = await response.read()
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}")
                orjson.loads(raw)

        return await _drive(concurrency, bodies, send)


async def raw_sockets(base: str, concurrency: int, bodies: Sequence[bytes]) -> Loop:
    """HTTP/1.1 keep-alive over asyncio streams, one connection per coroutine."""
    parts = urlsplit(base)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    head = (
        f"POST {parts.path}/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "Authorization: Bearer sk-bench\r\nContent-Type: application/json\r\n"
    ).encode()
    result = Loop()
    it = iter(bodies)

    async def worker() -> None:
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        try:
            for body in it:
                try:
                    if writer is None:
                        reader, writer = await asyncio.open_connection(host, port)
                    assert reader is not None
                    writer.write(b"%sContent-Length: %d\r\n\r\n%s" % (head, len(body), body))
                    header = await reader.readuntil(b"\r\n\r\n")
                    length = 0
                    for line in header.split(b"\r\n"):
                        if line[:15].lower() == b"content-length:":
                            length = int(line[15:])
                    await reader.readexactly(length)
                    if header[9:12] != b"200":
                        raise RuntimeError(header[:12].decode(errors="replace"))
                except Exception:
                    result.errors += 1
                    if writer is not None:
                        writer.close()
                    reader = writer = None
                else:
                    result.ok += 1
        finally:
            if writer is not None:
                writer.close()

    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.wall_s = time.perf_counter() - t0
    result.cpu_s = time.process_time() - cpu0
    return result


# --------------------------------------------------------------------------- the pipeline


def run_pipeline(base: str, scenario: Scenario, input_path: Path, workdir: Path) -> Run:
    """The whole `pipeline run` in a subprocess on core 0; its clock starts at its own log line."""
    folder = Path(tempfile.mkdtemp(prefix="run-", dir=workdir))
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "run",
        "--input",
        str(input_path),
        "--base-url",
        base,
        "--model",
        MODEL,
        "--concurrency",
        str(scenario.concurrency),
        "--db",
        "p.db",
        "--out",
        "out",
        "-q",
    ]
    result = Run()
    t_launch = time.perf_counter()
    child = common.spawn(
        cmd, 0, cwd=folder, env=common.env_without_api_keys(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    ps = psutil.Process(child.pid)
    marks: dict[str, float] = {}

    def on_stderr_line(line: str) -> None:
        if "start" not in marks and START_LINE.search(line):
            marks["start"] = time.perf_counter()
            with contextlib.suppress(psutil.Error):
                cpu = ps.cpu_times()
                marks["cpu"] = cpu.user + cpu.system

    answered_before = common.answered(base) or 0
    done = threading.Event()

    def watch_server() -> None:
        """When did the server give its last answer? (polled every 50 ms)"""
        last = answered_before
        while not done.wait(0.05):
            now_answered = common.answered(base)
            if now_answered is not None and now_answered > last:
                last = now_answered
                marks["last_answer"] = time.perf_counter()

    output = common.ChildOutput(child.launcher, on_stderr_line)
    watcher = threading.Thread(target=watch_server, daemon=True)
    watcher.start()
    timer = threading.Timer(RUN_TIMEOUT_S, lambda: os.kill(child.pid, signal.SIGINT))
    timer.start()
    try:
        result.exit_code, result.peak_rss_mb, result.cpu_total_s = common.reap(child)
    finally:
        timer.cancel()
    t_end = time.perf_counter()
    done.set()
    output.join()
    watcher.join(5)
    result.succeeded = output.succeeded()
    result.stderr_tail = output.tail()
    if "start" in marks:
        result.started = True
        result.setup_s = marks["start"] - t_launch
        result.wall_s = t_end - marks["start"]
        result.cpu_s = result.cpu_total_s - marks.get("cpu", 0.0)
    if "last_answer" in marks:
        result.tail_s = t_end - marks["last_answer"]
    shutil.rmtree(folder, ignore_errors=True)
    return result


# --------------------------------------------------------------------------- reporting


def fmt(value: float | None, spec: str = ",.0f") -> str:
    return "-" if value is None else format(value, spec)


def table(results: Sequence[Result]) -> str:
    header = (
        "scenario",
        "ok",
        "aiohttp req/s",
        "raw req/s",
        "pipeline req/s",
        "ratio",
        "target",
        "met",
        "CPU ms/req",
        "aiohttp CPU ms/req",
        "peak RSS MB",
        "setup s",
        "tail s",
    )
    rows = []
    for r in results:
        s = r.scenario
        versus = "ideal " + fmt(s.ideal_rps) if s.versus == "ideal" else "aiohttp"
        rows.append(
            (
                s.label,
                f"{r.run.succeeded:,}/{s.requests:,}",
                fmt(r.aiohttp.rps),
                fmt(r.raw.rps),
                fmt(r.run.rps),
                fmt(r.ratio, ".3f") + "x",  # three places: 0.946 is not 0.95
                f">= {s.target:g}x {versus}",
                "-" if r.ratio is None else ("yes" if r.ratio >= s.target else "no"),
                fmt(r.run.cpu_ms, ".2f"),
                fmt(r.aiohttp.cpu_ms, ".2f"),
                fmt(r.run.peak_rss_mb, ".0f"),
                fmt(r.run.setup_s, ".1f"),
                fmt(r.run.tail_s, ".1f"),
            )
        )
    return common.render(header, rows, left={0, 6})


def help_time(runs: int = 5) -> tuple[float, float]:
    """Median wall time of `python -m pipeline --help`, and of a bare `python -c pass`."""

    def median(cmd: list[str]) -> float:
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return (
        median([sys.executable, "-m", "pipeline", "--help"]),
        median([sys.executable, "-c", "pass"]),
    )


# --------------------------------------------------------------------------- main


def measure(scenarios: Sequence[Scenario], workdir: Path) -> list[Result]:
    results = []
    inputs: dict[int, Path] = {}
    for s in scenarios:
        if s.requests not in inputs:
            inputs[s.requests] = workdir / f"requests-{s.requests}.jsonl"
            write_input(inputs[s.requests], s.requests)
        bodies = wire_bodies(s.requests)
        mock_cmd = common.mock_server_command("--latency-ms", str(s.latency_ms))
        with common.mock_server(mock_cmd) as base:
            gc.collect()
            base_loop = asyncio.run(bare_aiohttp(base, s.concurrency, bodies))
            progress(f"{s.name} aiohttp   {base_loop.rps:>8,.0f} req/s  {base_loop.wall_s:6.1f} s")
            time.sleep(0.3)
            gc.collect()
            raw_loop = asyncio.run(raw_sockets(base, s.concurrency, bodies))
            progress(f"{s.name} raw       {raw_loop.rps:>8,.0f} req/s  {raw_loop.wall_s:6.1f} s")
            time.sleep(0.3)
            run = run_pipeline(base, s, inputs[s.requests], workdir)
            progress(
                f"{s.name} pipeline  {run.rps:>8,.0f} req/s  {run.wall_s:6.1f} s "
                f"(+{run.setup_s:.1f} s setup), exit {run.exit_code}"
            )
        results.append(Result(s, base_loop, raw_loop, run))
    return results


def progress(text: str) -> None:
    print(f"  {text}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="tiny smoke run (a few seconds)")
    parser.add_argument(
        "--scenario", action="append", metavar="NAME", help="run only this scenario (1, 2, 3; repeatable)"
    )
    args = parser.parse_args(argv)
    scenarios = SHORT if args.short else FULL
    if args.scenario:
        scenarios = tuple(s for s in scenarios if s.name in args.scenario)
        if not scenarios:
            parser.error(f"no scenario named {', '.join(args.scenario)}")
    raise_fd_limit()
    pinning = (
        "clients and pipeline on core 0, server on core 1"
        if common.pin_self()
        else "not pinned (needs 2+ cores and taskset)"
    )
    print(
        f"python {platform.python_version()}, aiohttp {aiohttp.__version__}; {os.cpu_count()} cores, "
        f"{pinning}; {common.load_average(LOAD_UNKNOWN)}",
        flush=True,
    )
    try:
        with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
            results = measure(scenarios, Path(tmp))
    except KeyboardInterrupt:
        print("interrupted; the mock server was stopped", file=sys.stderr)
        return 130
    print(table(results))
    total = sum(r.run.cpu_total_s for r in results)
    print(
        "pipeline clock: from its 'N requests to send' log line to its exit (final results.parquet "
        f"included); whole-process CPU incl. setup: {total:.1f} s over {len(results)} runs"
    )
    help_s, python_s = help_time()
    print(
        f"pipeline --help: {help_s:.3f} s, median of 5 (target < 0.3 s); "
        f"bare `python -c pass`: {python_s:.3f} s"
    )
    print(f"after: {common.load_average(LOAD_UNKNOWN)} (other work on the machine skews the figures)")
    broken = []
    for r in results:
        if r.aiohttp.ok == 0 or r.raw.ok == 0:
            broken.append(f"{r.scenario.name}: a baseline completed nothing")
        if not r.run.started or r.run.exit_code != 0 or r.run.succeeded != r.scenario.requests:
            tail = "\n    ".join(r.run.stderr_tail)
            broken.append(f"{r.scenario.name}: pipeline run exit {r.run.exit_code}:\n    {tail}")
    for b in broken:
        print(f"harness: {b}", file=sys.stderr)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
