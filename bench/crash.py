"""Crash safety: kill `pipeline run` at random moments, rerun it, check nothing is lost or paid twice.

Starts the mock server in its own process (it keeps counting across the pipeline's deaths),
runs a job of N requests with latency, and K times kills the run (SIGKILL, or SIGINT) at a
random moment and starts the same command again; the last run goes to the end. Then it
checks, and prints:

* every request has exactly one succeeded answer in the database and in the Parquet output;
* the server answered at most N + (requests the database had in flight at the kills);
* with SIGINT: exit 130 each time, and zero requests answered twice;
* with stored-completion recovery on: zero requests answered twice even after SIGKILL.

    python bench/crash.py                    # 2,000 requests, 3 SIGKILLs, then SIGINT, then recovery
    python bench/crash.py --short            # a small version (the test suite runs it)
    python bench/crash.py --db postgresql+asyncpg://...   # every scenario in that database

Each scenario is its own run (run id: the scenario's name), in a SQLite file of its own
folder, or with --db in the one database given (an empty one).
"""

from __future__ import annotations

import argparse
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import common
import orjson
import pyarrow.parquet as pq


@dataclass
class Result:
    scenario: str
    requests: int
    kills: int
    in_flight_at_kills: int
    answered_by_server: int
    sent_twice: int
    exit_codes: list[int]
    succeeded_once: bool
    parquet_ok: bool

    @property
    def ok(self) -> bool:
        bound = self.requests + self.in_flight_at_kills
        twice_ok = self.sent_twice == 0 if self.scenario != "sigkill" else self.answered_by_server <= bound
        return self.succeeded_once and self.parquet_ok and twice_ok


def _completions(base_url: str) -> int:
    """How many completions the mock server has answered (it counts across the runs' deaths)."""
    return int(common.mock_stats(base_url, timeout_s=10)["completions"])


def _db_count(db: Path | str, sql: str) -> int:
    """One number from the database: a SQLite file (0 while it does not exist) or a PostgreSQL URL."""
    if isinstance(db, str):
        import anyio
        import asyncpg

        async def fetch() -> int:
            conn = await asyncpg.connect("postgresql://" + db.split("://", 1)[1], timeout=30)
            try:
                exists = await conn.fetchval("SELECT to_regclass('request') IS NOT NULL")
                return int(await conn.fetchval(sql)) if exists else 0
            finally:
                await conn.close()

        return anyio.run(fetch)
    if not db.exists():
        return 0
    with sqlite3.connect(db, timeout=30) as conn:
        return int(conn.execute(sql).fetchone()[0])


def scenario(
    name: str,
    *,
    n: int,
    kills: int,
    latency_ms: float,
    concurrency: int,
    seed: int,
    workdir: Path,
    db_url: str | None = None,
) -> Result:
    rng = random.Random(seed)
    folder = workdir / name
    folder.mkdir(parents=True)
    (folder / "in.jsonl").write_bytes(
        b"".join(
            orjson.dumps({"custom_id": f"r{i:05d}", "messages": [{"role": "user", "content": f"item {i}"}]})
            + b"\n"
            for i in range(n)
        )
    )
    mock_cmd = common.mock_server_command("--latency-ms", str(latency_ms))
    with common.mock_server(mock_cmd, core=None) as base_url:
        spec = folder / "job.toml"
        spec.write_text(
            f"""
job = "crash"
model = "mock-small"
grace_s = 30
[input]
path = "in.jsonl"
[endpoints.default]
base_url = "{base_url}"
[limits]
concurrency = {concurrency}
[recovery]
stored_completions = {"true" if name == "recovery" else "false"}
"""
        )
        db: Path | str = db_url or folder / "p.db"
        cmd = [sys.executable, "-m", "pipeline", "run", str(spec), "--db", str(db), "--run-id", name]
        cmd += ["--out", "out", "-q"]
        env = common.env_without_api_keys()
        sig = signal.SIGINT if name == "sigint" else signal.SIGKILL
        in_flight_total = 0
        codes: list[int] = []
        for _ in range(kills):
            done = _db_count(
                db, f"SELECT COUNT(*) FROM request WHERE run_id = '{name}' AND state = 'succeeded'"
            )
            target = done + rng.randint(max(1, n // 20), max(2, n // 4))
            before = _completions(base_url)
            proc = subprocess.Popen(
                cmd, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
            deadline = time.monotonic() + 120
            while proc.poll() is None and time.monotonic() < deadline:
                if _completions(base_url) - before + done >= target:
                    break
                time.sleep(0.01)
            if proc.poll() is None:
                proc.send_signal(sig)
            proc.wait(timeout=120)
            codes.append(proc.returncode)
            in_flight_total += _db_count(
                db, f"SELECT COUNT(*) FROM request WHERE run_id = '{name}' AND state = 'in_flight'"
            )
        final = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=600)
        codes.append(final.returncode)
        answered = _completions(base_url)
    once = _db_count(
        db,
        f"SELECT COUNT(*) FROM (SELECT custom_id FROM attempt WHERE run_id = '{name}' AND "
        "outcome IN ('success', 'recovered') GROUP BY custom_id HAVING COUNT(*) = 1) AS once",
    )
    succeeded = _db_count(db, f"SELECT COUNT(*) FROM request WHERE run_id = '{name}' AND state = 'succeeded'")
    table = pq.read_table(folder / "out" / "crash" / name / "results.parquet")
    ids = table.column("custom_id").to_pylist()
    parquet_ok = (
        len(ids) == n and len(set(ids)) == n and set(table.column("state").to_pylist()) == {"succeeded"}
    )
    parts = list((folder / "out").rglob("*.parquet"))
    return Result(
        scenario=name,
        requests=n,
        kills=kills,
        in_flight_at_kills=in_flight_total,
        answered_by_server=answered,
        sent_twice=answered - n,
        exit_codes=codes,
        succeeded_once=once == n and succeeded == n,
        parquet_ok=parquet_ok and len(parts) == 1,
    )


def run(short: bool, seed: int = 7, db_url: str | None = None) -> list[Result]:
    n, latency, concurrency = (300, 50.0, 16) if short else (2000, 100.0, 32)
    kills = 2 if short else 3
    with tempfile.TemporaryDirectory(prefix="pipeline-crash-") as tmp:
        return [
            scenario(
                name,
                n=n,
                kills=kills,
                latency_ms=latency,
                concurrency=concurrency,
                seed=seed,
                workdir=Path(tmp),
                db_url=db_url,
            )
            for name in ("sigkill", "sigint", "recovery")
        ]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--short", action="store_true", help="a small, quick version")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--db",
        metavar="URL",
        help="a PostgreSQL URL (postgresql+asyncpg://...) of an empty database for every scenario",
    )
    args = parser.parse_args()
    results = run(args.short, args.seed, args.db)
    print(f"{'scenario':<9} {'requests':>8} {'kills':>5} {'in flight at kills':>18} {'answered':>8} "
          f"{'sent twice':>10}  exit codes        ok")  # fmt: skip
    for r in results:
        print(
            f"{r.scenario:<9} {r.requests:>8} {r.kills:>5} {r.in_flight_at_kills:>18} "
            f"{r.answered_by_server:>8} {r.sent_twice:>10}  {','.join(map(str, r.exit_codes)):<16}  "
            f"{'yes' if r.ok else 'NO'}"
        )
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
