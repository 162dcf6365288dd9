"""Streamed throughput as a ratio of non-streamed throughput, on the same job.

The same input file is run by the whole pipeline (``pipeline.run.execute``: load into SQLite,
dispatch, workers, recorder, Parquet), once as a plain job and once with ``stream = true``,
alternating the order over a few rounds, against one mock server. Each request asks for a
``json_schema`` answer whose string is ``--answer-chars`` long (about a quarter as many
tokens), so a streamed answer is tens of ``chat.completion.chunk`` events plus the usage chunk.

The server runs in its own process: ``pipeline mock-server`` (16 characters per delta), or,
with ``--chunk-chars N``, ``pipeline.mock.main`` with ``MockConfig(streaming=StreamFaults(
chunk_chars=N))`` (the mock-server command has no flag for it); ``--chunk-chars 4`` is about
one token per delta, as OpenAI streams. On a machine with two cores or more the server is
pinned to core 1 (``taskset -c 1``) and this process to core 0.

One run of each mode comes first as a warm-up and is not counted. Printed: requests per
second of each run (wall time of ``execute``), CPU milliseconds of this
process per request, the median rate of each mode and the ratio streamed / plain (the target
is >= 0.8), and the streamed runs' median time to first and last token from the database.
Figures are printed, never asserted; the exit status is non-zero only when the harness is
broken (the server does not start, or a run does not answer every request).

    python bench/streaming.py            # 4,000 requests x 3 rounds x 2 modes, about a minute
    python bench/streaming.py --short    # a few seconds
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio
import common
import orjson

from pipeline.run import execute
from pipeline.spec import load_spec


@dataclass(frozen=True)
class Setup:
    requests: int
    concurrency: int
    latency_ms: float
    answer_chars: int
    rounds: int
    chunk_chars: int | None


@dataclass
class Result:
    mode: str
    round: int | str
    requests: int
    wall_s: float
    cpu_s: float
    ttft_ms: float | None = None
    ttlt_ms: float | None = None

    @property
    def rps(self) -> float:
        return self.requests / self.wall_s

    @property
    def cpu_ms(self) -> float:
        return self.cpu_s * 1000.0 / self.requests


# --------------------------------------------------------------------------- the server


def _server_command(setup: Setup) -> list[str]:
    if setup.chunk_chars is None:
        return common.mock_server_command("--latency-ms", str(setup.latency_ms))
    code = (
        "import sys; from pipeline.mock import MockConfig, main; "
        "from pipeline.mock.stream_faults import StreamFaults; "
        "main(MockConfig(port=0, latency_ms=float(sys.argv[1]), "
        "streaming=StreamFaults(chunk_chars=int(sys.argv[2]))))"
    )
    return [sys.executable, "-c", code, str(setup.latency_ms), str(setup.chunk_chars)]


# --------------------------------------------------------------------------- the job


def write_input(path: Path, setup: Setup) -> None:
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string", "minLength": setup.answer_chars}},
        "required": ["answer"],
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    with path.open("wb") as f:
        for i in range(setup.requests):
            row = {
                "custom_id": f"r{i:06d}",
                "messages": [
                    {"role": "system", "content": "You are a careful assistant. Answer in JSON."},
                    {"role": "user", "content": f"Write a short paragraph about item {i} of the catalogue."},
                ],
                "response_format": fmt,
            }
            f.write(orjson.dumps(row) + b"\n")


def one_run(work: Path, url: str, setup: Setup, mode: str, n: int | str) -> Result:
    run_id = f"{mode}-{n}"
    db = work / f"{run_id}.db"
    spec = load_spec(
        None,
        {
            "input": {"path": str(work / "in.jsonl")},
            "base_url": url,
            "model": "mock-small",
            "job": "bench",
            "run_id": run_id,
            "db": str(db),
            "out": str(work / "out"),
            "limits": {"concurrency": setup.concurrency},
            "stream": mode == "stream",
            "prices": {"mock-small": {"input": 0.15, "output": 0.60}},
        },
    )
    gc.collect()
    cpu0, t0 = time.process_time(), time.perf_counter()
    summary = anyio.run(lambda: execute(spec, display=None, handle_signals=False))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    done = summary.counts.get("succeeded", 0)
    if done != setup.requests:
        raise RuntimeError(f"{run_id}: {done} of {setup.requests} succeeded ({dict(summary.counts)})")
    result = Result(mode, n, done, wall, cpu)
    if mode == "stream":
        with sqlite3.connect(db) as conn:
            rows = conn.execute("SELECT ttft_ms, ttlt_ms FROM attempt WHERE ttft_ms IS NOT NULL").fetchall()
        if rows:
            result.ttft_ms = statistics.median(r[0] for r in rows)
            result.ttlt_ms = statistics.median(r[1] for r in rows)
    return result


def measure(setup: Setup) -> list[Result]:
    results: list[Result] = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-streaming-") as tmp,
        common.mock_server(_server_command(setup), stop_timeout_s=5) as url,
    ):
        work = Path(tmp)
        write_input(work / "in.jsonl", setup)
        for mode in ("plain", "stream"):  # warm-up, not counted: imports, tokenizer, connections
            one_run(work, url, setup, mode, "warm-up")
        for n in range(setup.rounds):
            order = ("plain", "stream") if n % 2 == 0 else ("stream", "plain")
            for mode in order:
                r = one_run(work, url, setup, mode, n)
                results.append(r)
                extra = f"  ttft {r.ttft_ms:.1f} ms, ttlt {r.ttlt_ms:.1f} ms" if r.ttft_ms is not None else ""
                print(
                    f"  round {n} {mode:<6} {r.rps:8,.0f} req/s  {r.wall_s:6.2f} s  "
                    f"cpu {r.cpu_ms:.2f} ms/req{extra}",
                    file=sys.stderr,
                    flush=True,
                )
    return results


def report(setup: Setup, results: Sequence[Result]) -> float:
    plain = [r for r in results if r.mode == "plain"]
    stream = [r for r in results if r.mode == "stream"]
    p_rps = statistics.median(r.rps for r in plain)
    s_rps = statistics.median(r.rps for r in stream)
    ideal = common.ideal_rps(setup.concurrency, setup.latency_ms)
    deltas = (
        f"{setup.chunk_chars} characters" if setup.chunk_chars else "16 characters (pipeline mock-server)"
    )
    print(
        f"{setup.requests:,} requests per run, {setup.concurrency} concurrent, server latency "
        f"{setup.latency_ms:g} ms, answers of {setup.answer_chars:,} characters in deltas of {deltas}, "
        f"{setup.rounds} rounds" + (f"; ideal {ideal:,.0f} req/s" if ideal else "")
    )
    print(f"{'mode':<8} {'req/s (median)':>15} {'runs':>30} {'CPU ms/req':>11}")
    for name, runs, rate in (("plain", plain, p_rps), ("stream", stream, s_rps)):
        each = ", ".join(f"{r.rps:,.0f}" for r in runs)
        cpu = statistics.median(r.cpu_ms for r in runs)
        print(f"{name:<8} {rate:>15,.0f} {each:>30} {cpu:>11.2f}")
    ttft = [r.ttft_ms for r in stream if r.ttft_ms is not None]
    ttlt = [r.ttlt_ms for r in stream if r.ttlt_ms is not None]
    if ttft and ttlt:
        print(
            f"streamed: median time to first token {statistics.median(ttft):.1f} ms, to last token "
            f"{statistics.median(ttlt):.1f} ms"
        )
    ratio = s_rps / p_rps
    print(f"ratio streamed / plain: {ratio:.2f} (target >= 0.80)")
    return ratio


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--short", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--requests", type=int, help="requests per run (default 4000; --short 300)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency-ms", type=float, help="server latency (default 50; --short 20)")
    parser.add_argument("--answer-chars", type=int, default=1000, help="answer length (default 1000)")
    parser.add_argument("--rounds", type=int, help="rounds of (plain, stream) (default 3; --short 1)")
    parser.add_argument(
        "--chunk-chars", type=int, default=None, help="characters per delta (default: the mock-server's 16)"
    )
    args = parser.parse_args(argv)
    setup = Setup(
        requests=args.requests or (300 if args.short else 4000),
        concurrency=args.concurrency,
        latency_ms=args.latency_ms if args.latency_ms is not None else (20.0 if args.short else 50.0),
        answer_chars=args.answer_chars,
        rounds=args.rounds or (1 if args.short else 3),
        chunk_chars=args.chunk_chars,
    )
    pinning = "pipeline on core 0, server on core 1" if common.pin_self() else common.NOT_PINNED
    print(
        f"python {platform.python_version()}; {os.cpu_count()} cores, {pinning}; {common.load_average()}",
        flush=True,
    )
    try:
        results = measure(setup)
    except RuntimeError as exc:
        print(f"harness broken: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; the mock server was stopped", file=sys.stderr)
        return 130
    report(setup, results)
    if load := common.load_average():
        print(f"after: {load} (other work on the machine skews the figures)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
