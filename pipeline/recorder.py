"""The single writer: takes finished requests from a stream, commits them in batches.

Workers never touch the database; they send :class:`~pipeline.records.Outcome` objects
here. The feeder sends :class:`Claim` messages on the same stream: a page of requests is
marked in flight *before* any of them is sent, so after a crash the database names every
request that may have been paid for without a recorded answer.

A batch closes when it holds ``batch_size`` outcomes or ``max_delay`` seconds after its first
one, so a busy run commits rarely and a quiet one still commits promptly. Two tasks share the
work: one gathers messages and builds each closed batch's rows (the SQL statements, and the
result rows of the Parquet parts) while the other commits the previous batch, so the
database's thread and the event loop work at the same time. A claim does not close the batch
being gathered: it goes straight to the committing task, which commits it at once in a small
transaction of its own (with the other claims that came meanwhile; in the batch's transaction
when a batch is waiting too) and sets ``claim.done`` once it is in the database. After each
commit the batch's result rows go to the Parquet part writer (derived output; parts are
written in the background, off the event loop) and the counters. The recorder knows nothing
of HTTP.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream

from pipeline.outputs import PartWriter, ResultRows, result_rows
from pipeline.progress import Counters
from pipeline.records import Outcome
from pipeline.store.db import OutcomeRows, Store

__all__ = ["Claim", "Recorder"]

# While the recorder runs: how long a thread waiting for the GIL waits before it asks for it.
SWITCH_INTERVAL_S = 0.0005


@dataclass
class Claim:
    """Mark requests in flight (``release=False``) or give unsent ones back (``release=True``).

    ``done`` is set once the claim is committed (``committed``), or once the recorder has
    stopped without committing it: it failed, ``committed`` stays False and the run stops."""

    custom_ids: Sequence[str]
    release: bool = False
    done: anyio.Event = field(default_factory=anyio.Event)
    committed: bool = False


@dataclass
class _Batch:
    rows: OutcomeRows  # what the transaction writes
    finished: list[Outcome]  # the outcomes that end their request (not "pending")
    results: ResultRows | None  # their result rows, for the Parquet parts


class Recorder:
    def __init__(
        self,
        store: Store,
        run_id: str,
        *,
        parts: PartWriter | None,
        counters: Counters,
        batch_size: int = 1024,
        max_delay: float = 0.2,
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
        self._claims: list[Claim] = []
        self._ready: deque[_Batch] = deque()  # built, waiting for the committing task
        self._more = anyio.Event()  # the committing task has something to do
        self._room = anyio.Event()  # the committing task took a batch
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
            for claim in self._claims:  # never committed: the recorder failed
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
        """Build the batch's rows (while the previous batch commits), then queue it."""
        finished = [o for o in outcomes if o.state != "pending"]
        batch = _Batch(
            rows=self.store.outcome_rows(self.run_id, outcomes, owner=self.owner),
            finished=finished,
            results=result_rows(finished) if self.parts is not None and finished else None,
        )
        while self._ready:  # one batch waits at most: memory stays bounded
            self._room = anyio.Event()
            await self._room.wait()
        self._ready.append(batch)
        self._more.set()

    # -- committing (the database's side) ----------------------------------------------------

    async def _commit_all(self, tg: TaskGroup) -> None:
        while True:
            if self._ready:
                # Claims waiting go in the same transaction (they would wait for it anyway).
                claims, self._claims = self._claims, []
                batch = self._ready.popleft()
                self._room.set()
                await self._commit(batch, claims, tg)
            elif self._claims:
                claims, self._claims = self._claims, []
                await self._commit_claims(claims)
            elif self._ended:
                return
            else:
                self._more = anyio.Event()
                await self._more.wait()

    async def _commit_claims(self, claims: list[Claim]) -> None:
        with anyio.CancelScope(shield=True):
            try:
                await self.store.claim_pages(self.run_id, [(c.custom_ids, c.release) for c in claims])
                for c in claims:
                    c.committed = True
            finally:
                for c in claims:
                    c.done.set()
        self.claim_commits += 1

    async def _commit(self, batch: _Batch, claims: list[Claim], tg: TaskGroup) -> None:
        with anyio.CancelScope(shield=True):  # a received outcome is never dropped half-way
            try:
                pages = [(c.custom_ids, c.release) for c in claims]
                recorded = await self.store.write_outcomes(batch.rows, claims=pages)
                for c in claims:
                    c.committed = True
            finally:
                for c in claims:
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


@contextmanager
def _prompt_switches() -> Iterator[None]:
    """The database's thread takes the GIL back after each statement it runs; while the event
    loop is busy it waits for it, by default up to 5 ms each time (``sys.getswitchinterval``),
    about as long as SQLite's work on the statement. With 0.5 ms, it gets the GIL back about as
    soon as it asks (``bench/recorder.py``). The interpreter's interval is as it was afterwards."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(min(before, SWITCH_INTERVAL_S))
    try:
        yield
    finally:
        sys.setswitchinterval(before)
