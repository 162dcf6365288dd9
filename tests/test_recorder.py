"""The recorder: every outcome committed, in batches; claims committed before they are done,
without closing the batch being gathered; a failure stops it cleanly.

On the suite's backend (SQLite, or PostgreSQL with --db-backend=postgresql)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import outcomes
import pytest
from helpers import query

from pipeline.errors import StorageError
from pipeline.progress import Counters
from pipeline.recorder import Claim, Recorder
from pipeline.records import Outcome
from pipeline.spec import db_url
from pipeline.store import Store
from pipeline.store.db import OutcomeRows, Recorded


class Watched(Store):
    """The store, noting each transaction the recorder makes: ("outcomes", n, claims) or
    ("claims", claims)."""

    log: list[tuple[Any, ...]]

    def start_outcomes(
        self, rows: OutcomeRows, *, claims: Callable[[], Sequence[tuple[Sequence[int], bool]]] = tuple
    ) -> Awaitable[Recorded]:
        taken: list[int] = []

        def counted() -> Sequence[tuple[Sequence[int], bool]]:
            pages = claims()
            taken.append(len(pages))
            return pages

        begun = super().start_outcomes(rows, claims=counted)

        async def logged() -> Recorded:
            done = await begun
            self.log.append(("outcomes", len(rows.outcomes), sum(taken)))
            return done

        return logged()

    async def claim_pages(self, run_id: str, pages: Sequence[tuple[Sequence[int], bool]]) -> None:
        await super().claim_pages(run_id, pages)
        self.log.append(("claims", len(pages)))


async def _watched(db: str, n: int) -> Watched:
    store = await Watched.open(db_url(db))
    assert isinstance(store, Watched)
    store.log = []
    await store.create_run(
        run_id="r", job="j", spec_json="{}", input_path="x", input_sha256="h", state="running"
    )
    await store.load_requests("r", outcomes.batches(outcomes.request_rows(n)))
    return store


def _answered(n: int) -> list[Outcome]:
    """Plain answers (kind 0) to requests 0 .. n-1."""
    out = []
    for i in range(n):
        o = outcomes.outcome(i * outcomes.KINDS)
        o.seq, o.custom_id = i, outcomes.custom_id(i)
        out.append(o)
    return out


def test_claims_are_in_the_database_when_done_and_do_not_close_the_batch(workdir: Path, db: str) -> None:
    """A claim every 10 outcomes: each is committed (in flight in the database) by the time its
    ``done`` is set, while outcomes keep gathering into batches of 50: three outcome commits for
    120 outcomes, every outcome and claim committed, in order of arrival."""
    answers = _answered(120)
    seqs = [o.seq for o in answers]
    seen: list[tuple[str, ...]] = []

    async def go() -> Watched:
        store = await _watched(db, 120)
        recorder = Recorder(store, "r", parts=None, counters=Counters(total=120), batch_size=50, max_delay=30)
        send, receive = anyio.create_memory_object_stream[Outcome | Claim](4)

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(recorder.run, receive)
                async with send:
                    for k in range(0, 120, 10):
                        claim = Claim(seqs[k : k + 10])
                        await send.send(claim)
                        await claim.done.wait()  # as the feeder does: send only what is claimed
                        assert claim.committed
                        got = await store.execute_text(
                            "SELECT DISTINCT state FROM request WHERE seq IN ("
                            + ", ".join(str(seq) for seq in claim.seqs)
                            + ")"
                        )
                        seen.append(tuple(r["state"] for r in got))
                        for o in answers[k : k + 10]:
                            await send.send(o)
            assert recorder.recorded == 120
            assert recorder.counters.succeeded == 120
        finally:
            await store.close()
        return store

    store = anyio.run(go)
    assert seen == [("in_flight",)] * 12
    assert [e[:2] for e in store.log if e[0] == "outcomes"] == [
        ("outcomes", 50),
        ("outcomes", 50),
        ("outcomes", 20),
    ]
    assert (
        sum(e[1] for e in store.log if e[0] == "claims") + sum(e[2] for e in store.log if e[0] == "outcomes")
        == 12
    )
    assert query(db, "SELECT state, COUNT(*) FROM request GROUP BY state") == [("succeeded", 120)]


def test_outcomes_are_committed_whatever_their_kind_and_counted(workdir: Path, db: str) -> None:
    """Every kind of outcome, released claims among them: all are committed; the counters count
    the finished requests, their tokens and cost; pending ones stay pending."""
    every = outcomes.varied(200)

    async def go() -> Recorder:
        store = await _watched(db, 200)
        recorder = Recorder(
            store, "r", parts=None, counters=Counters(total=200), batch_size=64, max_delay=0.01
        )
        send, receive = anyio.create_memory_object_stream[Outcome | Claim](8)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(recorder.run, receive)
                async with send:
                    claim = Claim([o.seq for o in every])
                    await send.send(claim)
                    await claim.done.wait()
                    for i, o in enumerate(every):
                        await send.send(o)
                        if i % 50 == 49:
                            await anyio.sleep(0.03)  # batches closed by time too
                    await send.send(Claim([o.seq for o in every], release=True))  # none in flight
        finally:
            await store.close()
        return recorder

    recorder = anyio.run(go)
    finished = [o for o in every if o.state != "pending"]
    assert recorder.recorded == 200 and recorder.commits >= 4
    assert recorder.counters.succeeded == sum(o.state == "succeeded" for o in finished)
    assert recorder.counters.failed == sum(o.state == "failed" for o in finished)
    assert recorder.counters.tokens == sum(a.usage.total for o in finished for a in o.attempts if a.usage)
    assert recorder.counters.cost_picousd == sum(a.cost_picousd or 0 for o in finished for a in o.attempts)
    states = dict(query(db, "SELECT state, COUNT(*) FROM request GROUP BY state"))
    assert states == {"succeeded": 125, "failed": 25, "pending": 50}
    assert query(db, "SELECT COUNT(*) FROM attempt") == [(sum(len(o.attempts) for o in every),)]


class Failing(Watched):
    def start_outcomes(
        self, rows: OutcomeRows, *, claims: Callable[[], Sequence[tuple[Sequence[int], bool]]] = tuple
    ) -> Awaitable[Recorded]:
        async def refused() -> Recorded:
            raise StorageError("database p.db is locked by another process (is another run using it?)")

        return refused()


def test_a_failed_commit_stops_the_recorder_with_its_error_and_frees_waiting_claims(
    workdir: Path, db: str
) -> None:
    """The database refuses a batch: Recorder.run raises that StorageError (not a group), and
    claims it had not committed are done, marked not committed (no feeder waits forever)."""
    answers = _answered(5)
    claims = [Claim([1000 + i]) for i in range(3)]

    async def go() -> None:
        store = await Failing.open(db_url(db))
        recorder = Recorder(store, "r", parts=None, counters=Counters(total=5), batch_size=100, max_delay=30)
        send, receive = anyio.create_memory_object_stream[Outcome | Claim](16)
        try:
            with send:  # everything is queued and the stream closed: all of it is received
                for o in answers:
                    send.send_nowait(o)
                for c in claims:
                    send.send_nowait(c)
            with pytest.raises(StorageError, match="locked"):
                await recorder.run(receive)
        finally:
            await store.close()

    anyio.run(go)
    assert all(c.done.is_set() for c in claims)
    assert not any(c.committed for c in claims)
