"""Per-route limits: concurrency, requests per minute, tokens per minute, shared cooldown,
limits learned from the provider, and a circuit breaker.

A :class:`Bucket` guarantees at most ``limit`` units in ANY window of ``period`` seconds (a
sliding-window log) and paces grants evenly (GCRA, with a burst of one second's worth), so a
run neither bursts a minute's quota in its first second nor goes over in any window.
Waiters are served first come, first served (anyio's locks are fair), so a large request is
never starved by small ones. Each waiter computes its delay and sleeps once; nothing polls.

Tokens are reserved before a request is sent (prompt estimate + max output) and settled
with the real usage after it, giving back what was not used. The clock is injectable so
tests need no real sleeping.

Adaptive: a 429 makes the whole route cool down (every request waits, not only the one
that saw it). A route with no configured limit learns it: from ``x-ratelimit-limit-*``
headers when the provider sends them, else from the first 429 (the requests the route
was granted in the last minute are what the provider let through, once that is enough
traffic for a limit to bite). When the headers say
nothing remains, the route waits for the reset instead of collecting 429s.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Protocol

import anyio

from pipeline.records import RateInfo
from pipeline.spec import BreakerSpec, LimitsSpec

__all__ = ["Bucket", "CircuitBreaker", "Permit", "RouteLimiter", "SharedLimit"]

LEARNED_MARGIN = 0.97  # run a learned limit a little under the provider's
# A provider's per-minute window, seen from here: 1% longer than a minute, so that requests
# granted at the edge of our window never arrive inside the provider's (network and event
# loop delays put its clock a little behind ours).
WINDOW_S = 60.6

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class SharedLimit(Protocol):
    """A route's limits shared with other processes (see :mod:`pipeline.shared`)."""

    def bucket(self, kind: str, limit: float, clock: Clock, sleep: Sleep) -> Bucket: ...

    def publish(
        self, *, cooldown_s: float = 0.0, rpm: float | None = None, tpm: float | None = None
    ) -> None: ...


SLOT_S = 0.1  # grants and breaker events are counted by slots this long


class _Grants:
    """The requests a route was granted within one slot of SLOT_S: when, how many, and the
    tokens of those whose usage is known (``settled`` of them)."""

    __slots__ = ("count", "first", "last", "settled", "tokens")

    def __init__(self, at: float) -> None:
        self.first = at
        self.last = at  # the slot counts until its last grant leaves the window
        self.count = 1
        self.tokens = 0
        self.settled = 0


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
        self._lock = anyio.Lock(fast_acquire=True)  # no trip through the loop when free

    def set_limit(self, limit: float) -> None:
        """Change the limit, keeping the window's history (what was already granted counts)."""
        self.limit = float(limit)
        self._interval = self.period / self.limit
        self._tolerance = max(self._interval, 1.0)

    def seed(self, grants: Iterable[tuple[float, float]]) -> None:
        """Count grants made before this bucket existed: (time, amount) pairs."""
        for t, amount in grants:
            self._log.append(_Grant(t, amount))
            self._used += amount

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

    def settle(self, grant: _Grant, actual: float, *, keep_pace: bool = False) -> None:
        """Replace a reservation with what was really used (may give units back).

        ``keep_pace``: give the units back to the window but not to the pacing, so a refused
        request (a 429) does not let the next one through at once."""
        actual = min(max(0.0, float(actual)), self.limit)
        delta = actual - grant.amount
        grant.amount = actual
        if grant.live:
            self._used += delta
        if not (keep_pace and delta < 0):
            self._tat += delta * self._interval


class Permit:
    """What :meth:`RouteLimiter.acquire` hands out: settle it with the real token usage,
    release it when the request is done."""

    __slots__ = ("limiter", "slot", "tokens")

    def __init__(self, limiter: RouteLimiter, tokens: _Grant | None, slot: _Grants | None = None) -> None:
        self.limiter = limiter
        self.tokens = tokens
        self.slot = slot  # the limiter's record of the grants this one is counted in

    def release(self) -> None:
        """Give the concurrency slot back (the rate buckets keep what was granted)."""
        self.limiter.capacity.release()

    def settle(self, total_tokens: int | None) -> None:
        if self.slot is not None and total_tokens is not None:
            self.slot.tokens += total_tokens
            self.slot.settled += 1
        if self.tokens is not None and self.limiter.tpm is not None and total_tokens is not None:
            # 0 means refused (a 429): the provider counted nothing, but keep the pace.
            self.limiter.tpm.settle(self.tokens, total_tokens, keep_pace=total_tokens == 0)


class RouteLimiter:
    """Every limit of one route: concurrency, RPM, TPM and a cooldown shared by its requests."""

    def __init__(
        self,
        limits: LimitsSpec,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = anyio.sleep,
        shared: SharedLimit | None = None,
    ) -> None:
        self.limits = limits
        # Concurrency: a semaphore (no borrower bookkeeping: a third of a CapacityLimiter's
        # CPU per request); acquire_nowait first, so a free slot costs no trip through the loop.
        self.capacity = anyio.Semaphore(limits.concurrency, fast_acquire=True)
        self.shared = shared  # other processes send on the same limits: book through it
        self.rpm = self._bucket("requests", limits.rpm, clock, sleep) if limits.rpm else None
        self.tpm = self._bucket("tokens", limits.tpm, clock, sleep) if limits.tpm else None
        self.learned_rpm: float | None = None  # what the provider told us, when not configured
        self.learned_tpm: float | None = None
        self._clock = clock
        self._sleep = sleep
        self._cooldown_until = 0.0
        # Grants of the last window, always kept (so that a limit learned later starts from
        # what the provider has already counted), gathered by slot of SLOT_S: memory by time,
        # not by rate (one record per request was ~30 MB at 4,500 requests/s).
        self._recent: deque[_Grants] = deque()
        self._granted = 0  # requests in self._recent

    def _bucket(self, kind: str, limit: float, clock: Clock, sleep: Sleep) -> Bucket:
        if self.shared is not None:
            return self.shared.bucket(kind, limit, clock, sleep)
        return Bucket(limit, WINDOW_S, clock=clock, sleep=sleep)

    def cool_down(self, seconds: float, *, publish: bool = True) -> None:
        """A 429 slows the whole route (every process on it, when shared), not only the
        request that saw it."""
        self._cooldown_until = max(self._cooldown_until, self._clock() + seconds)
        if publish and self.shared is not None and seconds > 0:
            self.shared.publish(cooldown_s=seconds)

    @property
    def in_flight(self) -> int:
        return self.limits.concurrency - self.capacity.value

    def _granted_last_minute(self) -> int:
        now = self._clock()
        recent = self._recent
        while recent and recent[0].last <= now - WINDOW_S:
            self._granted -= recent.popleft().count
        return self._granted

    def _note_grant(self) -> _Grants:
        now = self._clock()
        recent = self._recent
        if recent and now - recent[-1].first < SLOT_S:
            slot = recent[-1]
            slot.last = now
            slot.count += 1
        else:
            slot = _Grants(now)
            recent.append(slot)
        self._granted += 1
        self._granted_last_minute()
        return slot

    def _learn_rpm(self, limit: float, *, publish: bool = True) -> None:
        if self.limits.rpm or limit <= 0:
            return
        target = max(1.0, limit * LEARNED_MARGIN)
        if publish and self.shared is not None and self.learned_rpm != target:
            self.shared.publish(rpm=limit)
        if self.rpm is None:
            self.rpm = self._bucket("requests", target, self._clock, self._sleep)
            self.rpm.seed((g.last, float(g.count)) for g in self._recent)
        elif abs(self.rpm.limit - target) > 0.01 * target:
            self.rpm.set_limit(target)
        self.learned_rpm = target

    def _learn_tpm(self, limit: float, *, publish: bool = True) -> None:
        if self.limits.tpm or limit <= 0:
            return
        target = max(1.0, limit * LEARNED_MARGIN)
        if publish and self.shared is not None and self.learned_tpm != target:
            self.shared.publish(tpm=limit)
        if self.tpm is None:
            self.tpm = self._bucket("tokens", target, self._clock, self._sleep)
            self._granted_last_minute()
            known = sum(g.settled for g in self._recent)
            usual = sum(g.tokens for g in self._recent) / known if known else 0.0  # for those in flight
            self.tpm.seed((g.last, g.tokens + (g.count - g.settled) * usual) for g in self._recent)
        elif abs(self.tpm.limit - target) > 0.01 * target:
            self.tpm.set_limit(target)
        self.learned_tpm = target

    def apply_news(self, cooldown_s: float, rpm: float | None, tpm: float | None) -> None:
        """What other processes on the route saw: a 429's cooldown, limits they learned."""
        if cooldown_s > 0:
            self.cool_down(cooldown_s, publish=False)
        if rpm:
            self._learn_rpm(rpm, publish=False)
        if tpm:
            self._learn_tpm(tpm, publish=False)

    def observe(self, rate: RateInfo | None) -> None:
        """Read the provider's rate-limit headers: learn limits, wait out an empty window."""
        if rate is None:
            return
        if rate.limit_requests:
            self._learn_rpm(rate.limit_requests)
        if rate.limit_tokens:
            self._learn_tpm(rate.limit_tokens)
        # "reset" is when the window is whole again (OpenAI's meaning), often a minute away;
        # a request fits again as soon as one unit frees, about 60 s / limit at the steady rate.
        if rate.remaining_requests == 0 and rate.reset_requests_s:
            self.cool_down(min(rate.reset_requests_s, WINDOW_S / max(1, rate.limit_requests or 1)))
        if rate.remaining_tokens == 0 and rate.reset_tokens_s:
            self.cool_down(min(rate.reset_tokens_s, 1.0))

    def rate_limited(self, wait_s: float, rate: RateInfo | None) -> None:
        """A 429: the route cools down; with no limit known, take what got through as the limit."""
        self.cool_down(wait_s)
        if rate is not None and (rate.limit_requests or rate.limit_tokens):
            self.observe(rate)
        elif not self.limits.rpm and self.learned_rpm is None:
            # Without headers, what got through in the last minute is the provider's window
            # (exact for a sliding window), once there was enough traffic for a limit to bite;
            # a 429 after a handful of requests is a fault, not a limit, and only cools down.
            granted = self._granted_last_minute()
            if granted >= max(30, 2 * self.limits.concurrency):
                self._learn_rpm(granted)

    async def acquire(self, tokens: int | Callable[[], int]) -> Permit:
        """A slot to send one request; :meth:`Permit.release` it when the answer is in.
        ``tokens`` (or a function giving them, called only when the route limits tokens) is
        reserved against the TPM bucket.

        The hot path: when the route has room and no limit to wait for, nothing here
        suspends (a send is one request's only trip through the event loop).
        """
        capacity = self.capacity
        try:
            capacity.acquire_nowait()
        except anyio.WouldBlock:
            await capacity.acquire()
        try:
            wait = self._cooldown_until - self._clock()
            if wait > 0:
                await self._sleep(wait)
            if self.rpm is not None:
                await self.rpm.acquire(1)
            grant = None
            if self.tpm is not None:
                grant = await self.tpm.acquire(tokens() if callable(tokens) else tokens)
            # A 429 that arrived while this request waited its turn applies to it too.
            wait = self._cooldown_until - self._clock()
            if wait > 0:
                await self._sleep(wait)
        except BaseException:
            capacity.release()
            raise
        return Permit(self, grant, self._note_grant())

    @asynccontextmanager
    async def slot(self, tokens: int | Callable[[], int]) -> AsyncIterator[Permit]:
        """:meth:`acquire` and release around a block."""
        permit = await self.acquire(tokens)
        try:
            yield permit
        finally:
            permit.release()


class CircuitBreaker:
    """Opens a route whose recent attempts mostly fail, so requests go to their fallbacks.

    Closed: attempts flow; transient failures and successes are counted over ``window_s``.
    When at least ``min_requests`` were seen and the failure share reaches ``failure_rate``,
    it opens for ``cooldown_s``. Then one probe is let through (half-open): its success
    closes the breaker, its failure opens it again for twice as long (at most 10 minutes).
    """

    def __init__(self, spec: BreakerSpec, *, clock: Clock = time.monotonic) -> None:
        self.spec = spec
        self._clock = clock
        # Outcomes of the window, by slot of SLOT_S: [first, last, successes, failures].
        self._events: deque[list[float]] = deque()
        self._failures = 0
        self._seen = 0
        self.state = "closed"
        self._open_until = 0.0
        self._cooldown = spec.cooldown_s
        self._probing = False
        self.opened = 0  # how many times it opened, for the run's log

    def _expire(self, now: float) -> None:
        events = self._events
        while events and events[0][1] <= now - self.spec.window_s:
            _, _, ok, failed = events.popleft()
            self._seen -= int(ok + failed)
            self._failures -= int(failed)

    def allow(self) -> bool:
        """May a request use this route now? (In half-open, only the one probe may.)"""
        if not self.spec.enabled or self.state == "closed":
            return True
        if self.state == "open" and self._clock() >= self._open_until:
            self.state = "half_open"
            self._probing = False
        if self.state == "half_open" and not self._probing:
            self._probing = True
            return True
        return False

    def retry_at(self) -> float:
        """When :meth:`allow` may say yes again (monotonic clock)."""
        return self._open_until if self.state == "open" else self._clock() + 0.05

    def record(self, ok: bool) -> None:
        if not self.spec.enabled:
            return
        now = self._clock()
        if self.state == "half_open":
            self._probing = False
            if ok:
                self.state = "closed"
                self._cooldown = self.spec.cooldown_s
                self._clear()
            else:
                self._open(now, self._cooldown * 2)
            return
        if self.state == "open":
            return
        self._expire(now)
        events = self._events
        if events and now - events[-1][0] < SLOT_S:
            slot = events[-1]
            slot[1] = now
        else:
            slot = [now, now, 0.0, 0.0]
            events.append(slot)
        self._seen += 1
        if ok:
            slot[2] += 1
        else:
            slot[3] += 1
            self._failures += 1
        n = self._seen
        if n >= self.spec.min_requests and self._failures / n >= self.spec.failure_rate:
            self._open(now, self._cooldown)

    def _open(self, now: float, cooldown: float) -> None:
        self.state = "open"
        self._cooldown = min(cooldown, 600.0)
        self._open_until = now + self._cooldown
        self._clear()
        self.opened += 1

    def _clear(self) -> None:
        self._events.clear()
        self._failures = 0
        self._seen = 0
