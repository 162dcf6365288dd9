"""The single writer: takes finished requests from a stream, commits them in batches.

Workers never touch the database; they send :class:`~pipeline.records.Outcome` objects
here. The feeder sends :class:`Claim` messages on the same stream: a page of requests is
marked in flight (one commit for the page) *before* any of them is sent, so after a crash
the database names every request that may have been paid for without a recorded answer.

A batch closes when it holds ``batch_size`` outcomes or ``max_delay`` seconds after
its first one, so a busy run commits rarely and a quiet one still commits promptly. After
each commit the same rows go to the Parquet part writer (derived output) and the counters.
The recorder knows nothing of HTTP.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from pipeline.outputs import PartWriter, outcome_result
from pipeline.progress import Counters
from pipeline.records import Outcome
from pipeline.store.db import Store

__all__ = ["Claim", "Recorder"]


@dataclass
class Claim:
    """Mark requests in flight (``release=False``) or give unsent ones back (``release=True``)."""

    custom_ids: Sequence[str]
    release: bool = False
    done: anyio.Event = field(default_factory=anyio.Event)


class Recorder:
    def __init__(
        self,
        store: Store,
        run_id: str,
        *,
        parts: PartWriter | None,
        counters: Counters,
        batch_size: int = 1000,
        max_delay: float = 0.2,
        owner: str | None = None,
    ) -> None:
        self.store = store
        self.owner = owner  # the worker's id, when several workers share the run
        self.run_id = run_id
        self.parts = parts
        self.counters = counters
        self.batch_size = batch_size
        self.max_delay = max_delay
        self.commits = 0
        self.recorded = 0

    async def run(self, messages: MemoryObjectReceiveStream[Outcome | Claim]) -> None:
        """Consume until the stream closes; every received message is committed, in order."""
        async with messages:
            while True:
                try:
                    first = await messages.receive()
                except anyio.EndOfStream:
                    break
                if isinstance(first, Claim):
                    await self.claim(first)
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
                            # A claim never waits for the batch: the feeder is blocked on it.
                            # Its requests cannot be in this batch (they are sent only once
                            # the claim is committed), so the order of the two is free.
                            await self.claim(msg)
                        else:
                            batch.append(msg)
                await self.commit(batch)
                if ended:
                    break
        if self.parts is not None:
            await self.parts.flush()

    async def claim(self, claim: Claim) -> None:
        with anyio.CancelScope(shield=True):
            try:
                await self.store.claim(self.run_id, claim.custom_ids, release=claim.release)
            finally:
                claim.done.set()

    async def commit(self, batch: list[Outcome]) -> None:
        with anyio.CancelScope(shield=True):  # a received outcome is never dropped half-way
            kept = await self.store.record_outcomes(self.run_id, batch, owner=self.owner)
            self.commits += 1
            self.recorded += len(batch)
            # ``kept``: another worker's answer was recorded first; ours is only billed
            finished = [o for o in batch if o.state != "pending" and o.custom_id not in kept]
            for o in finished:
                if o.state == "succeeded":
                    self.counters.succeeded += 1
                else:
                    self.counters.failed += 1
                for a in o.attempts:
                    if a.usage is not None:
                        self.counters.tokens += a.usage.total
                    if a.cost_picousd is not None:
                        self.counters.cost_picousd += a.cost_picousd
            if self.parts is not None and finished:
                due = self.parts.add(outcome_result(o) for o in finished)
                if due:
                    await self.parts.flush()
