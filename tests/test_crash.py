"""Crash safety, end to end: bench/crash.py in its short form (SIGKILL, SIGINT, recovery)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PgDatabases

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
def test_killed_and_rerun_runs_lose_nothing_and_pay_little_twice(
    db_backend: str, pg_databases: PgDatabases
) -> None:
    """SIGKILL twice then rerun: one answer per request, server answers <= N + in flight at kills;
    SIGINT: exit 130 and nothing sent twice; with stored-completion recovery: nothing sent twice.
    On the suite's backend: SQLite files, or one fresh PostgreSQL database."""
    db = [] if db_backend == "sqlite" else ["--db", pg_databases.create()]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "crash.py"), "--short", *db],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()[1:]}
    assert set(rows) == {"sigkill", "sigint", "recovery"}
    assert all(r[-1] == "yes" for r in rows.values())
    assert rows["sigint"][5] == "0" and rows["recovery"][5] == "0"  # sent twice
    assert rows["sigint"][6] == "130,130,0"
