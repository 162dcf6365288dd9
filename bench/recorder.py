"""The recorder's commit throughput in isolation: how many finished requests a second it stores.

A temp SQLite store (``pipeline.store.Store.open``, migrated, WAL) gets one run with N requests
loaded the way ``pipeline run`` loads them (``Store.load_requests``); then N synthetic
``Outcome`` objects of realistic size (one successful attempt each, with a completion whose raw
body is a 630-byte ``chat.completion`` like the mock server's, and its usage) are pushed as fast
as possible through ``pipeline.recorder.Recorder.run`` over an anyio memory stream (buffer 128,
as a 64-worker run has; each outcome handed on as a worker hands it on,
``pipeline.recorder.hand_on``: at once while the stream has room). The outcomes are
built before the clock starts; the garbage collector is tuned as a run tunes it while its
workers run (``pipeline.collector``). Three variants:

* ``outcomes``: SQLite only (no Parquet part writer);
* ``+ parts``: with the Parquet part writer of a real run (a part file every 10,000 rows);
* ``+ parts + claims/256``: a ``Claim`` of the next page of ids before every page of outcomes,
  as the real feeder does at 64 concurrent (write-ahead; a page is four rounds of the workers,
  ``pipeline.run._page_size``: 256).

Printed: outcomes/s; commits (transactions with outcomes: ``Store.start_outcomes``) and ms per
commit (from the transaction's start on the database's thread to the recorder learning of its
end, claims that came meanwhile included); claims sent, and how many
transactions held claims alone (``Store.claim_pages``: the recorder commits a claim at once,
in the batch's transaction when a batch is waiting); CPU ms per outcome of the whole process
(every thread: the database writer's, the WAL checkpoints', the part writer's). The target is
10x the request rate of ``bench/throughput.py`` scenario 1: that scenario's whole ``pipeline
run`` is measured in the same run, before each round of the variants and after the last
(machines here are noisy: the same code's rates differ by a fifth from one minute to the next),
and each variant's median round is compared with the median of those (``--vs-rps R`` compares
with R instead; ``--short`` with nothing). Every round's rate is printed beside the median.

    python bench/recorder.py                 # 3 rounds of 50,000 per variant, scenario 1 4 times, ~60-90 s
    python bench/recorder.py --rounds 1      # one round, scenario 1 before and after, ~30 s
    python bench/recorder.py --short         # 2,000, a few seconds
    python bench/recorder.py --vs-rps 4800   # the ratio to that rate, scenario 1 not run
    python bench/recorder.py --prompt-bytes 4000   # requests with ~4 KB prompts (default ~130 B)
    python bench/recorder.py --random-ids -n 200000 --vs-rps 6000   # UUIDs for custom ids

Figures are printed, never asserted; the exit status is non-zero only if the harness is broken
(a variant did not record every outcome).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Final, TypeVar

import anyio
import common
import orjson

from pipeline.collector import fewer_collections
from pipeline.outputs import PartWriter
from pipeline.progress import Counters
from pipeline.recorder import Claim, Recorder, hand_on
from pipeline.records import Attempt, Choice, Completion, Outcome, Usage
from pipeline.run import _page_size
from pipeline.store.db import Recorded, Store, utcnow

RUN_ID: Final = "bench"
WORKERS: Final = 64  # a run at 64 concurrent
PAGE: Final = _page_size(WORKERS, [0])  # the feeder's claims at 64 concurrent (four rounds: 256)
STREAM_BUFFER: Final = 128  # run.py: n_workers * 2
LOAD_BATCH: Final = 1000  # run.py: SUBMIT_BATCH
T = TypeVar("T")


@dataclass(frozen=True)
class Variant:
    name: str
    parts: bool
    claims: bool


VARIANTS: Final = (
    Variant("outcomes", parts=False, claims=False),
    Variant("+ parts", parts=True, claims=False),
    Variant(f"+ parts + claims/{PAGE}", parts=True, claims=True),
)


@dataclass
class Timed:
    calls: int = 0
    seconds: float = 0.0

    @property
    def ms_per_call(self) -> float | None:
        return self.seconds * 1000.0 / self.calls if self.calls else None


@dataclass
class Result:
    variant: Variant
    n: int
    recorded: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    load_s: float = 0.0
    db_rows: int = 0
    commits: Timed | None = None
    claims: Timed | None = None
    claims_sent: int = 0

    @property
    def rate(self) -> float:
        return self.recorded / self.wall_s if self.wall_s > 0 else 0.0


# --------------------------------------------------------------------------- synthetic data


def custom_id(i: int, random_ids: bool = False) -> str:
    """The i-th request's id: in input order, or (``random_ids``) a UUID as many inputs have."""
    if random_ids:
        return str(uuid.UUID(bytes=hashlib.md5(i.to_bytes(8, "little")).digest(), version=4))
    return f"r{i:07d}"


def body(i: int, prompt_bytes: int = 0) -> dict[str, Any]:
    """A small request (~130 bytes); ``prompt_bytes``: its prompt padded to about that size."""
    text = f"Summarise this support ticket in one sentence: my order arrived late, box damaged. #{i}"
    if len(text) < prompt_bytes:
        text += " The parcel was left in the rain." * ((prompt_bytes - len(text)) // 33)
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 16}


def request_rows(n: int, prompt_bytes: int = 0, random_ids: bool = False) -> list[list[dict[str, Any]]]:
    """Batches of request rows as ``pipeline.run._request_row`` makes them."""
    rows = []
    for i in range(n):
        raw = orjson.dumps(body(i, prompt_bytes))
        rows.append(
            {
                "custom_id": custom_id(i, random_ids),
                "seq": i,
                "body_sha256": f"{i:064x}",
                "body": raw.decode(),
                "record": None,
                "state": "pending",
                "attempts": 0,
            }
        )
    return [rows[k : k + LOAD_BATCH] for k in range(0, n, LOAD_BATCH)]


def outcome(i: int, random_ids: bool = False) -> Outcome:
    """One succeeded request, sized like a mock-small answer (raw body ~630 bytes). What differs
    between a run's requests differs here too: the answer, ids, token counts and so the cost,
    latency, start time; the run, route, status and zero token details are one for all."""
    content = f"Mock answer {i:08x}: Batch pipelines love predictable answers l"
    prompt_tokens, completion_tokens = 18 + i % 17, 8 + i % 9
    usage_api = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }
    response_id = f"chatcmpl-{i:024x}"
    raw = orjson.dumps(
        {
            "id": response_id,
            "object": "chat.completion",
            "created": 1795437025,
            "model": "mock-small",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content, "refusal": None, "annotations": []},
                    "logprobs": None,
                    "finish_reason": "length",
                }
            ],
            "usage": usage_api,
            "service_tier": "default",
            "system_fingerprint": "fp_mock",
        }
    )
    usage = Usage.from_api(usage_api)
    request_id = f"req_{i:032x}"
    completion = Completion(
        response_id=response_id,
        model="mock-small",
        provider=None,
        system_fingerprint="fp_mock",
        created=1795437025,
        choices=(Choice(index=0, finish_reason="length", content=content, refusal=None),),
        usage=usage,
        raw=raw,
        provider_request_id=request_id,
    )
    started = utcnow() - timedelta(milliseconds=20)
    attempt = Attempt(
        attempt_no=1,
        endpoint="default",
        base_url="http://127.0.0.1:8000/v1",
        model="mock-small",
        started_at=started,
        latency_ms=10.0 + (i % 97) * 0.37,
        http_status=200,
        outcome="success",
        provider_request_id=request_id,
        completion=completion,
        usage=usage,
        cost_picousd=prompt_tokens * 150_000 + completion_tokens * 600_000,  # $0.15 / $0.60 per 1M
        cost_source="spec",
    )
    return Outcome(seq=i, custom_id=custom_id(i, random_ids), state="succeeded", attempts=[attempt])


# --------------------------------------------------------------------------- measuring


def timed(fn: Callable[..., Awaitable[T]], into: Timed) -> Callable[..., Awaitable[T]]:
    async def wrapper(*args: Any, **kwargs: Any) -> T:
        t0 = time.perf_counter()
        try:
            return await fn(*args, **kwargs)
        finally:
            into.seconds += time.perf_counter() - t0
            into.calls += 1

    return wrapper


def timed_start(fn: Callable[..., Awaitable[Recorded]], into: Timed) -> Callable[..., Awaitable[Recorded]]:
    """Store.start_outcomes, timed from the transaction's start (when it takes its claims, on
    the database's thread) to the recorder learning of its end."""

    def wrapper(rows: Any, *, claims: Callable[[], Any] = tuple) -> Awaitable[Recorded]:
        started: list[float] = []

        def take() -> Any:
            started.append(time.perf_counter())
            return claims()

        begun = fn(rows, claims=take)

        async def waited() -> Recorded:
            try:
                return await begun
            finally:
                if started:
                    into.seconds += time.perf_counter() - started[0]
                    into.calls += 1

        return waited()

    return wrapper


async def measure(
    variant: Variant, n: int, folder: Path, prompt_bytes: int = 0, random_ids: bool = False
) -> Result:
    result = Result(variant, n)
    db = folder / "r.db"
    store = await Store.open(f"sqlite+aiosqlite:///{db}")
    try:
        await store.create_run(
            run_id=RUN_ID,
            job="bench",
            spec_json="{}",
            input_path="bench",
            input_sha256="0" * 64,
            state="running",
        )
        batches = request_rows(n, prompt_bytes, random_ids)

        async def load() -> AsyncIterator[list[dict[str, Any]]]:
            for b in batches:
                yield b

        t0 = time.perf_counter()
        await store.load_requests(RUN_ID, load())
        result.load_s = time.perf_counter() - t0

        outcomes = [outcome(i, random_ids) for i in range(n)]
        commits, claims = Timed(), Timed()
        store.start_outcomes = timed_start(store.start_outcomes, commits)  # type: ignore[method-assign]
        store.claim_pages = timed(store.claim_pages, claims)  # type: ignore[method-assign]
        parts = PartWriter(folder / "parts") if variant.parts else None
        recorder = Recorder(store, RUN_ID, parts=parts, counters=Counters(total=n))
        send, receive = anyio.create_memory_object_stream[Outcome | Claim](STREAM_BUFFER)

        async def produce() -> None:
            async with send:
                waits: list[Claim] = []
                for k in range(0, n, PAGE):
                    page = outcomes[k : k + PAGE]
                    if variant.claims:
                        claim = Claim([o.seq for o in page])
                        waits.append(claim)
                        result.claims_sent += 1
                        await send.send(claim)
                    for o in page:
                        await hand_on(send, o)
                for claim in waits:
                    await claim.done.wait()

        gc.collect()
        cpu0, t0 = time.process_time(), time.perf_counter()
        with fewer_collections():  # as `pipeline run` has it while the workers run
            async with anyio.create_task_group() as tg:
                tg.start_soon(produce)
                tg.start_soon(recorder.run, receive)
        result.wall_s = time.perf_counter() - t0
        result.cpu_s = time.process_time() - cpu0
        result.recorded = recorder.recorded
        result.commits, result.claims = commits, claims
    finally:
        await store.close()
    with sqlite3.connect(db) as conn:
        (result.db_rows,) = conn.execute(
            "SELECT COUNT(*) FROM request r JOIN completion c USING (run_id, seq) WHERE r.state = 'succeeded'"
        ).fetchone()
    return result


# --------------------------------------------------------------------------- reporting


def median_round(rounds: Sequence[Result]) -> Result:
    """The round of median rate (of an even number, the lower of the middle two)."""
    ordered = sorted(rounds, key=lambda r: r.rate)
    return ordered[(len(ordered) - 1) // 2]


def table(runs: dict[str, list[Result]], vs_rps: float | None) -> str:
    """A row per variant: its median round, and every round's rate."""
    header = (
        "variant",
        "outcomes",
        "outcomes/s",
        "commits",
        "outcomes/commit",
        "ms/commit",
        "claims",
        "alone",
        "ms/alone",
        "CPU ms/outcome",
        f"vs {vs_rps:,.0f} req/s" if vs_rps else "vs scenario 1",
        "rounds",
    )
    rows = []
    for rounds in runs.values():
        r = median_round(rounds)
        c, k = r.commits or Timed(), r.claims or Timed()
        rows.append(
            (
                r.variant.name,
                f"{r.recorded:,}/{r.n:,}",
                f"{r.rate:,.0f}",
                f"{c.calls:,}",
                f"{r.recorded / c.calls:,.0f}" if c.calls else "-",
                f"{c.ms_per_call:.1f}" if c.ms_per_call is not None else "-",
                f"{r.claims_sent:,}",
                f"{k.calls:,}",
                f"{k.ms_per_call:.1f}" if k.ms_per_call is not None else "-",
                f"{r.cpu_s * 1000.0 / r.recorded:.3f}" if r.recorded else "-",
                f"{r.rate / vs_rps:.1f}x" if vs_rps else "-",
                " / ".join(f"{x.rate:,.0f}" for x in rounds),
            )
        )
    return common.render(header, rows, left={0})


def scenario_1(folder: Path) -> float:
    """bench/throughput.py's scenario 1, the whole ``pipeline run`` only (no baselines), as that
    benchmark runs it: the mock server on core 1, the run on core 0. Its req/s."""
    import throughput

    scenario = throughput.FULL[0]
    path = folder / "requests.jsonl"
    if not path.exists():
        throughput.write_input(path, scenario.requests)
    throughput.raise_fd_limit()
    with common.mock_server(common.mock_server_command("--latency-ms", str(scenario.latency_ms))) as base:
        run = throughput.run_pipeline(base, scenario, path, folder)
    if run.exit_code != 0 or run.succeeded != scenario.requests:
        raise RuntimeError("scenario 1's run failed:\n    " + "\n    ".join(run.stderr_tail))
    return run.rps


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="2,000 outcomes per variant, a few seconds")
    parser.add_argument("-n", type=int, default=None, help="outcomes per variant (default 50,000)")
    parser.add_argument(
        "--vs-rps",
        type=float,
        default=None,
        help="compare with this req/s instead of running bench/throughput.py's scenario 1 (target >= 10x)",
    )
    parser.add_argument(
        "--prompt-bytes",
        type=int,
        default=0,
        help="pad each request's prompt to about this many bytes (default: ~130-byte requests)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="rounds of the variants, scenario 1 before each and after the last; each variant's "
        "median round is reported (default 3; --short: 1)",
    )
    parser.add_argument(
        "--random-ids",
        action="store_true",
        help="requests named by UUIDs (random order) instead of ids in input order",
    )
    args = parser.parse_args(argv)
    n = args.n or (2_000 if args.short else 50_000)
    print(
        f"python {platform.python_version()}, sqlite {sqlite3.sqlite_version}; {os.cpu_count()} cores; "
        f"request bodies of {len(orjson.dumps(body(0, args.prompt_bytes))):,} bytes; "
        f"custom ids {'UUIDs (random order)' if args.random_ids else 'in input order'}; "
        f"{common.load_average()}"
    )
    rounds = args.rounds or (1 if args.short else 3)
    runs: dict[str, list[Result]] = {v.name: [] for v in VARIANTS}  # each variant's rounds
    versus: list[float] = []  # scenario 1's req/s: before each round, and after the last
    with tempfile.TemporaryDirectory(prefix="bench-recorder-") as scratch:
        same_run = args.vs_rps is None and not args.short

        def scenario() -> None:
            versus.append(scenario_1(Path(scratch)))
            print(f"  scenario 1 pipeline   {versus[-1]:>9,.0f} req/s", file=sys.stderr, flush=True)

        for _ in range(rounds):
            if same_run:
                scenario()
            for variant in VARIANTS:
                with tempfile.TemporaryDirectory(prefix="bench-recorder-") as tmp:
                    r = asyncio.run(measure(variant, n, Path(tmp), args.prompt_bytes, args.random_ids))
                runs[variant.name].append(r)
                progress = f"{r.rate:>9,.0f} outcomes/s  {r.wall_s:5.1f} s (load {r.load_s:.1f} s)"
                print(
                    f"  {variant.name:<22} {progress}",
                    file=sys.stderr,
                    flush=True,
                )
        if same_run:
            scenario()
    vs_rps = args.vs_rps or (statistics.median(versus) if versus else None)
    print(table(runs, vs_rps))
    if rounds > 1:
        print(f"each variant's row: its median round of {rounds} (rounds: each round's outcomes/s in order)")
    if versus:
        readings = ", ".join(f"{v:,.0f}" for v in versus)
        print(
            "vs = bench/throughput.py scenario 1 (0 ms, 64 conc, 20,000 requests: the whole pipeline run), "
            f"measured before each round and after the last in this run: {readings} req/s, their median"
        )
    print(
        "commits = transactions with outcomes (Store.start_outcomes); claims = Claim messages (a page "
        f"of {PAGE} each), committed with a batch or, alone = in transactions of claims only "
        "(Store.claim_pages); no commit per request when outcomes/commit > 1"
    )
    broken = [name for name, rs in runs.items() if any(r.recorded != n or r.db_rows != n for r in rs)]
    if broken:
        print(f"harness broken: not every outcome was recorded in {broken}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
