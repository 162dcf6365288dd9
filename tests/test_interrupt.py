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
from helpers import plain_rows, query, write_jsonl

from pipeline.mock import MockServer


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_signal_exits_130_and_the_rerun_finishes_the_rest(
    workdir: Path, mock_server: Callable[..., MockServer], sig: signal.Signals
) -> None:
    """A signal mid-run: exit 130, answers so far recorded; the rerun sends only what is left."""
    server = mock_server(latency_ms=50)
    write_jsonl(workdir / "in.jsonl", plain_rows(100))
    args = [sys.executable, "-m", "pipeline", "run", "--input", "in.jsonl", "--base-url", server.base_url]
    args += ["--model", "mock-small", "--concurrency", "4", "--db", "p.db", "-q"]
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    proc = subprocess.Popen(
        args, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 30
    while server.stats().completions < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    done = query(workdir / "p.db", "SELECT COUNT(*) FROM request WHERE state = 'succeeded'")[0][0]
    assert 20 <= done < 100
    assert query(workdir / "p.db", "SELECT state FROM run") == [("interrupted",)]
    sent_first = server.stats().requests_total
    rerun = subprocess.run(args, cwd=workdir, env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert query(workdir / "p.db", "SELECT COUNT(*) FROM request WHERE state = 'succeeded'") == [(100,)]
    # Only the requests in flight at the signal (at most the concurrency) were sent twice.
    assert server.stats().requests_total - 100 <= 4
    assert sent_first - done <= 4
