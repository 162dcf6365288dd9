"""Ctrl-C (SIGINT) or SIGTERM stops a run with exit 130; rerunning resumes it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import default_db, plain_rows, query, write_jsonl

from pipeline.mock import MockServer


def start_run(
    workdir: Path, server: MockServer, *extra: str
) -> tuple[subprocess.Popen[str], list[str], dict[str, str]]:
    args = [sys.executable, "-m", "pipeline", "run", "--input", "in.jsonl", "--base-url", server.base_url]
    args += ["--model", "mock-small", "--concurrency", "4", "-q", *extra]  # the default database
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    proc = subprocess.Popen(
        args, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    return proc, args, env


def wait_for(server: MockServer, completions: int) -> None:
    deadline = time.monotonic() + 30
    while server.stats().completions < completions and time.monotonic() < deadline:
        time.sleep(0.02)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_first_signal_lets_in_flight_finish_then_exits_130_and_nothing_is_sent_twice(
    workdir: Path, mock_server: Callable[..., MockServer], sig: signal.Signals
) -> None:
    """One signal: no new requests, in-flight ones finish and are recorded, exit 130; the rerun
    sends exactly the rest."""
    server = mock_server(latency_ms=50)
    write_jsonl(workdir / "in.jsonl", plain_rows(100))
    proc, args, env = start_run(workdir, server)
    wait_for(server, 20)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    db = default_db()
    done = query(db, "SELECT COUNT(*) FROM request WHERE state = 'succeeded'")[0][0]
    assert 20 <= done < 100
    assert query(db, "SELECT COUNT(*) FROM request WHERE state = 'in_flight'") == [(0,)]
    assert query(db, "SELECT state FROM run") == [("interrupted",)]
    assert server.stats().requests_total == done  # every request sent was answered and recorded
    rerun = subprocess.run(args, cwd=workdir, env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert query(db, "SELECT COUNT(*) FROM request WHERE state = 'succeeded'") == [(100,)]
    assert server.stats().requests_total == 100  # zero requests sent twice


def test_second_signal_stops_at_once_leaving_in_flight_requests_named(
    workdir: Path, mock_server: Callable[..., MockServer]
) -> None:
    """Two signals: stop without waiting; the abandoned requests are marked in flight and the
    rerun resends only those."""
    server = mock_server(latency_ms=2000)
    write_jsonl(workdir / "in.jsonl", plain_rows(20))
    proc, _, _ = start_run(workdir, server)
    deadline = time.monotonic() + 30
    while server.stats().requests_total < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    db = default_db()
    in_flight = query(db, "SELECT COUNT(*) FROM request WHERE state = 'in_flight'")[0][0]
    assert in_flight == 4  # the four sent; the claimed but unsent were given back
    assert query(db, "SELECT COUNT(*) FROM request WHERE state = 'pending'") == [(16,)]
    status = subprocess.run(
        [sys.executable, "-m", "pipeline", "status"],
        cwd=workdir,
        capture_output=True,
        text=True,
    )
    assert "4 in flight" in status.stdout
