"""One request's walk along its fallback chain: limits -> client -> policy -> next route.

On each route, tenacity repeats the attempt while the classification table says *retry*
(waiting the server's ``Retry-After`` or an exponential backoff with full jitter), up to the
per-route and per-request caps. *fallback* (or retries spent) moves to the next route;
*fail* ends the request; *stop_endpoint* takes the whole endpoint out of service for the
run. Every attempt is kept for the recorder; nothing here touches the database.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import anyio
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

from pipeline.answers import check_answer, output_limit
from pipeline.client import ChatClient
from pipeline.errors import InvalidResponse, RateLimited, RequestError
from pipeline.limits import CircuitBreaker, RouteLimiter
from pipeline.plan import Budget
from pipeline.policy import Action, classify, retry_delay
from pipeline.pricing import PriceBook
from pipeline.records import Attempt, Completion, Outcome, Usage
from pipeline.spec import PolicySpec, RetrySpec, RouteSpec
from pipeline.store.db import utcnow
from pipeline.tokens import estimate_prompt_tokens

__all__ = ["EndpointState", "Route", "Task", "Worker"]

DEFAULT_OUTPUT_RESERVE = 1024  # tokens reserved against TPM for the answer when max_tokens is unset
UNKNOWN_OUTPUT_LIMIT = 16_384  # budget worst case when max_tokens is unset and the model is unknown


class _OverBudget(Exception):
    """The budget cannot cover this attempt's worst case."""


class _Resting:
    """_on_route's answer when the route's breaker opened during the retries."""


_RESTING = _Resting()


class _EndpointStopped(Exception):
    """The endpoint was stopped (bad key, no credit) while this request waited for a slot."""


@dataclass
class EndpointState:
    """Shared by every route of one endpoint: once it refuses us, nobody sends to it."""

    name: str
    stopped: str | None = None  # the reason, once stopped
    rule: str | None = None


@dataclass
class Route:
    spec: RouteSpec
    client: ChatClient
    limiter: RouteLimiter
    endpoint: EndpointState
    base_url: str
    breaker: CircuitBreaker
    provider: str | None = None


class Task(NamedTuple):
    """A request handed to a worker (a NamedTuple: one is built per request, see records.py)."""

    seq: int
    custom_id: str
    body: dict[str, Any]
    record: dict[str, Any] | None = None
    prior_attempts: int = 0  # attempts recorded by earlier sessions of the run
    recover: dict[str, str] | None = None  # metadata to look the answer up at the provider first


class _Walk:
    """One request's way along its routes: its attempts so far."""

    __slots__ = ("_prompt_tokens", "attempts", "max_output", "n", "task")

    def __init__(self, task: Task) -> None:
        self.task = task
        self.attempts: list[Attempt] = []
        self.max_output: int | None = None  # max_tokens x n, when the request sets it
        self.n = 1
        self._prompt_tokens: int | None = None

    @property
    def prompt_tokens(self) -> int:
        """Counted on first use: only token limits and budgets need it (tiktoken costs ~50 us)."""
        if self._prompt_tokens is None:
            self._prompt_tokens = estimate_prompt_tokens(self.task.body)
        return self._prompt_tokens

    def tokens(self) -> int:
        """The TPM reservation: the prompt plus the whole output allowance."""
        return self.prompt_tokens + (self.max_output or DEFAULT_OUTPUT_RESERVE * self.n)

    @property
    def next_no(self) -> int:
        return self.task.prior_attempts + len(self.attempts) + 1


class Worker:
    """Processes tasks; holds no per-request state between calls."""

    def __init__(
        self,
        routes: list[Route],
        *,
        retry: RetrySpec,
        policy: PolicySpec,
        prices: PriceBook,
        budget: Budget | None = None,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        self.routes = routes
        self.retry = retry
        self.policy = policy
        self.prices = prices
        self.budget = budget
        self._sleep = sleep
        prices.prepare(r.spec.model for r in routes)

    def usable(self) -> bool:
        """Is any route still open? (False once every endpoint refused us.)"""
        return any(r.endpoint.stopped is None for r in self.routes)

    def may_dispatch(self) -> bool:
        return self.usable() and not (self.budget is not None and self.budget.exhausted)

    def worst_case_picousd(self, route: Route, prompt_tokens: int, output_tokens: int) -> int | None:
        """The most one attempt on ``route`` can cost (None when its price is unknown).

        The prompt estimate gets a 25% margin: tokenizers differ from characters / 4.
        """
        prompt = prompt_tokens * 5 // 4 + 16
        usage = Usage(prompt=prompt, completion=output_tokens, total=prompt + output_tokens)
        return self.prices.cost(route.spec.model, usage, provider=route.provider, at=utcnow()).picousd

    async def process(self, task: Task) -> Outcome:
        """One request along its routes, under its deadline."""
        recovered = await self._recovered(task)
        if recovered is not None:
            return recovered
        walk = _Walk(task)
        with anyio.move_on_after(self.retry.deadline_s):
            return await self._walk(walk)
        return self._timed_out(walk)

    async def serve(
        self, take: Callable[[], Awaitable[Task | None]], give: Callable[[Outcome], Awaitable[None]]
    ) -> None:
        """:meth:`process` every task ``take`` gives until it gives None, each outcome to ``give``.

        One cancel scope serves request after request, its deadline moved to each one's: a
        scope per request (anyio's bookkeeping and timer) costs ~8 us, a fifth of the
        worker's own CPU per request. Only a deadline that passes opens a new scope.
        """
        walk: _Walk | None = None
        outcome: Outcome | None = None
        while True:
            with anyio.CancelScope() as scope:
                while (task := await take()) is not None:
                    outcome = await self._recovered(task)  # a lookup, not under the deadline
                    if outcome is None:
                        walk = _Walk(task)
                        scope.deadline = anyio.current_time() + self.retry.deadline_s
                        outcome = await self._walk(walk)
                        scope.deadline = math.inf
                        if scope.cancel_called:  # the deadline passed as it ended: hand it on outside
                            break
                    await give(outcome)
                    walk = outcome = None
                else:
                    return
            if outcome is None:  # the deadline cancelled the walk
                assert walk is not None
                outcome = self._timed_out(walk)
            await give(outcome)
            walk = outcome = None

    async def _recovered(self, task: Task) -> Outcome | None:
        return None if task.recover is None else await self._recover(task, task.recover)

    async def _walk(self, walk: _Walk) -> Outcome:
        """The request's walk along its routes (the caller sets the deadline)."""
        body = walk.task.body
        allowance = body.get("max_completion_tokens") or body.get("max_tokens")
        walk.n = int(body.get("n") or 1)
        walk.max_output = int(allowance) * walk.n if allowance else None

        last_error: str | None = None
        todo = list(self.routes)
        while todo:
            blocked: list[Route] = []
            for route in todo:
                if route.endpoint.stopped is not None:
                    continue
                if len(walk.attempts) >= self.retry.max_attempts_per_request:
                    break
                if not route.breaker.allow():  # open: this route is resting; try the next
                    blocked.append(route)
                    continue
                try:
                    action, message = await self._on_route(route, walk)
                except _OverBudget:
                    # Not the request's fault: it stays pending for a run with a larger budget.
                    return self._outcome(walk, "pending", "budget cap reached")
                if action is None:
                    return self._outcome(walk, "succeeded")
                last_error = message
                if action is _RESTING:
                    blocked.append(route)
                    continue
                if action is Action.FAIL:
                    return self._outcome(walk, "failed", message)
                # RETRY with retries spent, FALLBACK, STOP_ENDPOINT: on to the next route
            if not blocked or len(walk.attempts) >= self.retry.max_attempts_per_request:
                break
            # Every other route is spent: wait for a resting route to take a probe.
            await self._sleep(max(0.0, min(r.breaker.retry_at() for r in blocked) - time.monotonic()))
            todo = blocked
        if not walk.attempts or (walk.attempts[-1].outcome == Action.STOP_ENDPOINT and not self.usable()):
            # Not the request's fault: every endpoint refused us. Leave it for a later run.
            return self._outcome(walk, "pending", last_error)
        return self._outcome(walk, "failed", last_error or "every route failed")

    def _timed_out(self, walk: _Walk) -> Outcome:
        """The request's deadline passed during its walk."""
        if walk.attempts and walk.attempts[-1].outcome == "pending":
            walk.attempts[-1].outcome = "deadline"
            walk.attempts[-1].error_class = "deadline"
            walk.attempts[-1].error_message = "request deadline reached during the attempt"
        return self._outcome(walk, "failed", f"deadline of {self.retry.deadline_s:g}s exceeded")

    async def _recover(self, task: Task, metadata: dict[str, str]) -> Outcome | None:
        """A request that was in flight when an earlier session died: if the provider stored
        its answer, take that instead of paying again."""
        seen: set[str] = set()
        for route in self.routes:
            if route.endpoint.name in seen or route.endpoint.stopped is not None:
                continue
            seen.add(route.endpoint.name)
            completion = await route.client.find_stored(metadata)
            if completion is None:
                continue
            walk = _Walk(task)
            a = Attempt(
                attempt_no=walk.next_no,
                endpoint=route.spec.endpoint,
                base_url=route.base_url,
                model=completion.model or route.spec.model,
                started_at=utcnow(),
                http_status=200,
                outcome="recovered",
            )
            walk.attempts.append(a)
            self._keep(route, a, completion)
            return self._outcome(walk, "succeeded")
        return None

    def _outcome(self, walk: _Walk, state: str, error: str | None = None) -> Outcome:
        t = walk.task
        return Outcome(t.seq, t.custom_id, state, walk.attempts, error, t.record, t.prior_attempts)

    async def _on_route(self, route: Route, walk: _Walk) -> tuple[Action | _Resting | None, str | None]:
        """Attempts on one route. (None, None) on success, else (the final action, message).

        The first attempt runs bare: most succeed, and tenacity's machinery costs more CPU
        per request than the rest of the worker. Its retries run under tenacity with the same
        rules (stop, wait, retry) as functions of the failure.
        """
        start = len(walk.attempts)
        try:
            await self._attempt(route, walk)
            return None, None
        except _EndpointStopped:
            return Action.STOP_ENDPOINT, route.endpoint.stopped
        except RequestError as exc:
            first = exc

        def retryable(e: BaseException) -> bool:
            return isinstance(e, RequestError) and classify(e, self.policy).action is Action.RETRY

        def should_stop(exc: BaseException | None) -> bool:
            invalid = sum(1 for a in walk.attempts if a.error_class == "invalid_output")
            return (
                invalid > self.policy.invalid_answer_retries
                or not self._grow_output(walk, exc)
                or len(walk.attempts) - start >= self.retry.max_attempts_per_route
                or len(walk.attempts) >= self.retry.max_attempts_per_request
                or route.endpoint.stopped is not None
                or route.breaker.state == "open"
            )

        def delay_for(exc: BaseException | None) -> float:
            delay = retry_delay(exc, len(walk.attempts) - start, self.retry)
            if isinstance(exc, RateLimited):
                route.limiter.rate_limited(delay, exc.rate)  # the route waits, retried or not
            return delay

        delay = delay_for(first)
        if not retryable(first) or should_stop(first):
            return self._route_failed(route, walk, first)
        walk.attempts[-1].wait_s = delay
        await self._sleep(delay)

        def outcome(rs: RetryCallState) -> BaseException | None:
            return rs.outcome.exception() if rs.outcome else None

        def before_sleep(rs: RetryCallState) -> None:
            # tenacity asks for the wait before deciding to stop: record it only when slept.
            if rs.next_action is not None and walk.attempts:
                walk.attempts[-1].wait_s = rs.next_action.sleep

        retrying = AsyncRetrying(
            stop=lambda rs: should_stop(outcome(rs)),
            wait=lambda rs: delay_for(outcome(rs)),
            retry=retry_if_exception(retryable),
            before_sleep=before_sleep,
            sleep=self._sleep,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    await self._attempt(route, walk)
        except _EndpointStopped:
            return Action.STOP_ENDPOINT, route.endpoint.stopped
        except RequestError as exc:
            return self._route_failed(route, walk, exc)
        return None, None

    def _route_failed(
        self, route: Route, walk: _Walk, exc: RequestError
    ) -> tuple[Action | _Resting | None, str | None]:
        """What the last failure on a route means for the request (the table's action)."""
        verdict = classify(exc, self.policy)
        if verdict.action is Action.STOP_ENDPOINT and route.endpoint.stopped is None:
            route.endpoint.stopped = f"endpoint {route.endpoint.name} ({route.base_url}): {exc.message}"
            route.endpoint.rule = verdict.rule
        if verdict.action is Action.RETRY:
            if route.breaker.state == "open":  # the route is resting: come back after it
                return _RESTING, exc.message
            walk.attempts[-1].outcome = "retries_spent"
            if verdict.rule in ("invalid_output", "reasoning_exhausted"):
                return Action.FAIL, exc.message  # the model's answers, not the route, failed
        return verdict.action, exc.message

    async def _attempt(self, route: Route, walk: _Walk) -> Completion:
        sent_before = len(walk.attempts)
        reserved = 0
        if self.budget is not None:
            output = walk.max_output
            if output is None:  # unset: the model's limit (its context window), as a provider could bill it
                window = self.prices.context_window(route.spec.model, provider=route.provider)
                output = (window or UNKNOWN_OUTPUT_LIMIT) * walk.n
            reserved = self.worst_case_picousd(route, walk.prompt_tokens, output) or 0
            if not await self.budget.acquire(reserved):
                raise _OverBudget
        try:
            completion = await self._send(route, walk)
            done = walk.attempts[-1]
            try:
                done.parsed = check_answer(walk.task.body, completion)
            except InvalidResponse as exc:  # billed, but not an answer this request can use
                done.validation_error = exc.message
                self._fail(route, done, exc)
                raise
        except RequestError as exc:
            verdict = classify(exc, self.policy)
            if not isinstance(exc, RateLimited):  # a 429's wait is set in _on_route
                route.limiter.observe(exc.rate)
            if verdict.rule in ("invalid_output", "reasoning_exhausted"):
                route.breaker.record(True)  # the route answered; the answer was the trouble
            elif verdict.action is Action.RETRY and verdict.rule != "rate_limited":
                route.breaker.record(False)
            raise
        else:
            route.limiter.observe(completion.rate)
            route.breaker.record(True)
            return completion
        finally:
            if self.budget is not None:
                last = walk.attempts[-1] if len(walk.attempts) > sent_before else None
                self.budget.settle(reserved, (last.cost_picousd or 0) if last else 0)

    async def _send(self, route: Route, walk: _Walk) -> Completion:
        # streamed when the route says so, or the row asks for it itself
        stream = route.spec.stream or walk.task.body.get("stream") is True
        a = Attempt(walk.next_no, route.spec.endpoint, route.base_url, route.spec.model, utcnow())
        a.stream = stream
        walk.attempts.append(a)
        t0 = time.perf_counter()
        permit = await route.limiter.acquire(walk.tokens)
        try:
            if route.endpoint.stopped is not None:  # it stopped while we waited for a slot
                walk.attempts.remove(a)
                raise _EndpointStopped
            t1 = time.perf_counter()
            if t1 - t0 > 0.001:  # it waited for its slot: it starts now
                a.started_at = utcnow()
            try:
                completion, status = await route.client.complete(
                    route.spec.model, walk.task.body, stream=stream
                )
                a.latency_ms = (time.perf_counter() - t1) * 1000.0
                a.http_status = status
                self._keep(route, a, completion)
                if stream:
                    a.note_stream(completion)
                permit.settle(completion.usage.total if completion.usage else None)
                if (
                    completion.choices[0].finish_reason == "content_filter"
                    and self.policy.content_filter != "accept"
                ):
                    err = InvalidResponse(
                        "the provider's content filter stopped the answer", code="content_filter"
                    )
                    err.completion = completion
                    raise err
            except RequestError as exc:
                if a.latency_ms is None:
                    a.latency_ms = (time.perf_counter() - t1) * 1000.0
                self._fail(route, a, exc)
                a.note_stream(a.completion)  # a broken stream: what arrived is kept, partial
                if isinstance(exc, RateLimited):
                    permit.settle(0)  # a 429 consumed nothing
                raise
        finally:
            permit.release()
        a.outcome = "success"
        return completion

    def _grow_output(self, walk: _Walk, exc: BaseException | None) -> bool:
        """Before retrying an answer whose reasoning ate max_tokens, raise max_tokens.

        False when it is already at the cap (no point asking again)."""
        if not (isinstance(exc, InvalidResponse) and exc.code == "reasoning_exhausted"):
            return True
        cap = output_limit(walk.task.body)
        if cap is None or cap[1] >= self.policy.max_tokens_cap:
            return False
        key, value = cap
        bigger = min(self.policy.max_tokens_cap, int(value * self.policy.max_tokens_growth))
        walk.task = walk.task._replace(body={**walk.task.body, key: bigger})
        walk.max_output = bigger * walk.n
        return True

    def _keep(self, route: Route, a: Attempt, completion: Completion) -> None:
        a.completion = completion
        a.usage = completion.usage
        a.provider_request_id = completion.provider_request_id
        cost = self.prices.cost(route.spec.model, completion.usage, provider=route.provider, at=a.started_at)
        a.cost_picousd, a.cost_source, a.cost_note = cost.picousd, cost.source, cost.note

    def _fail(self, route: Route, a: Attempt, exc: RequestError) -> None:
        verdict = classify(exc, self.policy)
        a.outcome = verdict.action.value
        a.error_class = verdict.rule
        a.error_message = exc.message[:2000]
        a.http_status = exc.status if exc.status is not None else a.http_status
        a.retry_after_s = exc.retry_after
        a.provider_request_id = exc.provider_request_id
        if exc.completion is not None and a.completion is None:
            self._keep(route, a, exc.completion)
