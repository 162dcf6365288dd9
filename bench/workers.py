"""Workers on PostgreSQL: one rate limit shared by several processes, and what sharing costs.

Issue 10, "Beyond one machine". Each part works on its own fresh PostgreSQL database (created
on the server of ``--admin-dsn``, dropped at the end), with real processes: ``pipeline submit
SPEC --db URL``, then ``pipeline worker --db URL --run RUN -q``.

1. **Shared rate limit.** The mock server runs in this process (a thread) with ``rpm = R``: a
   real sliding 60 s window, 429 over it. Every request reaching the window is time-stamped
   there (a wrapper around the window's ``admit``), so the counts are the server's own. The
   spec sets ``[limits] rpm = R`` (concurrency default, 64 per worker); W workers share the
   run. Figures: requests answered; answered exactly once in the database (every request
   ``succeeded`` with ``attempts`` 1) and in Parquet (``results.parquet``, written by the
   worker that finds the run done, has every id once, and no worker's part file is left);
   429s the server gave; the most requests the server saw in any 60 s (all arrivals, refused
   ones too); the rate reached, requests/min from the first request to the last, and its
   ratio to R (target >= 0.9); each worker's share (``recorded`` in the ``worker`` table).
2. **Overhead of the coordination.** The mock server in its own process (``pipeline
   mock-server``, 0 ms latency, no limit) pinned to core 1; the same job sent by ONE worker
   process pinned to core 0, (a) with no rpm limit and (b) with ``rpm = 600,000``, which
   hardly paces at all but makes every request go through the database-booked
   ``SharedBucket``; (c) as a reference, the single-process ``pipeline run SPEC --db
   file.db`` on SQLite, no limit. Three rounds (``--rounds``), the order rotated; medians and
   ranges shown. As in ``throughput.py``, a run's clock starts at its own
   log line "N requests to send" (start-up, and for (c) loading the input, not counted) and
   stops at its exit (the final results.parquet counted); ``CPU ms/req`` is its user+sys CPU
   over that span (psutil at the line, ``os.wait4`` at the exit). Database work: the
   database's committed transactions (``pg_stat_database.xact_commit``) from after the submit
   to after the worker's exit, per request, for the whole run (leases, recording,
   heartbeats, rate slots, news); and the updates of the ``rate_slot`` table
   (``pg_stat_user_tables.n_tup_upd``): one per booking (``Store.take_rate_slots``) plus one
   per news exchange (``Store.rate_news``, about once a second), each its own transaction of
   two statements. ``pg_stat_statements`` would split them, but it needs the server to
   preload it, which these machines' server does not.

    python bench/workers.py            # 4 workers, 4,000 req, R = 3,000; 5,000 req x 3 rounds; ~2.7 min
    python bench/workers.py --short    # 2 workers, 200 req, R = 6,000; 500 req, 1 round; ~30 s

Figures are printed, never asserted. The exit status is non-zero only if the harness broke:
PostgreSQL cannot be reached (exit 2), the mock server does not start, a command fails or
nothing is answered (exit 1).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import common
import orjson
import psutil

START_LINE: Final = re.compile(r"run \S+: (\d+) requests to send")
ADMIN_DSN: Final = "postgresql://postgres@127.0.0.1:5432/test"
OVERHEAD_RPM: Final = 600_000
WINDOW_S: Final = 60.0
TIMEOUT_S: Final = 600.0  # a worker still running after this is killed: the harness broke


# --------------------------------------------------------------------------- PostgreSQL


def pg_query(dsn: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Run one statement on its own connection; the rows as tuples."""
    import asyncpg

    async def go() -> list[tuple[Any, ...]]:
        conn = await asyncpg.connect(dsn, timeout=5)
        try:
            return [tuple(r) for r in await conn.fetch(sql, *params)]
        finally:
            await conn.close()

    return asyncio.run(go())


def pg_reachable(admin_dsn: str) -> str | None:
    """None if the server answers, else why not."""
    try:
        pg_query(admin_dsn, "SELECT 1")
    except Exception as exc:  # asyncpg raises its own errors and OSError alike
        return f"{type(exc).__name__}: {exc}"
    return None


@dataclass(frozen=True)
class Database:
    name: str
    dsn: str  # for asyncpg
    url: str  # for the pipeline


@contextlib.contextmanager
def fresh_database(admin_dsn: str, label: str) -> Iterator[Database]:
    """A new, empty database on the admin DSN's server; dropped afterwards."""
    name = f"bench_workers_{label}_{uuid.uuid4().hex[:8]}"
    base = admin_dsn.rsplit("/", 1)[0]
    pg_query(admin_dsn, f"CREATE DATABASE {name}")
    try:
        yield Database(
            name, f"{base}/{name}", f"{base.replace('postgresql://', 'postgresql+asyncpg://')}/{name}"
        )
    finally:
        with contextlib.suppress(Exception):
            pg_query(admin_dsn, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def xact_commit(admin_dsn: str, db: Database) -> int:
    """The database's committed transactions so far, read from the admin database (so the
    reading is not one of them). A backend reports its statistics at most once a second while
    it lives, and at its exit: this waits until two readings half a second apart agree, at
    most 5 s."""

    def read() -> int:
        sql = "SELECT xact_commit FROM pg_stat_database WHERE datname = $1"
        rows = pg_query(admin_dsn, sql, db.name)
        return int(rows[0][0] or 0) if rows else 0

    last = read()
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = read()
        if now == last:
            break
        last = now
    return last


def rate_slot_updates(db: Database) -> int:
    """Row updates of the rate_slot table so far (read in the database itself)."""
    sql = "SELECT COALESCE(SUM(n_tup_upd), 0) FROM pg_stat_user_tables WHERE relname = 'rate_slot'"
    return int(pg_query(db.dsn, sql)[0][0])


# --------------------------------------------------------------------------- the job


def write_job(folder: Path, name: str, base_url: str, rows: int, rpm: int | None) -> Path:
    """``rows`` small chat requests and a spec naming the job ``name``; returns the spec."""
    lines = [
        orjson.dumps(
            {
                "custom_id": f"r{i:06d}",
                "messages": [{"role": "user", "content": f"Question number {i}: say hello."}],
                "max_tokens": 16,
            }
        )
        for i in range(rows)
    ]
    (folder / f"{name}.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    limits = f"[limits]\nrpm = {rpm}\n" if rpm else ""
    spec = folder / f"{name}.toml"
    spec.write_text(
        f'job = "{name}"\nmodel = "mock-small"\n[input]\npath = "{name}.jsonl"\n'
        f'[endpoints.default]\nbase_url = "{base_url}"\n{limits}'
    )
    return spec


def pipeline_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", *args]


def submit(folder: Path, spec: Path, db: Database) -> str | None:
    """``pipeline submit``; None if it worked, else what it said."""
    proc = subprocess.run(
        pipeline_cmd("submit", spec.name, "--db", db.url),
        cwd=folder,
        env=common.env_without_api_keys(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode != 0:
        return f"submit exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-300:]}"
    return None


@dataclass
class Measured:
    """One measured pipeline process (started through common.LAUNCHER)."""

    exit_code: int | None = None
    cpu_total_s: float = 0.0
    cpu_s: float | None = None  # from its "N requests to send" line to its exit
    wall_s: float | None = None  # the same span
    tail: list[str] = field(default_factory=list)

    def problem(self, what: str) -> str | None:
        if self.exit_code != 0:
            return f"{what} exited {self.exit_code}: " + " | ".join(self.tail[-4:])
        if self.wall_s is None:
            return f"{what} never logged 'N requests to send'"
        return None


class Running:
    """A pipeline command running through the launcher, its stderr watched for the start line."""

    def __init__(self, cmd: list[str], folder: Path, core: int | None) -> None:
        self.result = Measured()
        self._marks: dict[str, float] = {}
        self.child = common.spawn(
            cmd,
            core,
            cwd=folder,
            env=common.env_without_api_keys(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self._ps = psutil.Process(self.child.pid)
        self._output = common.ChildOutput(self.child.launcher, self._on_line)
        self._timer = threading.Timer(TIMEOUT_S, self._kill)
        self._timer.start()

    def _on_line(self, line: str) -> None:
        if "start" not in self._marks and START_LINE.search(line):
            self._marks["start"] = time.perf_counter()
            with contextlib.suppress(psutil.Error):
                cpu = self._ps.cpu_times()
                self._marks["cpu"] = cpu.user + cpu.system

    def _kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.child.pid, 9)

    def wait(self) -> Measured:
        r = self.result
        try:
            r.exit_code, _, r.cpu_total_s = common.reap(self.child)
        finally:
            self._timer.cancel()
        end = time.perf_counter()
        self._output.join()
        r.tail = self._output.tail()
        if "start" in self._marks:
            r.wall_s = end - self._marks["start"]
            r.cpu_s = r.cpu_total_s - self._marks.get("cpu", 0.0)
        return r


# --------------------------------------------------------------------------- 1: shared rate limit


class Arrivals:
    """The in-process mock server's rate window, wrapped: the time of every request it judges."""

    def __init__(self, server: Any) -> None:
        self.times: list[float] = []
        window = getattr(getattr(server, "_state", None), "window", None)
        self.hooked = window is not None and hasattr(window, "admit")
        if self.hooked:
            admit = window.admit

            def counted(now: float, tokens: int, model: str) -> None:
                self.times.append(now)
                admit(now, tokens, model)

            window.admit = counted


def most_in_window(times: list[float], width: float = WINDOW_S) -> int:
    """The most time stamps in any window (t - width, t], as the mock's window counts."""
    times = sorted(times)
    best, i = 0, 0
    for j, t in enumerate(times):
        while times[i] <= t - width:
            i += 1
        best = max(best, j - i + 1)
    return best


@dataclass
class Shared:
    workers: int
    rows: int
    rpm: int
    latency_ms: float
    completions: int = 0
    requests_total: int = 0
    limited: int = 0
    db_states: dict[str, tuple[int, int]] = field(default_factory=dict)  # state -> (count, attempts)
    attempt_rows: tuple[int, int] = (0, 0)  # (attempts, distinct custom_ids)
    part_ids: tuple[int, int, int] = (0, 0, 0)  # results.parquet: (ids, distinct ids); part files left
    results_rows: int = 0
    most_60s: int = 0
    most_60s_source: str = ""
    rate_per_min: float = 0.0
    span_s: float = 0.0
    shares: list[int] = field(default_factory=list)
    worker_cpu_s: list[float] = field(default_factory=list)
    problem: str | None = None

    @property
    def once_db(self) -> bool:
        return self.db_states == {"succeeded": (self.rows, self.rows)} and self.attempt_rows == (
            self.rows,
            self.rows,
        )

    @property
    def once_parquet(self) -> bool:
        ids, distinct, parts_left = self.part_ids
        return ids == distinct == self.rows and self.results_rows == self.rows and parts_left == 0


def parquet_ids(out: Path) -> tuple[tuple[int, int, int], int]:
    import pyarrow.parquet as pq

    # Each worker writes its own part files while the run goes; the worker that finds the run
    # done writes results.parquet from the database and removes the parts.
    files = sorted((out / "parts").glob("*/*.parquet"))
    results = out / "results.parquet"
    if not results.exists():
        return (0, 0, len(files)), 0
    ids = pq.read_table(results, columns=["custom_id"]).column("custom_id").to_pylist()
    return (len(ids), len(set(ids)), len(files)), pq.read_metadata(results).num_rows


def run_shared(admin_dsn: str, workdir: Path, r: Shared) -> Shared:
    from pipeline.mock import MockConfig, MockServer

    folder = workdir / "shared"
    folder.mkdir()
    server = MockServer(MockConfig(rpm=r.rpm, latency_ms=r.latency_ms)).start()
    try:
        arrivals = Arrivals(server)
        with fresh_database(admin_dsn, "shared") as db:
            spec = write_job(folder, "shared", server.base_url, r.rows, r.rpm)
            r.problem = submit(folder, spec, db)
            if r.problem:
                return r
            running = [
                Running(pipeline_cmd("worker", "--db", db.url, "--run", "shared", "-q"), folder, None)
                for _ in range(r.workers)
            ]
            results = [w.wait() for w in running]
            r.worker_cpu_s = [m.cpu_total_s for m in results]
            r.problem = next((p for i, m in enumerate(results) if (p := m.problem(f"worker {i + 1}"))), None)
            stats = server.stats()
            r.completions, r.requests_total = stats.completions, stats.requests_total
            r.limited = stats.by_status.get(429, 0)
            r.db_states = {
                s: (int(n), int(a))
                for s, n, a in pg_query(
                    db.dsn, "SELECT state, COUNT(*), SUM(attempts) FROM request GROUP BY state"
                )
            }
            n, distinct = pg_query(db.dsn, "SELECT COUNT(*), COUNT(DISTINCT custom_id) FROM attempt")[0]
            r.attempt_rows = (int(n), int(distinct))
            r.shares = [
                int(x) for (x,) in pg_query(db.dsn, "SELECT recorded FROM worker ORDER BY started_at")
            ]
            if arrivals.hooked and arrivals.times:
                times = list(arrivals.times)
                r.most_60s_source = "server"
            else:  # the attempts' send times as the pipeline recorded them
                rows = pg_query(db.dsn, "SELECT EXTRACT(EPOCH FROM started_at) FROM attempt")
                times = [float(t) for (t,) in rows]
                r.most_60s_source = "database"
            if len(times) >= 2:
                r.most_60s = most_in_window(times)
                r.span_s = max(times) - min(times)
                r.rate_per_min = (len(times) - 1) / r.span_s * 60.0 if r.span_s > 0 else 0.0
        r.part_ids, r.results_rows = parquet_ids(folder / "out" / "shared" / "shared")
    finally:
        server.stop()
    if r.problem is None and r.completions == 0:
        r.problem = "nothing was answered"
    return r


# --------------------------------------------------------------------------- 2: overhead


@dataclass
class Variant:
    """One run of part 2: ``key`` says which setup (norpm, rpm, sqlite), ``label`` shows it."""

    key: str
    label: str
    rows: int
    measured: Measured = field(default_factory=Measured)
    answered: int = 0
    xacts: int | None = None
    rate_slot_updates: int | None = None
    problem: str | None = None

    @property
    def rps(self) -> float | None:
        m = self.measured
        return self.answered / m.wall_s if m.wall_s else None

    @property
    def cpu_ms(self) -> float | None:
        m = self.measured
        return m.cpu_s * 1000.0 / self.answered if m.cpu_s is not None and self.answered else None


def run_worker_variant(admin_dsn: str, workdir: Path, base_url: str, v: Variant, rpm: int | None) -> Variant:
    folder = workdir / v.key
    folder.mkdir()
    job = v.key.replace("-", "_")
    spec = write_job(folder, job, base_url, v.rows, rpm)
    with fresh_database(admin_dsn, job) as db:
        v.problem = submit(folder, spec, db)
        if v.problem:
            return v
        before = xact_commit(admin_dsn, db)
        cmd = pipeline_cmd("worker", "--db", db.url, "--run", job, "-q")
        v.measured = Running(cmd, folder, 0).wait()
        v.xacts = xact_commit(admin_dsn, db) - before
        v.rate_slot_updates = rate_slot_updates(db)  # none before: submit books nothing
        v.problem = v.measured.problem("the worker")
        v.answered = int(pg_query(db.dsn, "SELECT COUNT(*) FROM request WHERE state = 'succeeded'")[0][0])
    return v


def run_sqlite_variant(workdir: Path, base_url: str, v: Variant) -> Variant:
    folder = workdir / v.key
    folder.mkdir()
    spec = write_job(folder, v.key.replace("-", "_"), base_url, v.rows, None)
    v.measured = Running(pipeline_cmd("run", spec.name, "--db", "run.db", "-q"), folder, 0).wait()
    v.problem = v.measured.problem("pipeline run")
    import sqlite3

    with sqlite3.connect(folder / "run.db") as conn:
        v.answered = int(conn.execute("SELECT COUNT(*) FROM request WHERE state = 'succeeded'").fetchone()[0])
    return v


SETUPS: Final = (
    ("norpm", "1 worker, no rpm", None),
    ("rpm", f"1 worker, rpm {OVERHEAD_RPM:,}", OVERHEAD_RPM),
    ("sqlite", "pipeline run, SQLite", None),
)


def run_overhead(admin_dsn: str, workdir: Path, rows: int, rounds: int) -> list[Variant]:
    """Each setup once per round, the order rotated each round (each goes first once in 3)."""
    done: list[Variant] = []
    with common.mock_server(common.mock_server_command("--latency-ms", "0"), core=1) as base_url:
        for n in range(rounds):
            for key, label, rpm in SETUPS[n % 3 :] + SETUPS[: n % 3]:
                v = Variant(f"{key}-{n}", label, rows)
                t0 = time.monotonic()
                if key == "sqlite":
                    run_sqlite_variant(workdir, base_url, v)
                else:
                    run_worker_variant(admin_dsn, workdir, base_url, v, rpm)
                if v.problem is None and v.answered == 0:
                    v.problem = "nothing was answered"
                done.append(v)
                print(
                    f"  round {n + 1}: {label} ({time.monotonic() - t0:.1f} s)", file=sys.stderr, flush=True
                )
    return done


# --------------------------------------------------------------------------- report


def _n(x: float | None, fmt: str = ",.0f") -> str:
    return "-" if x is None else format(x, fmt)


def table(s: Shared | None, variants: list[Variant]) -> str:
    rows = shared_rows(s) if s is not None else []
    if variants:
        rows += overhead_rows(variants)
    return common.render(["part", "figure", "value", "how / target"], rows, left={0, 1, 3})


def shared_rows(s: Shared) -> list[list[str]]:
    one = f"1: {s.workers} workers, R = {s.rpm:,}/min"
    (ok_db_n, ok_db_a) = s.db_states.get("succeeded", (0, 0))
    ids, distinct, parts_left = s.part_ids
    other_states = ", ".join(f"{k} {v[0]:,}" for k, v in sorted(s.db_states.items()) if k != "succeeded")
    rows = [
        [
            one,
            "requests answered (server)",
            f"{s.completions:,}/{s.rows:,}",
            f"{s.requests_total:,} requests seen",
        ],
        [
            one,
            "answered exactly once: database",
            "yes" if s.once_db else "NO",
            f"{ok_db_n:,} succeeded, {ok_db_a:,} attempts, {s.attempt_rows[0]:,} attempt rows"
            + (f"; {other_states}" if other_states else ""),
        ],
        [
            one,
            "answered exactly once: Parquet",
            "yes" if s.once_parquet else "NO",
            f"results.parquet: {ids:,} ids, {distinct:,} distinct; {parts_left} worker part files left",
        ],
        [one, "429s from the server", f"{s.limited:,}", "target 0"],
        [
            one,
            "most requests in any 60 s",
            f"{s.most_60s:,}",
            f"from the {s.most_60s_source}'s arrival times; limit {s.rpm:,}",
        ],
        [
            one,
            "rate reached (first to last request)",
            f"{s.rate_per_min:,.0f}/min",
            f"{s.requests_total:,} requests in {s.span_s:.1f} s",
        ],
        [one, "ratio to R", f"{s.rate_per_min / s.rpm:.2f}x", "target >= 0.9"],
        [
            one,
            "per-worker share (recorded)",
            " / ".join(f"{x:,}" for x in s.shares),
            "worker CPU s: " + " / ".join(f"{c:.1f}" for c in s.worker_cpu_s),
        ],
    ]
    return rows


def _median(xs: list[float | None]) -> float | None:
    known = [x for x in xs if x is not None]
    return statistics.median(known) if known else None


def _spread(xs: list[float | None], fmt: str) -> str:
    known = [x for x in xs if x is not None]
    return f"{format(min(known), fmt)}-{format(max(known), fmt)}" if len(known) > 1 else ""


def overhead_rows(variants: list[Variant]) -> list[list[str]]:
    rows: list[list[str]] = []
    rounds = len(variants) // len(SETUPS)
    two = f"2: 1 worker, 0 ms, {variants[0].rows:,} req"
    runs = {key: [v for v in variants if v.key.split("-")[0] == key] for key, _, _ in SETUPS}
    base = _median([v.rps for v in runs["norpm"]])
    of = f"median of {rounds}" if rounds > 1 else "1 round"
    for key, label, _ in SETUPS:
        vs = runs[key]
        rps = _median([v.rps for v in vs])
        ratio = f"{rps / base:.2f}x no rpm" if rps and base else "-"
        spread = _spread([v.rps for v in vs], ",.0f")
        rows.append([two, f"{label}: req/s", _n(rps), f"{ratio}; {of}" + (f", {spread}" if spread else "")])
        cpu = [v.cpu_ms for v in vs]
        spread = _spread(cpu, ".2f")
        rows.append(
            [
                two,
                f"{label}: CPU ms/req",
                _n(_median(cpu), ".2f"),
                "the measured process, user+sys" + (f"; {spread}" if spread else ""),
            ]
        )
        if key == "sqlite":
            continue
        xacts = [float(v.xacts) if v.xacts is not None else None for v in vs]
        per = [
            x / v.answered if x is not None and v.answered else None for x, v in zip(xacts, vs, strict=True)
        ]
        rows.append(
            [
                two,
                f"{label}: transactions/req",
                _n(_median(per), ".3f"),
                f"{_n(_median(xacts))} commits (pg_stat_database xact_commit)",
            ]
        )
        slots = [float(v.rate_slot_updates) if v.rate_slot_updates is not None else None for v in vs]
        per = [
            x / v.answered if x is not None and v.answered else None for x, v in zip(slots, vs, strict=True)
        ]
        wall = _median([v.measured.wall_s for v in vs])
        rows.append(
            [
                two,
                f"{label}: rate_slot updates/req",
                _n(_median(per), ".4f"),
                f"{_n(_median(slots))} = bookings + news exchanges (~1/s; run {_n(wall, '.1f')} s)",
            ]
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--short", action="store_true", help="2 workers, 200 requests, R = 6,000; 500 requests"
    )
    parser.add_argument("--workers", type=int, help="worker processes in part 1 (default 4)")
    parser.add_argument("--rows", type=int, help="requests in part 1 (default 4,000)")
    parser.add_argument(
        "--rpm", type=int, help="R, the mock's and the spec's limit in part 1 (default 3,000)"
    )
    parser.add_argument("--latency-ms", type=float, default=200.0, help="the mock's latency in part 1")
    parser.add_argument("--overhead-rows", type=int, help="requests in part 2 (default 5,000)")
    parser.add_argument("--rounds", type=int, help="rounds of part 2 (default 3; medians shown)")
    parser.add_argument("--part", type=int, choices=[1, 2], action="append", help="run only this part")
    parser.add_argument(
        "--admin-dsn", default=ADMIN_DSN, help="a PostgreSQL database to CREATE DATABASE from"
    )
    args = parser.parse_args()
    workers = args.workers or (2 if args.short else 4)
    rows = args.rows or (200 if args.short else 4000)
    rpm = args.rpm or (6000 if args.short else 3000)
    overhead_rows = args.overhead_rows or (500 if args.short else 5000)
    rounds = args.rounds or (1 if args.short else 3)

    why = pg_reachable(args.admin_dsn)
    if why is not None:
        print(f"PostgreSQL at {args.admin_dsn} cannot be reached: {why}", file=sys.stderr)
        return 2
    version = pg_query(args.admin_dsn, "SHOW server_version")[0][0]
    print(
        f"python {sys.version.split()[0]}, PostgreSQL {version}; {os.cpu_count()} cores; part 1: mock "
        f"in this process, {args.latency_ms:g} ms, workers not pinned; part 2: mock on core 1, the "
        f"measured process on core 0 ({'pinned' if common.pin_prefix(0) else common.NOT_PINNED}); "
        f"{common.load_average('load unknown')}; {dt.date.today()}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="pipeline-workers-") as tmp:
        workdir = Path(tmp)
        t0 = time.monotonic()
        shared: Shared | None = None
        variants: list[Variant] = []
        if not args.part or 1 in args.part:
            shared = run_shared(args.admin_dsn, workdir, Shared(workers, rows, rpm, args.latency_ms))
            print(f"  done part 1 ({time.monotonic() - t0:.1f} s)", file=sys.stderr, flush=True)
        if not args.part or 2 in args.part:
            variants = run_overhead(args.admin_dsn, workdir, overhead_rows, rounds)
        print(f"  done part 2 ({time.monotonic() - t0:.1f} s)", file=sys.stderr, flush=True)
    print()
    print(table(shared, variants))
    problems = [p for p in [shared and shared.problem, *(v.problem for v in variants)] if p]
    for p in problems:
        print(f"PROBLEM: {p}")
    print(f"\nafter: {common.load_average('load unknown')}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
