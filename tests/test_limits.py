"""Unit tests of the rate limiter, on a fake clock whose sleep moves time forward (no real waiting)."""

from __future__ import annotations

import random
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from pipeline.limits import LEARNED_MARGIN, SLOT_S, WINDOW_S, Bucket, CircuitBreaker, RouteLimiter
from pipeline.records import RateInfo
from pipeline.spec import BreakerSpec, LimitsSpec


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FakeClock:
    """A clock that only moves when someone sleeps; each sleep jumps it forward by the delay."""

    def __init__(self, max_sleeps: int = 100_000) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []
        self.max_sleeps = max_sleeps

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if len(self.sleeps) > self.max_sleeps:
            raise AssertionError("the limiter keeps sleeping: it never grants (a deadlock or a busy loop)")
        self.now += max(0.0, seconds)
        await anyio.lowlevel.checkpoint()


def bucket(limit: float, period: float = 60.0) -> tuple[Bucket, FakeClock]:
    clock = FakeClock()
    return Bucket(limit, period, clock=clock, sleep=clock.sleep), clock


def heaviest_window(grants: list[tuple[float, float]], period: float) -> float:
    """The largest total granted in any half-open window [t, t + period) that starts at a grant."""
    return max(sum(a for u, a in grants if t <= u < t + period) for t, _ in grants)


async def acquire_all(b: Bucket, clock: FakeClock, amounts: list[float]) -> list[tuple[float, float]]:
    """Acquire every amount from concurrent tasks started in order; return (grant time, amount)."""
    grants: list[tuple[float, float]] = []

    async def one(amount: float) -> None:
        await b.acquire(amount)
        grants.append((clock.now, amount))

    async with anyio.create_task_group() as tg:
        for amount in amounts:
            tg.start_soon(one, amount)
            await anyio.lowlevel.checkpoint()
    return grants


@pytest.mark.parametrize(
    ("limit", "period", "amounts"),
    [
        pytest.param(60, 60.0, [1.0] * 200, id="rpm-60"),
        pytest.param(7, 10.0, [1.0] * 50, id="rpm-odd-period"),
        pytest.param(6000, 60.0, [1.0] * 300, id="rpm-large-limit"),
        pytest.param(
            1000, 60.0, [float(random.Random(7).randint(1, 400)) for _ in range(80)], id="tpm-mixed-amounts"
        ),
        pytest.param(1024, 64.0, [float(a) for a in range(1, 120)], id="tpm-growing-amounts"),
    ],
)
@pytest.mark.anyio
async def test_grants_never_exceed_the_limit_in_any_window(
    limit: float, period: float, amounts: list[float]
) -> None:
    """Over many acquisitions, no window of ``period`` seconds holds more than ``limit`` units."""
    b, clock = bucket(limit, period)
    grants = await acquire_all(b, clock, amounts)
    assert len(grants) == len(amounts)
    assert heaviest_window(grants, period) <= limit + 1e-9
    if sum(amounts) > limit:
        # the limit really bound: the grants had to spread over more than one window
        assert max(t for t, _ in grants) >= period * (sum(amounts) / limit - 1) - 1e-9


@pytest.mark.anyio
async def test_grants_are_paced_not_burst_at_the_start() -> None:
    """With a large limit the grants spread over the period (a one-second burst at most), not all at t=0."""
    b, clock = bucket(480, 60.0)  # 8 per second, one every 0.125 s
    grants = await acquire_all(b, clock, [1.0] * 480)
    times = [t for t, _ in grants]
    assert sum(1 for t in times if t == 0.0) <= 1 + 480 / 60
    assert times == sorted(times)
    assert times[-1] >= 55.0
    # and no second of the run gets more than a second's worth plus the burst
    assert heaviest_window(grants, 1.0) <= 2 * 480 / 60 + 1


@pytest.mark.anyio
async def test_large_request_is_not_starved_by_small_ones_queued_after_it() -> None:
    """Waiters are served first come, first served: a big reservation goes before later small ones."""
    b, clock = bucket(100, 60.0)
    await b.acquire(95)  # the window is nearly full; small requests would fit long before a big one
    order: list[tuple[str, float]] = []

    async def take(name: str, amount: float) -> None:
        await b.acquire(amount)
        order.append((name, clock.now))

    async with anyio.create_task_group() as tg:
        tg.start_soon(take, "big", 100.0)
        await anyio.lowlevel.checkpoint()
        for i in range(5):
            tg.start_soon(take, f"small-{i}", 5.0)
            await anyio.lowlevel.checkpoint()

    assert [name for name, _ in order] == ["big"] + [f"small-{i}" for i in range(5)]
    big_at = order[0][1]
    assert big_at >= 60.0
    assert all(at >= big_at for _, at in order)


@pytest.mark.anyio
async def test_settle_gives_back_unused_tokens_so_the_next_request_goes_sooner() -> None:
    """Settling a reservation to the real usage frees the difference for the next request."""
    control, control_clock = bucket(1000, 60.0)
    await control.acquire(1000)
    await control.acquire(500)
    unsettled_wait = control_clock.now

    b, clock = bucket(1000, 60.0)
    grant = await b.acquire(1000)
    b.settle(grant, 100)
    assert b.used == 100
    await b.acquire(500)

    assert unsettled_wait >= 60.0
    assert clock.now < unsettled_wait / 2


@pytest.mark.anyio
async def test_settle_after_the_grant_left_the_window_does_not_change_usage() -> None:
    """Settling a grant that already expired from the window leaves the window's count alone."""
    b, clock = bucket(100, 60.0)
    old = await b.acquire(50)
    clock.now = 61.0
    await b.acquire(10)
    b.settle(old, 0)
    assert b.used == 10


@pytest.mark.anyio
async def test_amounts_over_the_limit_are_clamped_without_deadlock() -> None:
    """A request for more than the whole limit is clamped to the limit and still granted, every time."""
    b, clock = bucket(100, 60.0)
    first = await b.acquire(250)
    second = await b.acquire(250)
    assert (first.amount, second.amount) == (100.0, 100.0)
    assert clock.now >= 60.0


def test_bucket_rejects_a_non_positive_limit() -> None:
    """A bucket needs a positive limit (0 means "no bucket" one level up)."""
    with pytest.raises(ValueError, match="positive"):
        Bucket(0)


@pytest.mark.anyio
async def test_cool_down_delays_the_next_slot() -> None:
    """After cool_down(s) the route's next slot opens no earlier than s seconds later; a shorter
    cooldown does not cut a longer one short."""
    clock = FakeClock()
    limiter = RouteLimiter(LimitsSpec(concurrency=4), clock=clock, sleep=clock.sleep)
    limiter.cool_down(5.0)
    limiter.cool_down(1.0)
    async with limiter.slot(10):
        opened = clock.now
    async with limiter.slot(10):
        reopened = clock.now
    assert opened >= 5.0
    assert reopened == opened


@pytest.mark.anyio
async def test_slot_without_cooldown_or_limits_opens_at_once() -> None:
    """With no rpm/tpm and no cooldown a slot never sleeps."""
    clock = FakeClock()
    limiter = RouteLimiter(LimitsSpec(concurrency=2), clock=clock, sleep=clock.sleep)
    async with limiter.slot(1000) as permit:
        permit.settle(10)
    assert clock.sleeps == []
    assert limiter.rpm is None and limiter.tpm is None


@pytest.mark.anyio
async def test_concurrency_never_exceeds_the_limit() -> None:
    """Many tasks through one route never have more than ``concurrency`` slots open at once."""
    clock = FakeClock()
    limiter = RouteLimiter(LimitsSpec(concurrency=3), clock=clock, sleep=clock.sleep)
    inside = 0
    peak = 0
    seen_in_flight: set[int] = set()

    async def request() -> None:
        nonlocal inside, peak
        async with limiter.slot(1):
            inside += 1
            peak = max(peak, inside)
            seen_in_flight.add(limiter.in_flight)
            for _ in range(3):
                await anyio.lowlevel.checkpoint()
            inside -= 1

    async with anyio.create_task_group() as tg:
        for _ in range(40):
            tg.start_soon(request)

    assert peak == 3
    assert max(seen_in_flight) == 3
    assert limiter.in_flight == 0


@pytest.mark.anyio
async def test_route_limiter_keeps_rpm_and_tpm_in_every_window() -> None:
    """Requests through a route with rpm and tpm stay within both in every minute."""
    clock = FakeClock()
    limiter = RouteLimiter(LimitsSpec(rpm=30, tpm=2000, concurrency=8), clock=clock, sleep=clock.sleep)
    rng = random.Random(3)
    reserved = [rng.randint(50, 300) for _ in range(60)]
    grants: list[tuple[float, float]] = []
    used: list[tuple[float, float]] = []

    async def request(tokens: int) -> None:
        async with limiter.slot(tokens) as permit:
            grants.append((clock.now, 1.0))
            actual = tokens // 2
            used.append((clock.now, float(actual)))
            permit.settle(actual)

    async with anyio.create_task_group() as tg:
        for tokens in reserved:
            tg.start_soon(request, tokens)

    assert len(grants) == 60
    assert heaviest_window(grants, 60.0) <= 30
    assert heaviest_window(used, 60.0) <= 2000
    assert max(t for t, _ in grants) >= 60.0


@pytest.mark.anyio
async def test_permit_settle_returns_tokens_to_the_route() -> None:
    """Settling a permit with the real usage gives the rest of the reservation back to the TPM bucket."""
    clock = FakeClock()
    limiter = RouteLimiter(LimitsSpec(tpm=1000), clock=clock, sleep=clock.sleep)
    async with limiter.slot(800) as permit:
        assert limiter.tpm is not None and limiter.tpm.used == 800
        permit.settle(120)
    assert limiter.tpm.used == 120


# --- adaptive limits: learned from headers and 429s -------------------------------------------


def route(limits: LimitsSpec) -> tuple[RouteLimiter, FakeClock]:
    clock = FakeClock()
    return RouteLimiter(limits, clock=clock, sleep=clock.sleep), clock


async def _take(limiter: RouteLimiter, n: int, tokens: int = 1) -> None:
    for _ in range(n):
        async with limiter.slot(tokens):
            pass


def test_headers_teach_an_unconfigured_route_its_limits_a_little_under_the_provider() -> None:
    """x-ratelimit-limit-requests/-tokens set the route's buckets at 97% when none is configured."""
    limiter, _ = route(LimitsSpec(concurrency=4))
    assert limiter.rpm is None and limiter.tpm is None
    limiter.observe(RateInfo(limit_requests=1200, limit_tokens=100_000))
    assert limiter.rpm is not None and limiter.rpm.limit == pytest.approx(1164)
    assert limiter.tpm is not None and limiter.tpm.limit == pytest.approx(97_000)


def test_headers_never_override_a_configured_limit() -> None:
    """A limit set in the spec is the user's word: headers do not change it."""
    limiter, _ = route(LimitsSpec(rpm=100, concurrency=4))
    limiter.observe(RateInfo(limit_requests=5000))
    assert limiter.rpm is not None and limiter.rpm.limit == 100


@pytest.mark.anyio
async def test_an_empty_window_in_the_headers_makes_the_route_wait_for_one_slot_not_the_whole_reset() -> None:
    """remaining-requests 0: wait until one request frees (60 s / limit), never past the reset."""
    limiter, clock = route(LimitsSpec(concurrency=4))
    limiter.observe(RateInfo(limit_requests=1200, remaining_requests=0, reset_requests_s=40.0))
    await _take(limiter, 1)
    assert 0.04 < clock.now < 0.06  # 60.6 s / 1200: the next free slot, not 40 s
    slow, slow_clock = route(LimitsSpec(concurrency=4))
    slow.observe(RateInfo(limit_requests=10, remaining_requests=0, reset_requests_s=2.5))
    await _take(slow, 1)
    assert slow_clock.now == pytest.approx(2.5)  # the reset comes first


@pytest.mark.anyio
async def test_a_429_cools_down_the_whole_route() -> None:
    """After a 429 with a 3 s wait, every request of the route waits, not only the one that saw it."""
    limiter, clock = route(LimitsSpec(concurrency=4))
    limiter.rate_limited(3.0, None)
    await _take(limiter, 3)
    assert clock.now >= 3.0
    assert limiter.rpm is None  # a 429 after a handful of requests teaches no limit


@pytest.mark.anyio
async def test_a_429_after_real_traffic_teaches_the_limit_from_what_got_through() -> None:
    """With no headers, a 429 after 200 grants in the minute sets the route near 200/min."""
    limiter, _ = route(LimitsSpec(concurrency=8))
    await _take(limiter, 200)
    limiter.rate_limited(1.0, None)
    assert limiter.rpm is not None and limiter.rpm.limit == pytest.approx(194)
    assert limiter.rpm.used == 200  # the window remembers what was already sent


# --- circuit breaker ---------------------------------------------------------------------------


def breaker(**kw: Any) -> tuple[CircuitBreaker, FakeClock]:
    clock = FakeClock()
    spec = BreakerSpec(**{"failure_rate": 0.5, "min_requests": 4, "window_s": 30.0, "cooldown_s": 10.0, **kw})
    return CircuitBreaker(spec, clock=clock), clock


def test_breaker_opens_when_most_recent_attempts_fail() -> None:
    """Half or more of at least min_requests failing opens it; it then refuses requests."""
    b, _ = breaker()
    for ok in (True, False, False, True):
        assert b.allow()
        b.record(ok)
    assert b.state == "open" and not b.allow()


def test_breaker_needs_enough_samples_and_forgets_old_ones() -> None:
    """Three failures are not enough with min 4; failures older than the window do not count."""
    b, clock = breaker()
    for _ in range(3):
        b.record(False)
    assert b.state == "closed"
    clock.now += 31
    b.record(True)
    b.record(False)
    assert b.state == "closed"


def test_breaker_half_opens_for_one_probe_whose_success_closes_it() -> None:
    """After the cooldown one probe passes (others wait); its success closes the breaker."""
    b, clock = breaker()
    for _ in range(4):
        b.record(False)
    clock.now += 10
    assert b.allow() and b.state == "half_open"
    assert not b.allow()  # only one probe at a time
    b.record(True)
    assert b.state == "closed" and b.allow()


def test_a_failed_probe_reopens_the_breaker_for_twice_as_long() -> None:
    """A failed probe opens it again, and the rest grows: 10 s, then 20 s."""
    b, clock = breaker()
    for _ in range(4):
        b.record(False)
    clock.now += 10
    assert b.allow()
    b.record(False)
    assert b.state == "open" and b.retry_at() == pytest.approx(clock.now + 20)


def test_a_disabled_breaker_never_opens() -> None:
    """[breaker] enabled = false: every request may use the route."""
    b, _ = breaker(enabled=False)
    for _ in range(50):
        b.record(False)
    assert b.allow()


@pytest.mark.anyio
async def test_a_429_arriving_while_a_request_waits_its_turn_still_delays_it() -> None:
    """The cooldown is checked again once the request's turn comes, not only before it queues."""
    limiter, clock = route(LimitsSpec(rpm=60, concurrency=4))
    await _take(limiter, 2)  # the burst: the next grant is paced a second later
    assert clock.sleeps == []

    async def refuse_meanwhile() -> None:
        while not clock.sleeps:  # until the request waits its turn in the bucket
            await anyio.lowlevel.checkpoint()
        limiter.cool_down(5.0)

    async with anyio.create_task_group() as tg:
        tg.start_soon(refuse_meanwhile)
        await _take(limiter, 1)
    turn = WINDOW_S / 60  # one request's share of the window
    assert clock.sleeps == pytest.approx([turn, 5.0])  # its turn, then the cooldown begun meanwhile
    assert clock.now == pytest.approx(turn + 5.0)


def test_a_refused_request_gives_its_tokens_back_but_not_its_pace() -> None:
    """settle(0) after a 429 frees the window's units while the pacing stays where it was."""
    b, _ = bucket(600)
    grant = anyio.run(b.acquire, 100.0)
    tat = b._tat
    b.settle(grant, 0, keep_pace=True)
    assert b.used == 0 and b._tat == tat


@pytest.mark.anyio
async def test_the_grants_history_grows_with_time_not_with_the_request_rate() -> None:
    """10,000 grants over 10 s are remembered by slot: ~100 records, every grant counted,
    and a limit learned from a 429 then is what got through; after the window, nothing."""
    limiter, clock = route(LimitsSpec(concurrency=4))
    for _ in range(10_000):
        await _take(limiter, 1)
        clock.now += 0.001
    assert len(limiter._recent) <= 10 / SLOT_S + 1
    assert limiter._granted_last_minute() == 10_000
    limiter.rate_limited(1.0, None)
    assert limiter.rpm is not None and limiter.rpm.limit == pytest.approx(10_000 * LEARNED_MARGIN)
    assert limiter.rpm.used == pytest.approx(10_000)  # the new bucket counts what was sent
    clock.now += WINDOW_S + 1
    assert limiter._granted_last_minute() == 0 and not limiter._recent
