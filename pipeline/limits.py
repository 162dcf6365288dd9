"""Per-route limits: concurrency, requests per minute, tokens per minute, shared cooldown.

A :class:`Bucket` guarantees at most ``limit`` units in ANY window of ``period`` seconds (a
sliding-window log) and paces grants evenly (GCRA, with a burst of one second's worth), so a
run neither bursts a minute's quota in its first second nor goes over in any window.
Waiters are served first come, first served (anyio's locks are fair), so a large request is
never starved by small ones. Each waiter computes its delay and sleeps once; nothing polls.

Tokens are reserved before a request is sent (prompt estimate + max output) and settled
with the real usage after it, giving back what was not used. The clock is injectable so
tests need no real sleeping.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio

from pipeline.spec import LimitsSpec

__all__ = ["Bucket", "Permit", "RouteLimiter"]

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class _Grant:
    __slots__ = ("amount", "at", "live")

    def __init__(self, at: float, amount: float) -> None:
        self.at = at
        self.amount = amount
        self.live = True  # still inside the sliding window


class Bucket:
    """At most ``limit`` units per ``period`` seconds, in any window, paced evenly."""

    def __init__(
        self,
        limit: float,
        period: float = 60.0,
        *,
        burst_s: float = 1.0,
        clock: Clock = time.monotonic,
        sleep: Sleep = anyio.sleep,
    ) -> None:
        if limit <= 0:
            raise ValueError("limit must be positive")
        self.limit = float(limit)
        self.period = period
        self._interval = period / self.limit  # seconds per unit
        self._tolerance = max(self._interval, burst_s)  # GCRA burst: one second's worth of units
        self._tat = 0.0  # GCRA theoretical arrival time
        self._log: deque[_Grant] = deque()
        self._used = 0.0
        self._clock = clock
        self._sleep = sleep
        self._lock = anyio.Lock()

    @property
    def used(self) -> float:
        """Units granted in the current window."""
        self._expire(self._clock())
        return self._used

    def _expire(self, now: float) -> None:
        while self._log and self._log[0].at <= now - self.period:
            gone = self._log.popleft()
            gone.live = False
            self._used -= gone.amount

    def _delay(self, now: float, amount: float) -> float:
        self._expire(now)
        wait = max(0.0, self._tat - self._tolerance - now)
        if self._used + amount > self.limit:
            need = self._used + amount - self.limit
            freed = 0.0
            for g in self._log:
                freed += g.amount
                if freed >= need:
                    wait = max(wait, g.at + self.period - now)
                    break
        return wait

    async def acquire(self, amount: float = 1.0) -> _Grant:
        """Wait until ``amount`` units fit, then take them. Amounts over the limit are clamped."""
        amount = min(float(amount), self.limit)
        async with self._lock:
            while True:
                now = self._clock()
                wait = self._delay(now, amount)
                if wait <= 0:
                    break
                await self._sleep(wait)
            grant = _Grant(now, amount)
            self._log.append(grant)
            self._used += amount
            self._tat = max(self._tat, now) + amount * self._interval
            return grant

    def settle(self, grant: _Grant, actual: float) -> None:
        """Replace a reservation with what was really used (may give units back)."""
        actual = min(max(0.0, float(actual)), self.limit)
        delta = actual - grant.amount
        grant.amount = actual
        if grant.live:
            self._used += delta
        self._tat += delta * self._interval


@dataclass
class Permit:
    """What :meth:`RouteLimiter.slot` hands out: settle it with the real token usage."""

    limiter: RouteLimiter
    tokens: _Grant | None

    def settle(self, total_tokens: int | None) -> None:
        if self.tokens is not None and self.limiter.tpm is not None and total_tokens is not None:
            self.limiter.tpm.settle(self.tokens, total_tokens)


class RouteLimiter:
    """Every limit of one route: concurrency, RPM, TPM and a cooldown shared by its requests."""

    def __init__(
        self, limits: LimitsSpec, *, clock: Clock = time.monotonic, sleep: Sleep = anyio.sleep
    ) -> None:
        self.limits = limits
        self.capacity = anyio.CapacityLimiter(limits.concurrency)
        self.rpm = Bucket(limits.rpm, clock=clock, sleep=sleep) if limits.rpm else None
        self.tpm = Bucket(limits.tpm, clock=clock, sleep=sleep) if limits.tpm else None
        self._clock = clock
        self._sleep = sleep
        self._cooldown_until = 0.0

    def cool_down(self, seconds: float) -> None:
        """A 429 slows the whole route, not only the request that saw it."""
        self._cooldown_until = max(self._cooldown_until, self._clock() + seconds)

    @property
    def in_flight(self) -> int:
        return int(self.capacity.borrowed_tokens)

    @asynccontextmanager
    async def slot(self, tokens: int) -> AsyncIterator[Permit]:
        async with self.capacity:
            wait = self._cooldown_until - self._clock()
            if wait > 0:
                await self._sleep(wait)
            if self.rpm is not None:
                await self.rpm.acquire(1)
            grant = await self.tpm.acquire(tokens) if self.tpm is not None else None
            yield Permit(self, grant)
