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
import json
import os
import platform
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

import orjson
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

GEN_BATCH: Final = 50_000
CONCURRENCY: Final = 64
SERVER_START_S: Final = 20.0
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


def pin_prefix(core: int) -> list[str]:
    taskset = shutil.which("taskset")
    return [taskset, "-c", str(core)] if taskset and (os.cpu_count() or 1) >= 2 else []


# A process's ru_maxrss starts at the RSS of the process that spawned it (Linux keeps the old
# memory's high-water mark across exec), so a measured command is started by this tiny launcher
# (python -S, ~8 MB) rather than by this benchmark: it forks the command, tells its pid, waits
# for it and reports its exit status, peak RSS and CPU times from os.wait4.
LAUNCHER: Final = r"""
import os, signal, sys
fd = int(sys.argv[1])
pid = os.fork()
if pid == 0:
    os.close(fd)
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
signal.signal(signal.SIGINT, signal.SIG_IGN)
os.write(fd, b"%d\n" % pid)
_, status, ru = os.wait4(pid, 0)
code = os.waitstatus_to_exitcode(status)
os.write(fd, b"%d %d %r %r\n" % (code, ru.ru_maxrss, ru.ru_utime, ru.ru_stime))
"""


@dataclass
class Child:
    """A measured command, started through :data:`LAUNCHER`."""

    launcher: subprocess.Popen[bytes]
    pid: int
    report: IO[bytes]


def spawn(cmd: list[str], core: int | None, **popen: Any) -> Child:
    """Start ``cmd`` (pinned to ``core``) through the launcher; its stdio is as ``popen`` says."""
    r, w = os.pipe()
    pin = pin_prefix(core) if core is not None else []
    try:
        launcher = subprocess.Popen(
            [*pin, sys.executable, "-S", "-c", LAUNCHER, str(w), *cmd], pass_fds=(w,), **popen
        )
    finally:
        os.close(w)
    report = os.fdopen(r, "rb")
    line = report.readline()
    if not line:
        report.close()
        launcher.wait()
        raise RuntimeError(f"could not start {cmd!r}")
    return Child(launcher, int(line), report)


def reap(child: Child) -> tuple[int, float, float]:
    """Wait for the command: (exit code, peak RSS in MB, user+sys CPU seconds)."""
    line = child.report.readline()
    child.report.close()
    child.launcher.wait()
    if not line:
        raise RuntimeError(f"the launcher of pid {child.pid} died (exit {child.launcher.returncode})")
    code, maxrss_kib, utime, stime = line.split()
    return int(code), int(maxrss_kib) / 1024.0, float(utime) + float(stime)


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
    stats_url: str | None = None,
    progress_s: float = 15.0,
) -> Measure:
    """Run ``cmd`` to its end; wall time, peak RSS (wait4), and for runs their phases."""
    m = Measure(what, rows, baseline=baseline)
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    t0 = time.perf_counter()
    child = spawn(cmd, 0, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc = child.launcher
    ps = psutil.Process(child.pid)
    marks: dict[str, float] = {}
    lines: list[str] = []
    out: list[bytes] = []

    def read_stderr() -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            lines.append(line)
            now = time.perf_counter()
            if "loaded" not in marks and re.search(r"run \S+: loaded \d+ requests", line):
                marks["loaded"] = now
                m.rss_loaded_mb = rss_mb(ps)
            if "sending" not in marks and re.search(r"run \S+: \d+ requests to send", line):
                marks["sending"] = now

    def read_stdout() -> None:
        assert proc.stdout is not None
        out.append(proc.stdout.read())

    threads = [
        threading.Thread(target=read_stderr, daemon=True),
        threading.Thread(target=read_stdout, daemon=True),
    ]
    for t in threads:
        t.start()
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
            done = _answered(stats_url)
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
    m.exit_code, m.peak_rss_mb, _ = reap(child)
    t_end = time.perf_counter()
    for t in threads:
        t.join(5)
    stdout = b"".join(out).decode(errors="replace")
    m.seconds = t_end - t0
    m.stderr_tail = (lines + stdout.splitlines())[-8:]
    if "loaded" in marks:
        m.load_s = marks["loaded"] - t0
    if "sending" in marks:
        m.send_s = (stopped_at or t_end) - marks["sending"]
        match = re.search(r"; (\d+) succeeded", stdout)
        m.answered = int(match.group(1)) if match else 0
    return m


def _answered(stats_url: str | None) -> int | None:
    if stats_url is None:
        return None
    try:
        with urllib.request.urlopen(stats_url, timeout=5) as response:
            return int(json.loads(response.read())["completions"])
    except (OSError, ValueError, KeyError):
        return None


def _announcement(process: subprocess.Popen[bytes]) -> str | None:
    assert process.stdout is not None
    fd, buffer = process.stdout.fileno(), b""
    deadline = time.monotonic() + SERVER_START_S
    while b"\n" not in buffer and time.monotonic() < deadline:
        readable, _, _ = select.select([fd], [], [], 0.5)
        if readable:
            chunk = os.read(fd, 4096)
            if not chunk:
                return None
            buffer += chunk
        elif process.poll() is not None:
            return None
    line = buffer.split(b"\n", 1)[0].decode(errors="replace").strip()
    prefix = "mock server listening on "
    return line[len(prefix) :] if line.startswith(prefix) else None


@contextlib.contextmanager
def mock_server() -> Iterator[str]:
    """``pipeline mock-server`` (zero latency) pinned to core 1; yields its base URL (…/v1)."""
    cmd = [sys.executable, "-m", "pipeline", "mock-server", "--port", "0"]
    with tempfile.TemporaryFile() as err:
        process = subprocess.Popen([*pin_prefix(1), *cmd], stdout=subprocess.PIPE, stderr=err)
        try:
            base = _announcement(process)
            if base is None:
                err.seek(0)
                raise RuntimeError(f"the mock server did not start: {err.read().decode(errors='replace')}")
            yield base
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            if process.stdout is not None:
                process.stdout.close()


# --------------------------------------------------------------------------- reporting


def render(header: Sequence[str], rows: Sequence[Sequence[str]], left: set[int]) -> str:
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        cells = (
            c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        return "  ".join(cells).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


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
    return render(header, rows, left={0, 7})


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
    return render(header, rows, left={0})


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
    load = f"load average {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
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
        with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp, mock_server() as base_url:
            folder = Path(tmp)
            stats_url = base_url.removesuffix("/v1") + "/mock/stats"
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
                        stats_url=stats_url,
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
    print(f"after: load average {os.getloadavg()[0]:.2f}; total {time.perf_counter() - started:.0f} s")
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
