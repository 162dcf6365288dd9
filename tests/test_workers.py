"""Many workers on one PostgreSQL database: submit, worker, leases, shared limits and budget.

Worker processes are real (``python -m pipeline worker``), the database is the PostgreSQL
server on 127.0.0.1:5432 (a fresh database per test), the provider is the mock server.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pyarrow.parquet as pq
import pytest
from helpers import plain_rows, query, write_job, write_jsonl

from pipeline.limits import WINDOW_S, RouteLimiter
from pipeline.mock import MockServer
from pipeline.shared import RateNews
from pipeline.spec import LimitsSpec
from pipeline.store import Store


def start_worker(workdir: Path, url: str, run: str, *args: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "pipeline", "worker", "--db", url, "--run", run, "-q", *args]
    return subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(procs: list[subprocess.Popen[str]], timeout: float) -> list[tuple[int, str, str]]:
    deadline = time.monotonic() + timeout
    out = []
    for p in procs:
        try:
            so, se = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            so, se = p.communicate()
        out.append((p.returncode, so, se))
    return out


@pytest.mark.timeout(240)
def test_four_workers_share_one_rate_limit_and_answer_each_request_once(
    workdir: Path,
    pg_url: str,
    mock_server: Callable[..., MockServer],
    cli: Callable[..., Any],
) -> None:
    """4,000 requests, 4 worker processes, a server allowing R = 3,000 requests/min (sliding
    60 s window; over it, 429): every request answered once, in the database and in Parquet;
    the server refused nothing; each worker did a share. (The rate reached is a benchmark
    figure: bench/workers.py.)"""
    rpm = 3000
    server = mock_server(rpm=rpm)
    spec = write_job(workdir / "shared.toml", server.base_url, rows=4000, extra=f"[limits]\nrpm = {rpm}\n")
    sub = cli("submit", spec, "--db", pg_url)
    assert sub.exit_code == 0, sub.stderr
    assert "loaded, 4000 requests (4000 to send)" in sub.stdout
    assert server.stats().requests_total == 0  # submit sends nothing

    procs = [start_worker(workdir, pg_url, "shared") for _ in range(4)]
    results = finish(procs, 220)
    assert [code for code, _, _ in results] == [0, 0, 0, 0], [se for _, _, se in results]

    stats = server.stats()
    assert stats.completions == 4000 and stats.requests_total == 4000
    assert stats.by_status.get(429, 0) == 0
    assert query(pg_url, "SELECT state, COUNT(*), SUM(attempts) FROM request GROUP BY state") == [
        ("succeeded", 4000, 4000)
    ]
    assert query(pg_url, "SELECT COUNT(*), COUNT(DISTINCT custom_id) FROM attempt") == [(4000, 4000)]
    shares = [n for (n,) in query(pg_url, "SELECT recorded FROM worker ORDER BY recorded")]
    assert len(shares) == 4 and min(shares) > 0 and sum(shares) == 4000
    assert query(pg_url, "SELECT COUNT(*) FROM request WHERE lease_owner IS NOT NULL") == [(0,)]
    assert query(pg_url, "SELECT state FROM run") == [("completed",)]

    out = workdir / "out" / "shared" / "shared"
    ids = pq.read_table(out / "results.parquet", columns=["custom_id"]).column("custom_id").to_pylist()
    assert sorted(ids) == sorted(f"q-{i}" for i in range(4000))
    assert not (out / "parts").exists()  # consolidated: every worker's parts are gone
    span = query(pg_url, "SELECT EXTRACT(EPOCH FROM MAX(started_at) - MIN(started_at)) FROM attempt")[0][0]
    print(f"4 workers: 4,000 requests in {float(span):.1f} s = {3999 / float(span) * 60:.0f}/min (R = {rpm})")


@pytest.mark.timeout(180)
def test_a_killed_workers_requests_go_to_the_others_after_its_lease(
    workdir: Path,
    pg_url: str,
    mock_server: Callable[..., MockServer],
    cli: Callable[..., Any],
) -> None:
    """SIGKILL one of three workers mid-run: its requests stay leased until the lease runs
    out, then the others send them; sent twice <= what it held; nothing lost."""
    lease_s = 4.0
    server = mock_server(latency_ms=300)
    spec = write_job(workdir / "kill.toml", server.base_url, rows=900, extra="[limits]\nconcurrency = 8\n")
    assert cli("submit", spec, "--db", pg_url).exit_code == 0
    procs = [start_worker(workdir, pg_url, "kill", "--lease-s", str(lease_s)) for _ in range(3)]
    victim = procs[0]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # let it get going: some answers recorded, more in flight
        rec = query(pg_url, "SELECT COALESCE(SUM(recorded), 0) FROM worker WHERE pid = ?", victim.pid)
        if rec and rec[0][0] >= 20:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the first worker recorded nothing in 60 s")
    os.kill(victim.pid, signal.SIGKILL)
    victim.communicate()  # waits, and closes its pipes
    killed_at = time.time()
    held = query(
        pg_url,
        "SELECT custom_id FROM request r JOIN worker w ON r.lease_owner = w.worker_id "
        "WHERE w.pid = ? AND r.state = 'in_flight'",
        victim.pid,
    )
    assert held, "the killed worker held no lease"
    results = finish(procs[1:], 150)
    assert [code for code, _, _ in results] == [0, 0], [se for _, _, se in results]

    assert query(pg_url, "SELECT state, COUNT(*) FROM request GROUP BY state") == [("succeeded", 900)]
    twice = server.stats().completions - 900
    assert 0 <= twice <= len(held)
    # the held requests were sent again only once the lease had run out
    resent = query(
        pg_url,
        "SELECT MIN(EXTRACT(EPOCH FROM started_at AT TIME ZONE 'UTC')) FROM attempt "
        "WHERE custom_id = ANY(?::text[]) AND attempt_no = 1",
        [cid for (cid,) in held],
    )[0][0]
    # (leases are renewed every lease_s / 4, so at the kill at least 3/4 of one was left)
    assert float(resent) >= killed_at + lease_s * 3 / 4 - 0.5, "a held request was sent again too early"
    out = workdir / "out" / "kill" / "kill"
    results = pq.read_table(out / "results.parquet", columns=["custom_id", "state"]).to_pylist()
    assert sorted(r["custom_id"] for r in results) == sorted(f"q-{i}" for i in range(900))
    assert {r["state"] for r in results} == {"succeeded"}
    assert not (out / "parts").exists()  # the killed worker's parts too: results.parquet has all


@pytest.mark.timeout(120)
def test_budget_cap_holds_for_the_sum_of_workers(
    workdir: Path,
    pg_url: str,
    mock_server: Callable[..., MockServer],
    cli: Callable[..., Any],
) -> None:
    """Three workers under one cap: together they stop before passing it (exit 3), and a
    rerun with a larger cap finishes what is left, nothing sent twice."""
    server = mock_server(latency_ms=20)
    spec = write_job(
        workdir / "budget.toml",
        server.base_url,
        rows=300,
        top="budget_usd = 0.002",
        extra="[request]\nmax_tokens = 16\n[limits]\nconcurrency = 4\n",
    )
    assert cli("submit", spec, "--db", pg_url).exit_code == 0
    results = finish([start_worker(workdir, pg_url, "budget") for _ in range(3)], 100)
    assert sorted(code for code, _, _ in results) == [3, 3, 3], [se for _, _, se in results]
    spent = query(pg_url, "SELECT SUM(cost_picousd) FROM attempt")[0][0]
    assert 0 < spent <= 2_000_000_000  # $0.002 in picodollars
    counts = dict(query(pg_url, "SELECT state, COUNT(*) FROM request GROUP BY state"))
    assert counts.get("pending", 0) > 0 and counts.get("in_flight", 0) == 0
    assert query(pg_url, "SELECT state, exit_code FROM run") == [("stopped", 3)]

    r = cli("run", spec, "--db", pg_url, "--budget-usd", "1", "-q")
    assert r.exit_code == 0, r.stderr
    assert server.stats().completions == 300
    assert query(pg_url, "SELECT COUNT(*) FROM attempt") == [(300,)]


def test_submit_is_idempotent_and_worker_errors_are_one_line(
    workdir: Path,
    pg_url: str,
    mock_server: Callable[..., MockServer],
    cli: Callable[..., Any],
) -> None:
    server = mock_server()
    spec = write_job(workdir / "idem.toml", server.base_url, rows=50)
    first = cli("submit", spec, "--db", pg_url)
    again = cli("submit", spec, "--db", pg_url)
    assert first.exit_code == again.exit_code == 0
    assert "already loaded, 50 requests" in again.stdout
    assert query(pg_url, "SELECT COUNT(*) FROM request") == [(50,)]

    sqlite = cli("worker", "--db", "local.db")
    assert sqlite.exit_code == 2
    assert "use PostgreSQL" in sqlite.stderr and "Traceback" not in sqlite.stderr
    unknown = cli("worker", "--db", pg_url, "--run", "nope")
    assert unknown.exit_code == 2 and "no submitted run 'nope'" in unknown.stderr

    write_jsonl(workdir / "idem.jsonl", plain_rows(51))  # the input changed under the run
    changed = cli("submit", spec, "--db", pg_url)
    assert changed.exit_code == 2 and "q-50" in changed.stderr

    done = cli("worker", "--db", pg_url, "-q")  # no --run: every submitted run with work left
    assert done.exit_code == 0, done.stderr
    assert server.stats().completions == 50
    assert cli("worker", "--db", pg_url, "-q").stdout.strip() == "no submitted run has requests left to send"
    import orjson

    status = orjson.loads(cli("status", "idem", "--db", pg_url, "--json").stdout)
    assert status["state"] == "completed" and status["counts"]["succeeded"] == 50
    assert [(w["recorded"], w["finished_at"] is not None) for w in status["workers"]] == [(50, True)]
    assert "workers: 1 in all, 0 not finished" in cli("status", "idem", "--db", pg_url).stdout


def test_a_429_seen_by_one_worker_slows_the_others(pg_url: str) -> None:
    """Two workers' limiters on one route: a 429 in one cools the other down (through the
    database); a limit learned by one is learned by the other."""

    async def go() -> tuple[float, float | None]:
        store = await Store.open(pg_url)
        try:
            a, b = RateNews(store, "http://x/v1|m"), RateNews(store, "http://x/v1|m")
            la, lb = RouteLimiter(LimitsSpec(), shared=a), RouteLimiter(LimitsSpec(), shared=b)
            a.limiter, b.limiter = la, lb
            la.rate_limited(5.0, None)  # the first worker sees a 429 with Retry-After: 5
            la._learn_rpm(600)  # and learns the limit from headers
            await a.exchange()
            await b.exchange()
            return lb._cooldown_until - time.monotonic(), lb.learned_rpm
        finally:
            await store.close()

    left, learned = anyio.run(go)
    assert 4.0 < left <= 5.0
    assert learned == pytest.approx(600 * 0.97)


def test_shared_buckets_pace_the_sum_of_workers(pg_url: str) -> None:
    """Two processes' buckets on one limit (600/min) take 40 units together: the booked
    send times never come closer than the limit allows, whoever books them."""

    async def go() -> tuple[float, int]:
        store = await Store.open(pg_url)
        try:
            limiters = [
                RouteLimiter(LimitsSpec(rpm=600, concurrency=20), shared=RateNews(store, "http://y/v1|m"))
                for _ in range(2)
            ]
            t0 = time.monotonic()

            async def take(lim: RouteLimiter) -> None:
                async with lim.slot(1):
                    pass

            async with anyio.create_task_group() as tg:
                for lim in limiters:
                    for _ in range(20):
                        tg.start_soon(take, lim)
            bookings = sum(lim.rpm.bookings for lim in limiters if lim.rpm is not None)  # type: ignore[attr-defined]
            return time.monotonic() - t0, bookings
        finally:
            await store.close()

    elapsed, bookings = anyio.run(go)
    interval = WINDOW_S / 600
    assert elapsed >= 39 * interval - 0.05  # 40 sends, paced for both workers together
    assert bookings < 40  # booked in slices, not one database round trip per request


def test_a_stalled_worker_and_the_one_that_took_its_lease_both_bill_and_one_answer_stays(
    pg_url: str,
) -> None:
    """Worker A's lease runs out while it stalls; B claims the request and records its
    answer; then A records its own. Both attempts are kept (numbered 1 and 2: both were
    paid), B's success stays the answer, and the lease is gone."""
    from datetime import datetime

    from pipeline.client import parse_completion
    from pipeline.records import Attempt, Outcome

    raw = (
        b'{"id":"c1","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,'
        b'"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],'
        b'"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}'
    )

    def answered(cid: str, content_from: str) -> Outcome:
        c = parse_completion(raw.replace(b'"hi"', f'"{content_from}"'.encode()))
        a = Attempt(1, "default", "http://x/v1", "m", datetime(2026, 11, 24), outcome="success")
        a.completion, a.usage, a.cost_picousd = c, c.usage, 1000
        return Outcome(seq=0, custom_id=cid, state="succeeded", attempts=[a])

    async def go() -> tuple[list[Any], Any, list[Any], set[str]]:
        store = await Store.open(pg_url)
        try:
            await store.create_run(
                run_id="r", job="j", spec_json="{}", input_path="x", input_sha256="h", state="running"
            )

            async def rows() -> Any:
                yield [
                    {
                        "custom_id": "q-0",
                        "seq": 0,
                        "body_sha256": "b",
                        "body": "{}",
                        "record": None,
                        "state": "pending",
                        "attempts": 0,
                        "error": None,
                    }
                ]

            await store.load_requests("r", rows())
            for w in ("A", "B"):
                await store.register_worker(w, "r", "h", 1)
            assert len(await store.lease("r", "A", 10, ("pending", "in_flight"), 0.2)) == 1
            assert await store.lease("r", "B", 10, ("pending", "in_flight"), 60) == []  # A holds it
            await anyio.sleep(0.3)  # A stalls past its lease
            taken = await store.lease("r", "B", 10, ("pending", "in_flight"), 60)
            assert [(t[1], t[5]) for t in taken] == [("q-0", "in_flight")]  # maybe paid already
            assert await store.record_outcomes("r", [answered("q-0", "from B")], owner="B") == set()
            kept = await store.record_outcomes("r", [answered("q-0", "from A")], owner="A")
            attempts = await store.execute_text(
                "SELECT a.attempt_no, c.content FROM attempt a JOIN completion c USING "
                "(run_id, custom_id, attempt_no) ORDER BY a.attempt_no"
            )
            req = (
                await store.execute_text(
                    "SELECT state, attempts, final_attempt_no, cost_picousd, lease_owner FROM request"
                )
            )[0]
            spent = await store.execute_text("SELECT worker_id, spent_picousd FROM worker ORDER BY 1")
            return [tuple(r.values()) for r in attempts], req, [tuple(r.values()) for r in spent], kept
        finally:
            await store.close()

    attempts, req, spent, kept = anyio.run(go)
    assert attempts == [(1, "from B"), (2, "from A")]
    assert req == {
        "state": "succeeded",
        "attempts": 2,
        "final_attempt_no": 1,
        "cost_picousd": 2000,
        "lease_owner": None,
    }
    assert spent == [("A", 1000), ("B", 1000)]
    assert kept == {"q-0"}
