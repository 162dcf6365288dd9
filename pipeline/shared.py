"""Many processes on one run: rate limits and the budget shared through the database.

On PostgreSQL any number of workers (``pipeline worker``, and ``pipeline run`` itself) may
send one run's requests, on any number of machines. What they must respect together lives in
the database, claimed in slices so that the database sees a few statements a second, not one
per request:

* **Rate limits** (:class:`SharedBucket`). Each provider limit (base URL + model) has a
  ``rate_slot`` row holding the next free send time on the database clock (GCRA's
  "theoretical arrival time"). A worker books a slice of ``k`` units at once: the row's time
  moves on by ``k`` intervals, and the worker sends its ``k`` requests at the booked times,
  one interval apart. Slices never overlap, so the sum over all workers is paced at the
  limit, as one process's :class:`~pipeline.limits.Bucket` would be. A slice is as large as
  the number of requests waiting for it (at most half a second's worth), so an idle worker
  books one unit at a time and wastes nothing. Token limits book each request's worst case
  (prompt estimate + output allowance), as providers count ``max_tokens`` against TPM.
* **A 429 slows them all** (:class:`RateNews`): the worker that saw it writes the cooldown
  to the row (and slots are never booked inside it); every worker reads the row at least
  once a second and cools down too. Limits learned from ``x-ratelimit-*`` headers travel
  the same way.
* **The budget** (:class:`SharedBudget`): a worker takes slices of the run's cap; what is
  committed is the cost every worker recorded plus what live workers hold unspent. A worker
  that dies stops holding its slice when its heartbeat goes stale.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable

import anyio

from pipeline.errors import StorageError
from pipeline.limits import WINDOW_S, Bucket, RouteLimiter, _Grant
from pipeline.plan import Budget
from pipeline.store.db import Store

__all__ = ["RateNews", "SharedBucket", "SharedBudget", "new_worker_id", "pid_alive", "this_host"]

log = logging.getLogger("pipeline")

SLICE_S = 0.5  # the most a worker books at once: half a second of the limit
NEWS_EVERY_S = 1.0  # how often a worker reads the other workers' cooldowns and learned limits

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


def this_host() -> str:
    return socket.gethostname()[:255]


def new_worker_id() -> str:
    return f"{this_host()[:40]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class SharedBucket(Bucket):
    """A :class:`Bucket` whose units are booked from the database's ``rate_slot`` row."""

    def __init__(
        self,
        store: Store,
        route_key: str,
        kind: str,
        limit: float,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = anyio.sleep,
    ) -> None:
        super().__init__(limit, WINDOW_S, clock=clock, sleep=sleep)
        self.store = store
        self.route_key = route_key
        self.kind = kind
        self._next = 0.0  # local time of the next booked unit
        self._left = 0.0  # units booked and not yet handed out
        self._waiting = 0
        self.bookings = 0  # database round trips, for the overhead figures

    def seed(self, grants: Iterable[tuple[float, float]]) -> None:
        """The history lives in the database row: nothing to seed."""

    async def acquire(self, amount: float = 1.0) -> _Grant:
        amount = min(float(amount), self.limit)
        self._waiting += 1
        try:
            async with self._lock:
                if self._left < amount:
                    await self._book(amount)
                at = self._next
                self._next += amount * self._interval
                self._left -= amount
                wait = at - self._clock()
                if wait > 0:
                    await self._sleep(wait)
        finally:
            self._waiting -= 1
        return _Grant(self._clock(), amount)

    async def _book(self, amount: float) -> None:
        """Book a new slice: as many units as requests are waiting, at most SLICE_S worth."""
        per_slice = max(1.0, math.floor(self.limit * SLICE_S / self.period))
        units = max(amount, min(per_slice, float(self._waiting)))
        start, db_now, _, _, _ = await self.store.take_rate_slots(
            self.route_key, self.kind, units, self._interval
        )
        self.bookings += 1
        self._next = self._clock() + (start - db_now)
        self._left = units  # what was left of the last slice is given up: it is in the past

    def settle(self, grant: _Grant, actual: float, *, keep_pace: bool = False) -> None:
        """Booked units are spent, whatever the request used (the worst case is booked)."""


class RateNews:
    """One route's news between workers: cooldowns after a 429, limits learned from headers.

    :meth:`publish` is called by the route's limiter (synchronously); :meth:`run` sends what
    was published and reads what others published, at least every ``NEWS_EVERY_S``.
    """

    def __init__(self, store: Store, route_key: str, *, clock: Clock = time.monotonic) -> None:
        self.store = store
        self.route_key = route_key
        self.limiter: RouteLimiter | None = None
        self._clock = clock
        self._cooldown_s = 0.0
        self._rpm: float | None = None
        self._tpm: float | None = None
        self._wake = anyio.Event()
        self.exchanges = 0

    def bucket(self, kind: str, limit: float, clock: Clock, sleep: Sleep) -> Bucket:
        return SharedBucket(self.store, self.route_key, kind, limit, clock=clock, sleep=sleep)

    def publish(self, *, cooldown_s: float = 0.0, rpm: float | None = None, tpm: float | None = None) -> None:
        self._cooldown_s = max(self._cooldown_s, cooldown_s)
        self._rpm = rpm or self._rpm
        self._tpm = tpm or self._tpm
        self._wake.set()

    async def exchange(self) -> None:
        cooldown, rpm, tpm = self._cooldown_s, self._rpm, self._tpm
        self._cooldown_s, self._rpm, self._tpm = 0.0, None, None
        db_now, until, learned_rpm, learned_tpm = await self.store.rate_news(
            self.route_key, cooldown_s=cooldown, learned_rpm=rpm, learned_tpm=tpm
        )
        self.exchanges += 1
        if self.limiter is not None:
            self.limiter.apply_news(until - db_now, learned_rpm, learned_tpm)

    async def run(self) -> None:
        while True:
            with anyio.move_on_after(NEWS_EVERY_S):
                await self._wake.wait()
            self._wake = anyio.Event()
            try:
                await self.exchange()
            except StorageError as exc:  # a slow or lost database must not stop the sending
                log.warning("could not share rate-limit news for %s: %s", self.route_key, exc)


class SharedBudget(Budget):
    """The run's cap held by the database; this worker spends slices of it.

    ``allowance`` is what this worker holds; ``spent`` and ``reserved`` are its own. The
    run-wide figures are in the database (see :meth:`Store.claim_budget`).
    """

    def __init__(self, store: Store, run_id: str, worker_id: str, cap_picousd: int, stale_s: float) -> None:
        super().__init__(cap_picousd=cap_picousd)
        self.store = store
        self.run_id = run_id
        self.worker_id = worker_id
        self.stale_s = stale_s
        self.allowance = 0
        self._lock = anyio.Lock()

    def reserve(self, worst_picousd: int) -> bool:
        if self.spent_picousd + self.reserved_picousd + worst_picousd > self.allowance:
            return False
        self.reserved_picousd += worst_picousd
        return True

    async def acquire(self, worst_picousd: int) -> bool:
        if self.reserve(worst_picousd):
            return True
        async with self._lock:
            if self.reserve(worst_picousd):
                return True
            need = self.spent_picousd + self.reserved_picousd + worst_picousd - self.allowance
            grant = await self.store.claim_budget(
                self.run_id,
                self.worker_id,
                want=max(need, self.cap_picousd // 50),
                need=need,
                cap=self.cap_picousd,
                stale_s=self.stale_s,
            )
            if not grant:
                self.exhausted = True
                return False
            self.allowance += grant
            return self.reserve(worst_picousd)
