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
