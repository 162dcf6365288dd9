"""bench/workers.py still runs: its `--short` form exits 0 and prints its table.

Figures are never asserted (the machine is shared and noisy); only that the harness works. It
needs the PostgreSQL server on 127.0.0.1:5432: without it the test is skipped, except under CI
(CI=true), where it fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

pytestmark = pytest.mark.backend_free("the benchmark makes its own PostgreSQL databases")

ROOT = Path(__file__).resolve().parent.parent
ADMIN = "postgresql://postgres@127.0.0.1:5432/test"


def _postgres_unreachable() -> str | None:
    import asyncpg

    async def ping() -> None:
        conn = await asyncpg.connect(ADMIN, timeout=5)
        await conn.close()

    try:
        anyio.run(ping)
    except Exception as exc:  # asyncpg raises its own errors and OSError alike
        return f"{type(exc).__name__}: {exc}"
    return None


@pytest.mark.timeout(150)
def test_workers_bench_short_prints_its_table() -> None:
    why = _postgres_unreachable()
    if why is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL at 127.0.0.1:5432 is required under CI: {why}")
        pytest.skip(f"no PostgreSQL at 127.0.0.1:5432: {why}")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "workers.py"), "--short"],
        capture_output=True,
        text=True,
        timeout=140,
        cwd=ROOT,
    )
    assert proc.returncode == 0, f"workers.py --short exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("part"))
    for column in ("figure", "value", "how / target"):
        assert column in header
    figures = "\n".join(line for line in lines if line[:3] in ("1: ", "2: "))
    for figure in (
        "requests answered",
        "answered exactly once: database",
        "answered exactly once: Parquet",
        "429s from the server",
        "most requests in any 60 s",
        "ratio to R",
        "per-worker share",
        "1 worker, no rpm: req/s",
        "1 worker, rpm 600,000: CPU ms/req",
        "transactions/req",
        "rate_slot updates/req",
        "pipeline run, SQLite: req/s",
    ):
        assert figure in figures, figure
