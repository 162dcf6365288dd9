"""Storage faults: a locked, read-only or unreachable database gives one clear line, no traceback, no loss."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import plain_rows, query, write_jsonl

from pipeline.mock import MockServer


def run(cli: Callable[..., Any], server: MockServer, db: str, *extra: str) -> Any:
    return cli(
        "run", "--input", "in.jsonl", "--base-url", server.base_url, "--model", "mock-small",
        "--db", db, "--out", "out", "-q", *extra,
    )  # fmt: skip


@pytest.mark.sqlite_only("another process holds the SQLite file's write lock (BEGIN EXCLUSIVE)")
def test_locked_database_is_a_clear_error_and_the_run_resumes_after(
    workdir: Path, mock_server: Callable[..., MockServer], cli: Callable[..., Any]
) -> None:
    """Another process holds the write lock: one line naming it, exit 1; later the same run works."""
    server = mock_server()
    write_jsonl(workdir / "in.jsonl", plain_rows(5))
    assert run(cli, server, "p.db").exit_code == 0
    write_jsonl(workdir / "in.jsonl", plain_rows(5, prefix="z"))
    holder = sqlite3.connect(workdir / "p.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        r = run(cli, server, "sqlite+aiosqlite:///p.db?timeout=0.3", "--run-id", "second")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert r.exit_code == 1
    assert "is locked by another process" in r.stderr and "resumable" in r.stderr
    assert "Traceback" not in r.stderr
    assert server.stats().requests_total == 5
    again = run(cli, server, "p.db", "--run-id", "second")
    assert again.exit_code == 0, again.stderr
    assert query(workdir / "p.db", "SELECT COUNT(*) FROM request WHERE state = 'succeeded'") == [(10,)]


@pytest.mark.sqlite_only("a SQLite file opened read-only (mode=ro URI)")
def test_read_only_database_is_a_clear_error(
    workdir: Path, mock_server: Callable[..., MockServer], cli: Callable[..., Any]
) -> None:
    """A database opened read-only: one line saying so, exit 1, nothing sent."""
    server = mock_server()
    write_jsonl(workdir / "in.jsonl", plain_rows(3))
    sqlite3.connect(workdir / "ro.db").close()
    r = run(cli, server, "sqlite+aiosqlite:///file:ro.db?mode=ro&uri=true")
    assert r.exit_code == 1
    assert "read-only" in r.stderr and "Traceback" not in r.stderr
    assert server.stats().requests_total == 0


@pytest.mark.sqlite_only(
    "another connection takes the SQLite file's write lock mid-run; the busy timeout runs out"
)
def test_database_locked_mid_run_stops_cleanly_and_the_rerun_loses_nothing(
    workdir: Path, mock_server: Callable[..., MockServer]
) -> None:
    """The recorder cannot commit: one clear line, exit 1; the rerun finishes every request, and
    only requests the database names as in flight are sent again."""
    server = mock_server(latency_ms=100)
    write_jsonl(workdir / "in.jsonl", plain_rows(60))
    args = [sys.executable, "-m", "pipeline", "run", "--input", "in.jsonl", "--base-url", server.base_url]
    args += ["--model", "mock-small", "--concurrency", "4", "--out", "out", "-q"]
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    proc = subprocess.Popen(
        [*args, "--db", "sqlite+aiosqlite:///p.db?timeout=0.5"],
        cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while server.stats().completions < 8 and time.monotonic() < deadline:
        time.sleep(0.01)
    holder = sqlite3.connect(workdir / "p.db", isolation_level=None, timeout=10)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert proc.returncode == 1, err
    assert "locked" in err and "Traceback" not in err
    db = workdir / "p.db"
    in_flight = query(db, "SELECT COUNT(*) FROM request WHERE state = 'in_flight'")[0][0]
    done = query(db, "SELECT COUNT(*) FROM request WHERE state = 'succeeded'")[0][0]
    answered_before = server.stats().completions
    rerun = subprocess.run(
        [*args, "--db", "p.db"], cwd=workdir, env=env, capture_output=True, text=True, timeout=120
    )
    assert rerun.returncode == 0, rerun.stderr
    assert query(db, "SELECT COUNT(*) FROM request WHERE state = 'succeeded'") == [(60,)]
    # Paid twice at most: what was answered but not recorded, all of it named in flight.
    assert answered_before - done <= in_flight
    assert server.stats().completions - 60 <= in_flight


def test_a_database_server_that_cannot_be_reached_is_a_clear_error(
    workdir: Path, mock_server: Callable[..., MockServer], cli: Callable[..., Any]
) -> None:
    """A PostgreSQL URL whose server is not there: one line naming it (password hidden), exit 1,
    nothing sent; status says the same."""
    server = mock_server()
    write_jsonl(workdir / "in.jsonl", plain_rows(2))
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql+asyncpg://batch:s3cret-pw@127.0.0.1:{port}/pipeline"
    for r in (run(cli, server, url), cli("status", "--db", url)):
        assert r.exit_code == 1
        assert f"database 127.0.0.1:{port}/pipeline:" in r.stderr and "refused" in r.stderr
        assert "s3cret-pw" not in r.stdout + r.stderr and "Traceback" not in r.stderr
    assert server.stats().requests_total == 0
