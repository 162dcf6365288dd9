"""bench/ratelimit.py still runs: its `--short` form exits 0 and prints its table.

Figures are never asserted (the machine is shared and noisy); only that the harness works.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.backend_free("the benchmark writes its own SQLite files")

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(150)
def test_ratelimit_bench_short_prints_its_table() -> None:
    proc = subprocess.run(
        # two scenarios (configured rpm, learned tpm) of 12 s: the harness, not the figures
        [
            sys.executable,
            str(ROOT / "bench" / "ratelimit.py"),
            "--short",
            "--minutes",
            "0.2",
            "--only",
            "1",
            "--only",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=140,
        cwd=ROOT,
    )
    assert proc.returncode == 0, (
        f"ratelimit.py --short exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    )
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("scenario"))
    for column in ("limit", "configured", "achieved/min", "share", "429 run", "429 >warm", "targets", "ok"):
        assert column in header
    rows = [line for line in lines if line[:2] in ("1:", "2:", "3:", "4:") and "%" in line]
    assert [r[:2] for r in rows] == ["1:", "4:"]
    assert all(r.split()[-1] in ("yes", "NO") for r in rows)
