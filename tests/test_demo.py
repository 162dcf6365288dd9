"""The README's first command: the demo job runs end to end through the installed command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
from helpers import default_db, query

ROOT = Path(__file__).resolve().parent.parent


def test_demo_job_runs_to_exit_0_with_one_answer_per_row(workdir: Path) -> None:
    """`python -m pipeline run jobs/demo.toml`: 200 succeeded requests, the same 200 rows in Parquet."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", str(ROOT / "jobs" / "demo.toml")],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "results: out/demo/demo/results.parquet" in proc.stdout
    rows = (ROOT / "jobs" / "data" / "reviews.jsonl").read_text().splitlines()
    db = default_db()  # jobs/demo.toml names no database
    assert query(db, "SELECT state, COUNT(*) FROM request GROUP BY state") == [("succeeded", len(rows))]
    table = pq.read_table(workdir / "out" / "demo" / "demo" / "results.parquet")
    ids = [r[0] for r in query(db, "SELECT custom_id FROM request ORDER BY seq")]
    assert table.column("custom_id").to_pylist() == ids
    assert table.column("review_id").to_pylist() == ids
    assert set(table.column("state").to_pylist()) == {"succeeded"}
    assert all(c is not None and c > 0 for c in table.column("cost_usd").to_pylist())


def test_help_lists_every_command_without_secrets() -> None:
    """`pipeline --help` answers and names the commands."""
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0
    for command in ("run", "status", "report", "export", "mock-server", "db"):
        assert command in proc.stdout


EXIT_PROBE = """
import atexit, pathlib, sys, threading, time
from pipeline.cli import entry
marks = pathlib.Path(sys.argv[1])
atexit.register(lambda: (marks / "atexit").write_text("ran"))
if sys.argv[2] == "thread":  # still working when the command is done: it must finish
    threading.Thread(target=lambda: (time.sleep(1.5), (marks / "thread").write_text("done"))).start()
sys.stdout.write("x" * 1_000_000)  # buffered: it must reach the pipe
sys.argv = ["pipeline", "run", "--input", str(marks / "missing.jsonl"), "--model", "m", "--base-url", "http://127.0.0.1:9/v1"]
entry()
"""


def test_the_command_ends_with_its_status_its_output_and_its_exit_handlers(tmp_path: Path) -> None:
    """`pipeline` skips the interpreter's teardown (pipeline.cli.entry), not what exiting does:
    the status, buffered output and atexit handlers; with a thread still at work it waits for it."""
    for mode in ("alone", "thread"):
        marks = tmp_path / mode
        marks.mkdir()
        proc = subprocess.run(
            [sys.executable, "-c", EXIT_PROBE, str(marks), mode], capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 2, proc.stderr
        assert proc.stdout == "x" * 1_000_000
        assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
        assert (marks / "atexit").read_text() == "ran"
        assert (marks / "thread").exists() == (mode == "thread")


def test_the_command_takes_arrow_buffers_from_jemalloc_unless_told_otherwise() -> None:
    """pipeline.cli.entry names Arrow's memory pool before pyarrow is imported (mimalloc, the
    default, kept ~40 MB more of a 100,000-row run: bench/memory.py); the user's choice wins."""
    probe = (
        "from pipeline.cli import _arrow_memory_pool; _arrow_memory_pool(); "
        "import pyarrow; print(pyarrow.default_memory_pool().backend_name)"
    )
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    chosen = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60
    )
    assert chosen.returncode == 0, chosen.stderr
    assert chosen.stdout.strip() == ("jemalloc" if sys.platform == "linux" else "mimalloc")
    assert chosen.stderr == ""
    told = subprocess.run(
        [sys.executable, "-c", probe],
        env={**env, "ARROW_DEFAULT_MEMORY_POOL": "system"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert told.stdout.strip() == "system"
