"""Rate limits: does `pipeline run` go at a provider's limit without collecting 429s?

Against `pipeline mock-server` (its own process, a real sliding 60 s window answering 429
with Retry-After and x-ratelimit-* headers, which it also sends on 200s), four scenarios of
one `pipeline run` each, stopped with SIGINT after the run time (default 2 minutes):

1. rpm, configured: the mock allows R requests/min, the pipeline gets `--rpm R`;
2. rpm, learned:    the same mock, the pipeline gets no limit (it must learn it);
3. tpm, configured: the mock allows T tokens/min (no rpm), the pipeline gets `--tpm T`;
4. tpm, learned:    the same mock, the pipeline gets no limit.

Requests are of known size: one user message of exactly 324 characters and `max_tokens`
16, which every mock answer fills (its answers are 17-20 tokens long). The mock counts
ceil(324 / 4) + 3 = 84 prompt tokens + 1 x 16 = 100 tokens per request, so T = 100 x R and
the tpm scenarios are the rpm ones in tokens. The input holds 3 x R x minutes rows, more
than a run can finish.

Measure: the bench polls `GET /mock/stats` every second. t = 0 is the first request the mock
sees. Achieved rate = 200s answered per minute over the steady state [warm-up, end] (warm-up
15 s, 5 s with --short; end = when SIGINT is sent), in requests/min (rpm) or tokens/min at
100 tokens a request (tpm); share = achieved / limit. 429 share = 429s / all answers, over
the whole run [0, end] and over [warm-up, end]. Answers after the SIGINT (in-flight requests
finishing) are not counted. Targets: configured, share >= 95% and 429s <= 1% of the whole
run; learned, share >= 85% and 429s <= 5% after the warm-up.

    python bench/ratelimit.py                 # R = 1,200, 2 minutes per scenario, ~9 minutes
    python bench/ratelimit.py --minutes 0.5   # shorter runs
    python bench/ratelimit.py --short         # R = 600, 20 s per scenario (the test runs it)
    python bench/ratelimit.py --only 2 --series s.json --keep /tmp/rl   # per-second samples, DBs kept

Figures are printed, never asserted: the exit status is non-zero only if the harness broke
(the server did not start, the pipeline died or ran out of input, nothing was answered).
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from common import (
    env_without_api_keys,
    load_average,
    mock_server,
    mock_server_command,
    mock_stats,
    pin_prefix,
    render,
)

PROMPT_CHARS = 324
MAX_TOKENS = 16
# What the mock counts against its window per request (its docstring): the prompt estimate
# ceil(chars / 4) + 3 per message, plus n x max_tokens.
TOKENS_PER_REQUEST = (PROMPT_CHARS + 3) // 4 + 3 + MAX_TOKENS  # 100
FILLER = (
    "Read the short product review that follows and answer with a single label chosen from "
    "positive, negative or neutral, nothing else. The review: the parcel arrived on time, the "
    "box was intact and the device works, although the manual is thin and the charger feels "
    "cheap; overall I would buy it again for the price. Label it now, please, thank you. "
    "Extra padding text to keep every request the same size."
)


@dataclass(frozen=True)
class Scenario:
    no: int
    kind: str  # "rpm" | "tpm"
    configured: bool

    @property
    def name(self) -> str:
        return f"{self.no}: {self.kind}, {'configured' if self.configured else 'learned'}"

    @property
    def share_target(self) -> float:
        return 0.95 if self.configured else 0.85

    @property
    def max_429(self) -> float:
        return 0.01 if self.configured else 0.05


SCENARIOS = (
    Scenario(1, "rpm", True),
    Scenario(2, "rpm", False),
    Scenario(3, "tpm", True),
    Scenario(4, "tpm", False),
)


@dataclass(frozen=True)
class Sample:
    t: float  # seconds since the first request reached the mock
    total: int
    ok: int
    limited: int


@dataclass
class Result:
    scenario: Scenario
    limit: int  # requests or tokens per minute
    warmup: float
    samples: list[Sample]
    exit_code: int | None
    after_stop: int  # 200s answered after the SIGINT (in-flight requests finishing)
    db: dict[str, int] = field(default_factory=dict)
    problem: str | None = None

    def at(self, t: float) -> Sample:
        """The sample nearest to ``t``."""
        return min(self.samples, key=lambda s: abs(s.t - t))

    def window(self, start: float) -> tuple[float, int, int]:
        """(seconds, 200s, 429s) from the sample nearest ``start`` to the last one."""
        if not self.samples:
            return 0.0, 0, 0
        a = self.at(start) if start > 0 else Sample(0.0, 0, 0, 0)
        b = self.samples[-1]
        return b.t - a.t, b.ok - a.ok, b.limited - a.limited

    @property
    def unit(self) -> int:
        return 1 if self.scenario.kind == "rpm" else TOKENS_PER_REQUEST

    @property
    def achieved(self) -> float:
        seconds, ok, _ = self.window(self.warmup)
        return ok * self.unit * 60.0 / seconds if seconds > 0 else 0.0

    @property
    def share(self) -> float:
        return self.achieved / self.limit

    def share_429(self, start: float) -> float:
        _, ok, limited = self.window(start)
        return limited / (ok + limited) if ok + limited else 0.0

    @property
    def ok(self) -> bool:
        s = self.scenario
        limited = self.share_429(0.0 if s.configured else self.warmup)
        return self.problem is None and self.share >= s.share_target and limited <= s.max_429

    def slices(self, width: float) -> list[tuple[float, int, int, int]]:
        """(start, sent, 200s, 429s) per ``width`` seconds of the run."""
        out: list[tuple[float, int, int, int]] = []
        if not self.samples:
            return out
        end = self.samples[-1].t
        start = 0.0
        prev = Sample(0.0, 0, 0, 0)
        while start < end - 0.5:
            b = self.at(min(start + width, end))
            out.append((start, b.total - prev.total, b.ok - prev.ok, b.limited - prev.limited))
            prev, start = b, start + width
        return out


# --------------------------------------------------------------------------- processes


def write_input(path: Path, rows: int) -> None:
    """``rows`` requests of the same size: 324 characters of prompt, ``max_tokens`` 16."""
    lines = []
    for i in range(rows):
        content = (f"Item {i:07d}. " + FILLER)[:PROMPT_CHARS]
        assert len(content) == PROMPT_CHARS
        body = {
            "custom_id": f"r{i:07d}",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
        }
        lines.append(orjson.dumps(body) + b"\n")
    path.write_bytes(b"".join(lines))


def pipeline_reserve() -> int:
    """What the pipeline reserves per request before sending (its estimate + max_tokens)."""
    from pipeline.tokens import estimate_prompt_tokens

    content = ("Item 0000000. " + FILLER)[:PROMPT_CHARS]
    return estimate_prompt_tokens({"messages": [{"role": "user", "content": content}]}) + MAX_TOKENS


def _sample(base_url: str, t: float) -> Sample:
    s = mock_stats(base_url)
    by = s["by_status"]
    return Sample(t, int(s["requests_total"]), int(by.get("200", 0)), int(by.get("429", 0)))


def _db_figures(db: Path) -> dict[str, int]:
    if not db.exists():
        return {}
    with sqlite3.connect(db, timeout=30) as conn:
        states = dict(conn.execute("SELECT state, COUNT(*) FROM request GROUP BY state").fetchall())
        sizes = conn.execute(
            "SELECT MIN(prompt_tokens + ?), MAX(prompt_tokens + ?), MIN(completion_tokens), "
            "MAX(completion_tokens) FROM attempt WHERE http_status = 200",
            (MAX_TOKENS, MAX_TOKENS),
        ).fetchone()
    return {
        "pending": int(states.get("pending", 0)),
        "failed": int(states.get("failed", 0)),
        "succeeded": int(states.get("succeeded", 0)),
        "mock_tokens_min": int(sizes[0] or 0),
        "mock_tokens_max": int(sizes[1] or 0),
        "completion_min": int(sizes[2] or 0),
        "completion_max": int(sizes[3] or 0),
    }


def run_scenario(
    sc: Scenario,
    *,
    rpm: int,
    seconds: float,
    warmup: float,
    latency_ms: float,
    concurrency: int,
    workdir: Path,
) -> Result:
    limit = rpm if sc.kind == "rpm" else rpm * TOKENS_PER_REQUEST
    folder = workdir / f"s{sc.no}"
    folder.mkdir(parents=True)
    rows = max(1000, math.ceil(3 * rpm * seconds / 60.0))
    write_input(folder / "in.jsonl", rows)
    flags = ["--latency-ms", str(latency_ms), f"--{sc.kind}", str(limit)]
    samples: list[Sample] = []
    problem: str | None = None
    exit_code: int | None = None
    after_stop = 0
    err_path = folder / "stderr.txt"
    with mock_server(mock_server_command(*flags), core=1) as base_url:
        cmd = [
            *pin_prefix(0),
            sys.executable,
            "-m",
            "pipeline",
            "run",
            "--input",
            "in.jsonl",
            "--base-url",
            base_url,
            "--model",
            "mock-small",
            "--concurrency",
            str(concurrency),
            "--db",
            "p.db",
            "--out",
            "out",
            "-q",
        ]
        if sc.configured:
            cmd += [f"--{sc.kind}", str(limit)]
        with err_path.open("wb") as err:
            proc = subprocess.Popen(
                cmd, cwd=folder, env=env_without_api_keys(), stdout=subprocess.DEVNULL, stderr=err
            )
            try:
                # t = 0: the first request reaches the mock (the pipeline's start-up is not counted)
                launched = time.monotonic()
                while proc.poll() is None and mock_stats(base_url)["requests_total"] == 0:
                    if time.monotonic() - launched > 60:
                        raise RuntimeError("no request reached the mock within 60 s")
                    time.sleep(0.02)
                t0 = time.monotonic()
                if proc.poll() is None:
                    samples.append(_sample(base_url, 0.0))
                tick = t0
                while proc.poll() is None:
                    tick += 1.0
                    if tick > t0 + seconds:
                        break
                    time.sleep(max(0.0, tick - time.monotonic()))
                    samples.append(_sample(base_url, time.monotonic() - t0))
                if proc.poll() is not None:
                    problem = f"the pipeline exited {proc.returncode} before the end"
                else:
                    samples.append(_sample(base_url, time.monotonic() - t0))
                    proc.send_signal(signal.SIGINT)
                exit_code = proc.wait(timeout=120)
            except BaseException:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                raise
        if samples:
            after_stop = _sample(base_url, 0.0).ok - samples[-1].ok
    db = _db_figures(folder / "p.db")
    if problem is None and exit_code not in (0, 1, 130):
        problem = f"the pipeline exited {exit_code}"
    if problem is None and db.get("pending", 0) == 0:
        problem = "the input ran out: the run was not limited by the server"
    if problem is None and (not samples or samples[-1].ok == 0):
        problem = "nothing was answered"
    if problem is not None:
        tail = err_path.read_text(errors="replace").strip().splitlines()[-5:]
        problem += (": " + " | ".join(tail)) if tail else ""
    return Result(sc, limit, warmup, samples, exit_code, after_stop, db, problem)


# --------------------------------------------------------------------------- report


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def print_table(results: list[Result]) -> None:
    header = [
        "scenario",
        "limit",
        "configured",
        "achieved/min",
        "share",
        "429 run",
        "429 >warm",
        "targets",
        "ok",
    ]
    rows = []
    for r in results:
        sc = r.scenario
        where = "run" if sc.configured else "after warm-up"
        rows.append(
            [
                sc.name,
                f"{r.limit:,} {sc.kind}",
                f"--{sc.kind}" if sc.configured else "no",
                f"{r.achieved:,.0f}",
                _pct(r.share),
                _pct(r.share_429(0.0)),
                _pct(r.share_429(r.warmup)),
                f">={sc.share_target:.0%}, 429<={sc.max_429:.0%} {where}",
                "yes" if r.ok else "NO",
            ]
        )
    print(render(header, rows, left={0, 7}))


def print_details(results: list[Result], width: float) -> None:
    for r in results:
        sc = r.scenario
        db = r.db
        print(
            f"\n{sc.name}: exit {r.exit_code}; answered 200 after the SIGINT (not counted) "
            f"{r.after_stop}; requests succeeded {db.get('succeeded', 0):,}, failed "
            f"{db.get('failed', 0):,}, still pending {db.get('pending', 0):,}; tokens the mock "
            f"counted per answered request {db.get('mock_tokens_min')}-{db.get('mock_tokens_max')} "
            f"(completion {db.get('completion_min')}-{db.get('completion_max')})"
        )
        if r.problem:
            print(f"  PROBLEM: {r.problem}")
        per_min = 60.0 / width
        parts = [
            f"{start:>3.0f}s {sent * per_min:,.0f}/{ok * per_min:,.0f}/{lim * per_min:,.0f}"
            for start, sent, ok, lim in r.slices(width)
        ]
        print(f"  per {width:g} s, as requests/min sent/200/429: " + "; ".join(parts))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--short", action="store_true", help="R = 600, 20 s per scenario")
    parser.add_argument("--minutes", type=float, help="run time per scenario (default 2)")
    parser.add_argument("--rpm", type=int, help="R, the mock's requests/min (default 1,200)")
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--warmup", type=float, help="seconds left out of the steady state")
    parser.add_argument("--only", type=int, action="append", choices=[1, 2, 3, 4], help="scenario")
    parser.add_argument("--series", type=Path, help="write the per-second samples here (JSON)")
    parser.add_argument("--keep", type=Path, help="work in this new folder and keep it (databases)")
    args = parser.parse_args()
    seconds = 60.0 * args.minutes if args.minutes else (20.0 if args.short else 120.0)
    rpm = args.rpm or (600 if args.short else 1200)
    warmup = args.warmup if args.warmup is not None else (5.0 if args.short else 15.0)
    warmup = min(warmup, seconds / 2)
    scenarios = [s for s in SCENARIOS if not args.only or s.no in args.only]

    print(
        f"R = {rpm:,} requests/min, T = {rpm * TOKENS_PER_REQUEST:,} tokens/min "
        f"({TOKENS_PER_REQUEST} tokens a request as the mock counts them: "
        f"{(PROMPT_CHARS + 3) // 4 + 3} prompt + max_tokens {MAX_TOKENS}; the pipeline reserves "
        f"{pipeline_reserve()} before sending); latency {args.latency_ms:g} ms; concurrency "
        f"{args.concurrency}; {seconds:g} s per scenario, steady state from {warmup:g} s; "
        f"{os.cpu_count()} cores, pipeline on core 0, mock on core 1"
        + f"; {load_average('load unknown')}; {dt.date.today()}",
        flush=True,
    )
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="pipeline-ratelimit-") as tmp:
        workdir = args.keep or Path(tmp)
        for sc in scenarios:
            results.append(
                run_scenario(
                    sc,
                    rpm=rpm,
                    seconds=seconds,
                    warmup=warmup,
                    latency_ms=args.latency_ms,
                    concurrency=args.concurrency,
                    workdir=workdir,
                )
            )
            print(f"  done {sc.name}", file=sys.stderr, flush=True)
    print()
    print_table(results)
    print_details(results, 15.0 if seconds >= 60 else 5.0)
    print(f"\nafter: {load_average('load unknown')}")
    if args.series:
        args.series.write_bytes(
            orjson.dumps(
                {r.scenario.name: [[s.t, s.total, s.ok, s.limited] for s in r.samples] for r in results}
            )
        )
    return 0 if all(r.problem is None for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
