"""Memory and time of `pipeline estimate` and `pipeline run` at 100,000 and 1,000,000 rows.

Rows are streamed everywhere, so memory should stay flat whatever the input's size. This
benchmark generates, in a temp folder and without building them in memory:

* ``requests-N.jsonl``: plain requests (``{"custom_id", "messages", "max_tokens"}``), and
* ``records-N.parquet``: data records (``id`` string, ``text`` ~150 characters, ``stars`` and
  ``category`` ints) for a template job (``job-N.toml``: one user message with placeholders).

Then each measured thing runs in its own subprocess (pinned to core 0 when possible), whose wall
time is measured and whose peak RSS is ``ru_maxrss`` from ``os.wait4``:

* ``baseline ...``: a bare Python process that streams the same Parquet file with pyarrow
  ``iter_batches`` and sums a column (or reads the JSONL file line by line with orjson), and
  one that only imports the pipeline's modules: memory figures are read against these;
* ``estimate jsonl`` and ``estimate parquet+template``: ``python -m pipeline estimate``;
* ``run parquet+template``: ``python -m pipeline run job-N.toml`` against the mock server at zero
  latency (its own process, pinned to core 1), 64 concurrent: the whole job, from loading the
  input into SQLite to the final results.parquet. A run still sending after ``--cap-s``
  seconds of sending gets SIGINT (the graceful stop: in-flight requests finish, results are
  written, exit 130) and is reported as capped, with its rate and the time the whole run
  would take at that rate.

Columns: ``peak RSS MB``; ``over imports``: peak RSS above that of a process that only imports
the pipeline's modules (the part that depends on the data); ``growth`` from the smallest to the
largest size of the same thing, in %; ``vs baseline``: peak RSS over that of the streaming
baseline of the same file. A second
table gives the runs' phases: loading (until "loaded N requests"), sending, the RSS sampled at
each phase's end and the highest sampled while sending.

    python bench/memory.py                          # 100,000 and 1,000,000 rows, ~15 minutes
    python bench/memory.py --rows 100000            # one size
    python bench/memory.py --short                  # 2,000 and 20,000 rows, ~25 seconds

Figures are printed, never asserted; the exit status is non-zero only when the harness breaks.
Targets: peak RSS <= 300 MB for the 1M-row run, < 20% growth from 100k to 1M, and `estimate`
on 1M rows bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import common
import orjson
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

GEN_BATCH: Final = 50_000
CONCURRENCY: Final = 64
WORDS: Final = tuple(
    " ".join(
        (
            "the order arrived late and the box was damaged but the product itself works well",
            "great value fast shipping poor packaging excellent quality would buy again never",
            "broken after two days customer service helpful slow refund colour not as pictured",
        )
    ).split(" ")
)

BASELINE_PARQUET: Final = """
import sys, pyarrow.parquet as pq
total = rows = 0
for batch in pq.ParquetFile(sys.argv[1]).iter_batches(batch_size=2048):
    total += sum(batch.column("stars").to_pylist())
    rows += batch.num_rows
print(rows, total)
"""
BASELINE_JSONL: Final = """
import sys, orjson
rows = chars = 0
with open(sys.argv[1], "rb") as f:
    for line in f:
        chars += len(orjson.loads(line)["messages"][0]["content"])
        rows += 1
print(rows, chars)
"""
IMPORTS_ONLY: Final = "import pipeline.cli, pipeline.run, pipeline.reports, pipeline.inputs"


@dataclass
class Measure:
    what: str
    rows: int | None
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    exit_code: int = 0
    baseline: str | None = None  # the "what" of the baseline for the same rows
    note: str = ""
    # runs only
    answered: int = 0
    load_s: float | None = None
    send_s: float | None = None
    rss_loaded_mb: float | None = None
    rss_sending_max_mb: float | None = None
    rss_end_mb: float | None = None
    capped: bool = False
    stderr_tail: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- generating inputs


def _texts(rng: random.Random, n: int) -> list[str]:
    return [" ".join(rng.choices(WORDS, k=rng.randint(18, 34))) for _ in range(n)]


def write_jsonl(path: Path, n: int) -> None:
    rng = random.Random(1)
    with path.open("wb") as f:
        for start in range(0, n, GEN_BATCH):
            texts = _texts(rng, min(GEN_BATCH, n - start))
            f.write(
                b"".join(
                    orjson.dumps(
                        {
                            "custom_id": f"q{start + k:08d}",
                            "messages": [{"role": "user", "content": f"Label this review: {t}"}],
                            "max_tokens": 16,
                        }
                    )
                    + b"\n"
                    for k, t in enumerate(texts)
                )
            )


def write_parquet(path: Path, n: int) -> None:
    rng = random.Random(2)
    schema = pa.schema(
        [("id", pa.string()), ("text", pa.string()), ("stars", pa.int8()), ("category", pa.int32())]
    )
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for start in range(0, n, GEN_BATCH):
            m = min(GEN_BATCH, n - start)
            writer.write_table(
                pa.table(
                    {
                        "id": [f"rec{start + k:08d}" for k in range(m)],
                        "text": _texts(rng, m),
                        "stars": [rng.randint(1, 5) for _ in range(m)],
                        "category": [rng.randint(0, 40) for _ in range(m)],
                    },
                    schema=schema,
                )
            )


def write_spec(path: Path, parquet: Path, base_url: str) -> None:
    path.write_text(
        f"""job = "memory"
model = "mock-small"
on_bad_row = "stop"

[input]
path = "{parquet.name}"
id_column = "id"

[template]
messages = [
  {{ role = "system", content = "You label product reviews." }},
  {{ role = "user", content = "Stars: {{stars}}; category {{category}}.\\nReview: {{text}}" }},
]

[request]
max_tokens = 16
temperature = 0

[endpoints.default]
base_url = "{base_url}"

[limits]
concurrency = {CONCURRENCY}

[prices.mock-small]
input = 0.15
output = 0.60
"""
    )


# --------------------------------------------------------------------------- processes


def rss_mb(ps: psutil.Process) -> float | None:
    try:
        return float(ps.memory_info().rss) / 2**20
    except psutil.Error:
        return None


def measure(
    what: str,
    cmd: list[str],
    *,
    rows: int | None,
    cwd: Path,
    baseline: str | None = None,
    cap_s: float | None = None,
    server: str | None = None,
    progress_s: float = 15.0,
) -> Measure:
    """Run ``cmd`` to its end; wall time, peak RSS (wait4), and for runs their phases.

    ``server``: the mock server's base URL, to show how many it has answered in progress lines.
    """
    m = Measure(what, rows, baseline=baseline)
    t0 = time.perf_counter()
    child = common.spawn(
        cmd, 0, cwd=cwd, env=common.env_without_api_keys(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    proc = child.launcher
    ps = psutil.Process(child.pid)
    marks: dict[str, float] = {}

    def on_stderr_line(line: str) -> None:
        now = time.perf_counter()
        if "loaded" not in marks and re.search(r"run \S+: loaded \d+ requests", line):
            marks["loaded"] = now
            m.rss_loaded_mb = rss_mb(ps)
        if "sending" not in marks and re.search(r"run \S+: \d+ requests to send", line):
            marks["sending"] = now

    output = common.ChildOutput(proc, on_stderr_line)
    next_report = t0 + progress_s
    stopped_at: float | None = None
    while True:
        if proc.poll() is not None:
            break
        now = time.perf_counter()
        if "sending" in marks:
            rss = rss_mb(ps)
            if rss is not None:
                m.rss_sending_max_mb = max(m.rss_sending_max_mb or 0.0, rss)
            if cap_s is not None and stopped_at is None and now - marks["sending"] > cap_s:
                stopped_at = now
                m.capped = True
                m.rss_end_mb = rss
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGINT)
        if now >= next_report:
            next_report += progress_s
            done = common.answered(server) if server is not None else None
            phase = "sending" if "sending" in marks else ("loading" if "loaded" not in marks else "starting")
            rss = rss_mb(ps)
            print(
                f"    {what} {rows or 0:,}: {now - t0:5.0f} s, {phase}"
                + (f", {done:,} answered" if done is not None and "sending" in marks else "")
                + (f", RSS {rss:.0f} MB" if rss is not None else ""),
                file=sys.stderr,
                flush=True,
            )
        time.sleep(0.1)
    m.exit_code, m.peak_rss_mb, _ = common.reap(child)
    t_end = time.perf_counter()
    output.join()
    m.seconds = t_end - t0
    m.stderr_tail = output.tail()
    if "loaded" in marks:
        m.load_s = marks["loaded"] - t0
    if "sending" in marks:
        m.send_s = (stopped_at or t_end) - marks["sending"]
        m.answered = output.succeeded()
    return m


# --------------------------------------------------------------------------- reporting


def _mb(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def table(results: Sequence[Measure]) -> str:
    by_key = {(r.what, r.rows): r for r in results}
    sizes: dict[str, list[Measure]] = {}
    for r in results:
        if r.rows is not None:
            sizes.setdefault(r.what, []).append(r)
    header = ("what", "rows", "seconds", "peak RSS MB", "over imports MB", "growth", "vs baseline", "note")
    imports = by_key.get(("baseline: imports only", None))
    rows = []
    for r in results:
        same = sorted(sizes.get(r.what, []), key=lambda x: x.rows or 0)
        growth = "-"
        if len(same) >= 2 and r is same[-1] and same[0].peak_rss_mb:
            first = same[0]
            growth = f"{(r.peak_rss_mb / first.peak_rss_mb - 1) * 100:+.0f}% from {first.rows:,}"
        base = by_key.get((r.baseline, r.rows)) if r.baseline else None
        vs = f"{r.peak_rss_mb / base.peak_rss_mb:.2f}x" if base and base.peak_rss_mb else "-"
        note = r.note
        if r.answered and r.send_s:
            rate = r.answered / r.send_s
            note = f"{r.answered:,} answered, {rate:,.0f} req/s while sending" + (f"; {note}" if note else "")
            if r.capped and r.rows:
                note += f"; capped: all {r.rows:,} would take ~{(r.load_s or 0) + r.rows / rate:,.0f} s"
        if r.exit_code not in (0, 130 if r.capped else 0):
            note = f"exit {r.exit_code}" + (f"; {note}" if note else "")
        rows.append(
            (
                r.what,
                "-" if r.rows is None else f"{r.rows:,}",
                f"{r.seconds:,.1f}",
                _mb(r.peak_rss_mb),
                _mb(r.peak_rss_mb - imports.peak_rss_mb)
                if imports and r.what.startswith(("estimate", "run"))
                else "-",
                growth,
                vs,
                note,
            )
        )
    return common.render(header, rows, left={0, 7})


def phases(results: Sequence[Measure]) -> str:
    header = (
        "run",
        "rows",
        "load s",
        "RSS after load MB",
        "send s",
        "answered",
        "req/s",
        "max RSS sending MB",
        "peak RSS MB",
    )
    rows = []
    for r in results:
        if r.send_s is None:
            continue
        rows.append(
            (
                r.what,
                f"{r.rows:,}" if r.rows else "-",
                f"{r.load_s:.1f}" if r.load_s is not None else "-",
                _mb(r.rss_loaded_mb),
                f"{r.send_s:.1f}" + (" (capped)" if r.capped else ""),
                f"{r.answered:,}",
                f"{r.answered / r.send_s:,.0f}" if r.send_s else "-",
                _mb(r.rss_sending_max_mb),
                _mb(r.peak_rss_mb),
            )
        )
    return common.render(header, rows, left={0})


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="2,000 and 20,000 rows, about 25 s")
    parser.add_argument("--rows", help="comma-separated sizes (default 100000,1000000)")
    parser.add_argument(
        "--cap-s",
        type=float,
        default=None,
        help="stop a run (SIGINT) after this many seconds of sending (default 480; short 6)",
    )
    parser.add_argument("--no-run", action="store_true", help="skip the `pipeline run` measurements")
    args = parser.parse_args(argv)
    if args.rows:
        sizes = sorted(int(x.replace("_", "")) for x in args.rows.split(","))
    else:
        sizes = [2_000, 20_000] if args.short else [100_000, 1_000_000]
    cap_s = args.cap_s if args.cap_s is not None else (6.0 if args.short else 480.0)
    progress_s = 5.0 if args.short else 20.0
    py = sys.executable
    load = common.load_average()
    print(
        f"python {platform.python_version()}, pyarrow {pa.__version__}; {os.cpu_count()} cores "
        f"(measured process on core 0, mock server on core 1); {load}",
        flush=True,
    )
    results: list[Measure] = []
    started = time.perf_counter()

    def note(text: str) -> None:
        print(f"  [{time.perf_counter() - started:5.0f} s] {text}", file=sys.stderr, flush=True)

    try:
        with (
            tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp,
            common.mock_server(common.mock_server_command()) as base_url,
        ):
            folder = Path(tmp)
            for n in sizes:
                note(f"generating {n:,} rows")
                write_jsonl(folder / f"requests-{n}.jsonl", n)
                write_parquet(folder / f"records-{n}.parquet", n)
                write_spec(folder / f"job-{n}.toml", folder / f"records-{n}.parquet", base_url)
            results.append(measure("baseline: imports only", [py, "-c", IMPORTS_ONLY], rows=None, cwd=folder))
            for n in sizes:
                jsonl, parquet, spec = (
                    folder / f"requests-{n}.jsonl",
                    folder / f"records-{n}.parquet",
                    folder / f"job-{n}.toml",
                )
                note(f"baselines and estimates, {n:,} rows")
                results.append(
                    measure(
                        "baseline: jsonl lines", [py, "-c", BASELINE_JSONL, str(jsonl)], rows=n, cwd=folder
                    )
                )
                results.append(
                    measure(
                        "baseline: parquet iter_batches",
                        [py, "-c", BASELINE_PARQUET, str(parquet)],
                        rows=n,
                        cwd=folder,
                    )
                )
                estimate_jsonl = [py, "-m", "pipeline", "estimate", "--input", str(jsonl)]
                estimate_jsonl += ["--model", "mock-small", "--base-url", base_url]
                results.append(
                    measure(
                        "estimate jsonl", estimate_jsonl, rows=n, cwd=folder, baseline="baseline: jsonl lines"
                    )
                )
                results.append(
                    measure(
                        "estimate parquet+template",
                        [py, "-m", "pipeline", "estimate", str(spec)],
                        rows=n,
                        cwd=folder,
                        baseline="baseline: parquet iter_batches",
                    )
                )
            if not args.no_run:
                for n in sizes:
                    note(f"pipeline run, {n:,} rows (cap {cap_s:g} s of sending)")
                    run_dir = folder / f"run-{n}"
                    run_dir.mkdir()
                    cmd = [py, "-m", "pipeline", "run", str(folder / f"job-{n}.toml"), "--db", "p.db"]
                    cmd += ["--out", "out", "-q"]
                    r = measure(
                        "run parquet+template",
                        cmd,
                        rows=n,
                        cwd=run_dir,
                        baseline="baseline: parquet iter_batches",
                        cap_s=cap_s,
                        server=base_url,
                        progress_s=progress_s,
                    )
                    results.append(r)
                    note(f"  exit {r.exit_code}, {r.seconds:.0f} s, peak RSS {r.peak_rss_mb:.0f} MB")
                    shutil.rmtree(run_dir, ignore_errors=True)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    order = [
        "baseline: imports only",
        "baseline: jsonl lines",
        "baseline: parquet iter_batches",
        "estimate jsonl",
        "estimate parquet+template",
        "run parquet+template",
    ]
    results.sort(key=lambda r: (order.index(r.what), r.rows or 0))
    print(table(results))
    if any(r.send_s is not None for r in results):
        print()
        print(phases(results))
    print(f"after: {common.load_average()}; total {time.perf_counter() - started:.0f} s")
    broken = [
        f"{r.what} {r.rows}: exit {r.exit_code}\n    " + "\n    ".join(r.stderr_tail)
        for r in results
        if r.exit_code != 0 and not (r.capped and r.exit_code == 130)
    ]
    for b in broken:
        print(f"harness: {b}", file=sys.stderr)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
