"""The single writer: takes finished requests from a stream, commits them in batches.

Workers never touch the database; they send :class:`~pipeline.records.Outcome` objects
here. The feeder sends :class:`Claim` messages on the same stream: a page of requests is
marked in flight *before* any of them is sent, so after a crash the database names every
request that may have been paid for without a recorded answer.

A batch closes when it holds ``batch_size`` outcomes or ``max_delay`` seconds after its first
one, so a busy run commits rarely and a quiet one still commits promptly. Building a batch's
rows holds the event loop (~4-5 us an outcome), and answers that arrive meanwhile wait for it:
with 0.2 s, a run at 2,400 requests/s (100 ms latency, 256 concurrent) built ~500 at a time,
its requests took 105.3-105.8 ms on average against the mock's 100 and sent 2,409 a second;
with 0.05 s, 103.1-103.6 ms and 2,452-2,468 a second. A run too fast for that still fills
batches (``bench/recorder.py`` fills every one).

Two tasks share the work: one gathers messages, builds each closed batch's rows (the SQL
statements, and the result rows of the Parquet parts) and begins its transaction
(``Store.start_outcomes``: on SQLite it is queued for the database's thread, which takes it as
soon as the batch before it is committed), while the other waits for the batches' commits, in
order, and does what follows each. So the database's thread and the event loop work at the
same time, and the database's thread does not wait for the event loop between batches. At most
two batches are begun and not yet done (one committing, one queued): memory stays bounded. A
claim does not close the batch being gathered: it is committed in the next transaction to
start (a batch's, which takes the claims waiting as it starts, or one of claims alone when no
batch is begun), and ``claim.done`` is set once it is in the database. After each commit the
batch's result rows go to the Parquet part writer (derived output; parts are written in the
background, off the event loop) and the counters. The recorder knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import sys
from collections import deque
from collections.abc import Awaitable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from pipeline.outputs import PartWriter, ResultRows, result_rows
from pipeline.progress import Counters
from pipeline.records import Outcome
from pipeline.store.db import OutcomeRows, Recorded, Store

__all__ = ["Claim", "Recorder", "hand_on"]

# While the recorder runs: how long a thread waiting for the GIL waits before it asks for it.
SWITCH_INTERVAL_S = 0.00002


@dataclass
class Claim:
    """Mark requests in flight (``release=False``) or give unsent ones back (``release=True``).

    ``done`` is set once the claim is committed (``committed``), or once the recorder has
    stopped without committing it: it failed, ``committed`` stays False and the run stops."""

    seqs: Sequence[int]  # the requests' positions in the input
    release: bool = False
    done: anyio.Event = field(default_factory=anyio.Event)
    committed: bool = False


# Batches begun and not yet done: one committing, one queued behind it.
IN_FLIGHT = 2


@dataclass
class _Batch:
    rows: OutcomeRows  # what the transaction writes
    finished: list[Outcome]  # the outcomes that end their request (not "pending")
    results: ResultRows | None  # their result rows, for the Parquet parts
    committing: Awaitable[Recorded] | None = None  # its transaction, once begun
    claims: list[Claim] = field(default_factory=list)  # the claims it took as it started


class Recorder:
    def __init__(
        self,
        store: Store,
        run_id: str,
        *,
        parts: PartWriter | None,
        counters: Counters,
        batch_size: int = 1024,
        max_delay: float = 0.05,
        owner: str | None = None,
        flush_at_end: bool = True,
    ) -> None:
        self.store = store
        # False: the session consolidates what is still buffered itself (PartWriter.take)
        self.flush_at_end = flush_at_end
        self.owner = owner  # the worker's id, when several workers share the run
        self.run_id = run_id
        self.parts = parts
        self.counters = counters
        self.batch_size = batch_size
        self.max_delay = max_delay
        self.commits = 0  # transactions with outcomes
        self.claim_commits = 0  # transactions with claims only
        self.recorded = 0
        # Waiting for a transaction. Taken on the database's thread (Store.start_outcomes):
        # a deque, whose append and popleft are atomic.
        self._claims: deque[Claim] = deque()
        self._begun: deque[_Batch] = deque()  # transactions begun, in order, not yet done
        self._more = anyio.Event()  # the committing task has something to do
        self._room = anyio.Event()  # the committing task finished a batch
        self._ended = False
        self._flushing = False

    async def run(self, messages: MemoryObjectReceiveStream[Outcome | Claim]) -> None:
        """Consume until the stream closes; every received outcome is committed, in order.
        A failure (a StorageError) is raised as it is, not in an exception group."""
        try:
            with _prompt_switches():
                async with messages, anyio.create_task_group() as tg:
                    tg.start_soon(self._commit_all, tg)
                    await self._gather(messages)
                    self._ended = True
                    self._more.set()
        except BaseExceptionGroup as group:
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        finally:
            # never committed: the recorder failed (a batch's transaction may still run)
            for batch in self._begun:
                _abandon(batch.committing)
                for claim in batch.claims:
                    claim.done.set()
            for claim in self._claims:
                claim.done.set()
        if self.parts is not None and self.flush_at_end:
            await self.parts.flush()

    # -- gathering (the stream's side) -------------------------------------------------------

    async def _gather(self, messages: MemoryObjectReceiveStream[Outcome | Claim]) -> None:
        while True:
            try:
                first = await messages.receive()
            except anyio.EndOfStream:
                return
            if isinstance(first, Claim):
                self._claim(first)
                continue
            batch = [first]
            ended = False
            with anyio.move_on_after(self.max_delay):
                while len(batch) < self.batch_size:
                    try:
                        # what is already queued is taken without a trip through the event loop
                        msg = messages.receive_nowait()
                    except anyio.WouldBlock:
                        try:
                            msg = await messages.receive()
                        except anyio.EndOfStream:
                            ended = True
                            break
                    except anyio.EndOfStream:
                        ended = True
                        break
                    if isinstance(msg, Claim):
                        # A claim never waits for the batch: the feeder is blocked on it. Its
                        # requests cannot be in this batch (they are sent only once the claim
                        # is committed), so the order of the two is free.
                        self._claim(msg)
                    else:
                        batch.append(msg)
            await self._hand(batch)
            if ended:
                return

    def _claim(self, claim: Claim) -> None:
        self._claims.append(claim)
        self._more.set()

    async def _hand(self, outcomes: list[Outcome]) -> None:
        """Build the batch's rows (while the batch before commits), then begin its transaction."""
        finished = [o for o in outcomes if o.state != "pending"]
        batch = _Batch(
            rows=self.store.outcome_rows(self.run_id, outcomes, owner=self.owner),
            finished=finished,
            results=result_rows(finished) if self.parts is not None and finished else None,
        )
        while len(self._begun) >= IN_FLIGHT:
            self._room = anyio.Event()
            await self._room.wait()
        taken = batch.claims
        waiting = self._claims

        def claims() -> list[tuple[Sequence[int], bool]]:
            """As the transaction starts: the claims waiting go in it (they would wait for it)."""
            _take(waiting, taken)
            return [(c.seqs, c.release) for c in taken]

        batch.committing = self.store.start_outcomes(batch.rows, claims=claims)
        self._begun.append(batch)
        self._more.set()

    # -- committing (the database's side) ----------------------------------------------------

    async def _commit_all(self, tg: TaskGroup) -> None:
        while True:
            if self._begun:
                await self._commit(self._begun[0], tg)
                self._begun.popleft()
                self._room.set()
            elif self._claims:
                await self._commit_claims()
            elif self._ended:
                return
            else:
                self._more = anyio.Event()
                await self._more.wait()

    async def _commit_claims(self) -> None:
        claims: list[Claim] = []
        _take(self._claims, claims)
        with anyio.CancelScope(shield=True):
            try:
                await self.store.claim_pages(self.run_id, [(c.seqs, c.release) for c in claims])
                for c in claims:
                    c.committed = True
            finally:
                for c in claims:
                    c.done.set()
        self.claim_commits += 1

    async def _commit(self, batch: _Batch, tg: TaskGroup) -> None:
        assert batch.committing is not None
        with anyio.CancelScope(shield=True):  # a received outcome is never dropped half-way
            try:
                recorded = await batch.committing
                for c in batch.claims:
                    c.committed = True
            finally:
                batch.committing = None
                for c in batch.claims:
                    c.done.set()
        self.commits += 1
        self.recorded += len(batch.rows.outcomes)
        finished, results = batch.finished, batch.results
        if recorded.kept or recorded.totals:
            # ``kept``: another worker's answer was recorded first; ours is only billed.
            # ``totals``: requests attempted before; their sums are the database's.
            finished = [o for o in finished if o.custom_id not in recorded.kept]
            if results is not None:
                results = result_rows(finished, recorded.totals)
        counters = self.counters
        for o in finished:
            if o.state == "succeeded":
                counters.succeeded += 1
            else:
                counters.failed += 1
            for a in o.attempts:
                if a.usage is not None:
                    counters.tokens += a.usage.total
                if a.cost_picousd is not None:
                    counters.cost_picousd += a.cost_picousd
        if self.parts is None or results is None or not self.parts.add(results) or self._flushing:
            return
        if self._ended and not self.flush_at_end:
            return  # the last batch: the session takes what is buffered (PartWriter.take)
        self._flushing = True
        tg.start_soon(self._flush_parts)

    async def _flush_parts(self) -> None:
        """Write due parts in the background (one at a time), while batches go on committing."""
        assert self.parts is not None
        try:
            while self.parts.due:
                await self.parts.flush()
        finally:
            self._flushing = False


def _take(waiting: deque[Claim], into: list[Claim]) -> None:
    """Move the claims waiting to ``into``, one atomic popleft at a time (the database's thread
    and the event loop may both take)."""
    while True:
        try:
            into.append(waiting.popleft())
        except IndexError:
            return


def _abandon(committing: Awaitable[Recorded] | None) -> None:
    """A batch's transaction nobody will wait for: not begun (a coroutine) is not begun at all;
    queued (a future) runs, its outcome read so that asyncio does not report it."""
    if isinstance(committing, Coroutine):
        committing.close()
    elif isinstance(committing, asyncio.Future):
        committing.add_done_callback(lambda f: f.cancelled() or f.exception())


async def hand_on(send: MemoryObjectSendStream[Outcome | Claim], message: Outcome | Claim) -> None:
    """Give the recorder a message as a worker does: at once while the stream has room (anyio's
    ``send()`` always makes a trip through the event loop first, ~8 us here), else waiting for
    room."""
    try:
        send.send_nowait(message)
    except anyio.WouldBlock:
        await send.send(message)


@contextmanager
def _prompt_switches() -> Iterator[None]:
    """The database's thread takes the GIL back after each statement it runs; while the event
    loop is busy it waits for it, by default up to 5 ms each time (``sys.getswitchinterval``),
    about as long as SQLite's work on the statement, and the database's thread is the
    recorder's critical path (in a transaction all the time, on the CPU two thirds of it). With
    20 us it gets the GIL back about as soon as it asks: ``bench/recorder.py``'s outcomes, 4
    interleaved rounds of 200,000 each, medians 98,600/s at 0.5 ms, 105,500 at 0.1 ms, 113,000
    at 20 us; a whole run against the zero-latency mock (one core) was not slower (5 pairs).
    The event loop pays a switch only when another thread asks for the GIL. The interpreter's
    interval is as it was afterwards."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(min(before, SWITCH_INTERVAL_S))
    try:
        yield
    finally:
        sys.setswitchinterval(before)
