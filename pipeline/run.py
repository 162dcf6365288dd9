"""Wires the stages of a run in one task group::

    input file --submit--> request table --feeder--> workers --outcomes--> recorder --> SQLite
                                                                                   └--> Parquet parts

*Submit* validates every row and loads the run's requests into the database in one
transaction: a bad row (with ``on_bad_row = "stop"``) leaves nothing behind but the run
marked rejected, and nothing is sent. The *feeder* streams pending requests from the
database in input order into a bounded stream, so memory stays flat whatever the input's
size, and a rerun of the same run naturally sends only what is not done. The *workers*
walk each request's fallback chain; the *recorder* is the only writer.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import signal
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import Any

import anyio
import httpx
import orjson
import pyarrow as pa
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from pipeline.client import ChatClient
from pipeline.collector import fewer_collections
from pipeline.errors import InputError, RunStateError, SpecError, StorageError
from pipeline.inputs import Row, RowSource, file_sha256
from pipeline.limits import CircuitBreaker, RouteLimiter
from pipeline.outputs import PartWriter, consolidate, write_results
from pipeline.plan import Budget
from pipeline.pricing import PriceBook, picousd, usd
from pipeline.progress import Counters, Display
from pipeline.recorder import Claim, Recorder, hand_on
from pipeline.records import Outcome
from pipeline.shared import RateNews, SharedBudget, new_worker_id, pid_alive, this_host
from pipeline.spec import JobSpec, MockSpec, RouteSpec, db_display, resolve_api_key
from pipeline.store.db import DuplicateRequestId, Store, utcnow
from pipeline.transport import AiohttpTransport
from pipeline.worker import EndpointState, Route, Task, Worker

__all__ = ["RunSummary", "SubmitSummary", "execute", "results_dir", "submit", "work"]

log = logging.getLogger("pipeline")
FINAL_STATES = ("succeeded", "failed", "rejected")
SUBMIT_BATCH = 1000
FEED_PAGE = 1000
DEFAULT_LEASE_S = 60.0  # a worker's claims last this long unless renewed (every quarter of it)


@dataclass(frozen=True)
class RunSummary:
    run_id: str
    job: str
    state: str
    exit_code: int
    counts: Mapping[str, int]
    message: str
    results: Path | None
    db: str
    sent: int = 0
    totals: Mapping[str, int | None] = field(default_factory=dict)


@dataclass(frozen=True)
class SubmitSummary:
    run_id: str
    job: str
    counts: Mapping[str, int]
    already_loaded: bool
    db: str


def results_dir(out: Path, job: str, run_id: str) -> Path:
    return out / job / run_id


async def execute(
    spec: JobSpec,
    *,
    display: Display | None = None,
    environ: Mapping[str, str] | None = None,
    retry_failed: bool = False,
    transport: httpx.AsyncBaseTransport | None = None,
    handle_signals: bool = True,
    lease_s: float = DEFAULT_LEASE_S,
) -> RunSummary:
    """Run (or resume) a job to its end: submit, then work. Raises UserError before anything
    is sent. On a database shared by several workers (PostgreSQL) this process is one more
    worker: it claims leases like ``pipeline worker`` does."""
    keys = _keys(spec, environ)  # a missing key must stop us before the database is touched
    source = _source(spec)
    input_hash = await anyio.to_thread.run_sync(file_sha256, spec.input.path)
    async with AsyncExitStack() as stack:
        store = await Store.open(spec.db_url)
        stack.push_async_callback(store.close)
        run_id, _ = await _load(store, spec, source, input_hash)
        return await _session(
            stack,
            store,
            spec,
            run_id,
            keys,
            display=display,
            retry_failed=retry_failed,
            transport=transport,
            handle_signals=handle_signals,
            lease_s=lease_s,
        )
    raise AssertionError("unreachable")  # pragma: no cover (AsyncExitStack does not swallow)


async def submit(spec: JobSpec) -> SubmitSummary:
    """Load a run's requests into the database, for workers to send. Idempotent: a rerun
    with the same input finds them loaded; a changed input is refused as ``run`` refuses it."""
    source = _source(spec)
    input_hash = await anyio.to_thread.run_sync(file_sha256, spec.input.path)
    store = await Store.open(spec.db_url)
    try:
        run_id, loaded_now = await _load(store, spec, source, input_hash)
        if loaded_now:
            await store.update_run(run_id, state="submitted")
        counts = await store.state_counts(run_id)
    finally:
        await store.close()
    return SubmitSummary(
        run_id=run_id, job=spec.job, counts=counts, already_loaded=not loaded_now, db=db_display(spec.db)
    )


async def work(
    db: str,
    *,
    run_id: str | None = None,
    spec: JobSpec | None = None,
    out: Path | None = None,
    display: Display | None = None,
    environ: Mapping[str, str] | None = None,
    retry_failed: bool = False,
    handle_signals: bool = True,
    lease_s: float = DEFAULT_LEASE_S,
) -> list[RunSummary]:
    """``pipeline worker``: claim and send requests of submitted runs until none is left.

    ``run_id`` None: every loaded run with requests left, oldest first. ``spec`` (a spec
    file) overrides the sending setup stored with the run (endpoints, limits, retries...).
    """
    from pipeline.spec import db_url, spec_from_record

    store = await Store.open(db_url(db))
    summaries: list[RunSummary] = []
    try:
        if not store.shared:
            raise RunStateError(
                f"database {db_display(db)}: workers share a run through a database server; "
                "use PostgreSQL (--db postgresql+asyncpg://...), or 'pipeline run' with SQLite"
            )
        done: set[str] = set()
        while True:
            row = await _next_run(store, run_id, retry_failed, done)
            if row is None:
                break
            done.add(row["run_id"])
            if spec is not None and spec.job != row["job"]:
                raise RunStateError(f"run {row['run_id']!r} belongs to job {row['job']!r}, not {spec.job!r}")
            if spec is None:
                stored = orjson.loads(row["spec_json"])
                run_spec = spec_from_record(stored, db=db, out=out or Path(stored.get("out") or "out"))
            else:
                run_spec = replace(spec, db=db, out=out or spec.out)
            keys = _keys(run_spec, environ)
            async with AsyncExitStack() as stack:
                summaries.append(
                    await _session(
                        stack,
                        store,
                        run_spec,
                        row["run_id"],
                        keys,
                        display=display,
                        retry_failed=retry_failed,
                        transport=None,
                        handle_signals=handle_signals,
                        lease_s=lease_s,
                    )
                )
            if summaries[-1].state == "interrupted" or run_id is not None:
                break
    finally:
        await store.close()
    return summaries


async def _next_run(
    store: Store, run_id: str | None, retry_failed: bool, done: set[str]
) -> dict[str, Any] | None:
    if run_id is not None:
        row = await store.get_run(run_id)
        if row is None or not row["loaded"]:
            raise RunStateError(
                f"no submitted run {run_id!r} in the database (load it with 'pipeline submit SPEC')"
            )
        return row
    states = _send_states(retry_failed)
    for row in await store.list_runs():
        if row["run_id"] in done or not row["loaded"] or row["state"] == "rejected":
            continue
        counts = await store.state_counts(row["run_id"])
        if any(counts.get(st) for st in states):
            return row
    return None


def _send_states(retry_failed: bool) -> tuple[str, ...]:
    """The request states a session sends: what is not done, and failed ones when asked."""
    return ("pending", "in_flight", "failed") if retry_failed else ("pending", "in_flight")


def _keys(spec: JobSpec, environ: Mapping[str, str] | None) -> dict[str, str | None]:
    used = {r.endpoint for r in spec.routes}
    return {name: resolve_api_key(spec.endpoints[name], environ) for name in used}


def _source(spec: JobSpec) -> RowSource:
    return RowSource(
        spec.input,
        template=spec.template,
        defaults=spec.request_defaults,
        models=frozenset(r.model for r in spec.routes),
    )


async def _load(store: Store, spec: JobSpec, source: RowSource, input_hash: str) -> tuple[str, bool]:
    """Create the run (or find it) and load its requests once; returns the run id and
    whether its requests were loaded now (False: an earlier session loaded them)."""
    run_id = spec.run_id or spec.job
    existing = await store.get_run(run_id)
    if spec.new_run and existing is not None:
        run_id = await _fresh_run_id(store, run_id)
        existing = None
    if existing is not None and existing["job"] != spec.job:
        raise RunStateError(f"run id {run_id!r} belongs to job {existing['job']!r}; choose another --run-id")
    if existing is not None and existing["loaded"] and existing["input_sha256"] != input_hash:
        what = await _first_change(store, run_id, source)
        raise RunStateError(
            f"{spec.input.path}: the input changed since run {run_id!r} loaded it ({what}); "
            "pass --new-run to start a fresh run, or --run-id NAME"
        )
    if existing is None:
        await store.create_run(
            run_id=run_id,
            job=spec.job,
            spec_json=orjson.dumps(spec.redacted()).decode(),
            input_path=str(spec.input.path),
            input_sha256=input_hash,
            state="created",
        )
    if existing is None or not existing["loaded"]:
        await store.update_run(run_id, input_sha256=input_hash)
        try:
            await _submit(store, spec, run_id, source)
        except InputError as exc:
            await store.update_run(
                run_id, state="rejected", error=str(exc), exit_code=2, finished_at=utcnow()
            )
            raise
        return run_id, True
    return run_id, False


async def _session(
    stack: AsyncExitStack,
    store: Store,
    spec: JobSpec,
    run_id: str,
    keys: Mapping[str, str | None],
    *,
    display: Display | None,
    retry_failed: bool,
    transport: httpx.AsyncBaseTransport | None,
    handle_signals: bool,
    lease_s: float,
) -> RunSummary:
    """Send what is left of one run. Alone on SQLite; one of many workers on PostgreSQL."""
    states = _send_states(retry_failed)
    out_dir = results_dir(spec.out, spec.job, run_id)
    keep = spec.template.keep_columns if spec.template else None
    records = spec.template is not None or bool(spec.input.messages_column or spec.input.body_column)
    lease = _Lease(new_worker_id(), lease_s) if store.shared else None
    rows_before = 0  # in results.parquet when the session starts
    if lease is None:
        # What earlier sessions finished goes in results.parquet; this session's go in parts.
        finished_before = [s for s in FINAL_STATES if s not in states]
        parts = PartWriter(out_dir / "parts", keep_columns=keep)
        parts.clear()
        rows_before = await _write_results(store, run_id, out_dir, keep, finished_before, records)
    else:  # each worker writes its own parts; results.parquet is built when the run is done
        parts = PartWriter(out_dir / "parts" / lease.worker_id, keep_columns=keep)
        await store.register_worker(lease.worker_id, run_id, this_host(), os.getpid())
        await _end_dead_workers(store, run_id)

    mock_url = await _start_mock(stack, spec)
    transport = transport or AiohttpTransport(max_connections=sum(r.limits.concurrency for r in spec.routes))
    stack.push_async_callback(transport.aclose)
    news = {r.key: RateNews(store, _rate_key(spec, r, mock_url)) for r in spec.routes} if lease else {}
    routes = _routes(spec, keys, transport, mock_url, news)
    for route in routes:
        stack.push_async_callback(route.client.aclose)
    prices = PriceBook(spec.prices)
    budget = await _budget(store, spec, run_id, routes, prices, lease)
    worker = Worker(routes, retry=spec.retry, policy=spec.policy, prices=prices, budget=budget)

    before = await store.state_counts(run_id)
    counters = Counters(total=sum(before.get(s, 0) for s in states))
    recorder = Recorder(
        store,
        run_id,
        parts=parts,
        counters=counters,
        owner=lease.worker_id if lease else None,
        flush_at_end=lease is not None,  # alone on the run, _final_results takes the last rows
    )
    await store.update_run(run_id, state="running", started_at=utcnow(), error=None)
    who = f" as worker {lease.worker_id}" if lease else ""
    log.info("run %s: %d requests to send (database %s)%s", run_id, counters.total, db_display(spec.db), who)
    plan = _Dispatch(
        run_id=run_id,
        states=states,
        recover_stored=spec.recover_stored,
        in_flight_before=before.get("in_flight", 0),
        grace_s=spec.grace_s,
        lease=lease,
        news=list(news.values()),
    )
    if plan.in_flight_before and lease is None:
        log.warning(
            "run %s: %d requests were in flight when the last session stopped; %s",
            run_id,
            plan.in_flight_before,
            "looking their answers up at the provider first"
            if spec.recover_stored
            else "they are sent again (the provider may have answered them already)",
        )

    try:
        with fewer_collections():
            await _dispatch(store, plan, worker, recorder, counters, display, handle_signals)
    finally:
        if lease is not None:
            with anyio.CancelScope(shield=True):
                await store.finish_worker(lease.worker_id)
    interrupted = plan.interrupted

    counts, totals = await store.tallies(run_id)
    state, code, message = _verdict(counts, interrupted, worker, totals)
    left = any(counts.get(s) for s in ("pending", "in_flight"))
    if lease is None:
        await _final_results(store, run_id, out_dir, keep, records, parts, counts, rows_before)
        parts.clear()
    elif not left:  # the run is done: results.parquet holds every worker's answers
        await _write_results(store, run_id, out_dir, keep, FINAL_STATES, records)
        await _clear_parts(store, run_id, out_dir / "parts")
    # The run's verdict, unless other workers are still at it (then the last one gives it).
    if lease is None or not left or not await store.live_workers(run_id):
        await store.update_run(
            run_id, state=state, exit_code=code, finished_at=utcnow(), error=message or None
        )
    return RunSummary(
        run_id=run_id,
        job=spec.job,
        state=state,
        exit_code=code,
        counts=counts,
        message=message,
        results=out_dir / "results.parquet",
        db=db_display(spec.db),
        sent=recorder.recorded,
        totals=totals,
    )


async def _clear_parts(store: Store, run_id: str, folder: Path) -> None:
    """The run is done: remove the part files of every finished worker (ours, and those of
    workers that died here); a worker still finishing removes its own when it ends."""
    finished = {w["worker_id"] for w in await store.workers(run_id) if w["finished_at"] is not None}

    def clear() -> None:
        if folder.is_dir():
            for sub in folder.iterdir():
                if sub.name in finished:
                    shutil.rmtree(sub, ignore_errors=True)
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty

    await anyio.to_thread.run_sync(clear)


async def _end_dead_workers(store: Store, run_id: str) -> None:
    """Workers of this run on this machine whose process is gone: their leases end now
    (a crashed ``pipeline run`` resumes at once; other machines' wait for the lease)."""
    host = this_host()
    dead = [w["worker_id"] for w in await store.live_workers(run_id, host) if not pid_alive(int(w["pid"]))]
    if dead:
        freed = await store.end_workers(run_id, dead)
        log.warning(
            "run %s: %d requests were in flight in %d stopped worker(s) on this machine; "
            "they are sent again (the provider may have answered them already)",
            run_id,
            freed,
            len(dead),
        )


def _rate_key(spec: JobSpec, route: RouteSpec, mock_url: str | None) -> str:
    """One provider limit: the endpoint's URL and the model (shared by every run using them)."""
    ep = spec.endpoints[route.endpoint]
    base = mock_url if ep.is_mock and mock_url else ep.base_url
    return f"{base}|{route.model}"


async def _budget(
    store: Store, spec: JobSpec, run_id: str, routes: list[Route], prices: PriceBook, lease: _Lease | None
) -> Budget | None:
    """The run's budget, with what earlier sessions spent; every route must have a price."""
    if spec.budget_usd is None:
        return None
    probe = Worker(routes, retry=spec.retry, policy=spec.policy, prices=prices)
    for route in routes:
        if probe.worst_case_picousd(route, 1000, 1000) is None:
            raise SpecError(
                f"prices.{route.spec.model}",
                "budget_usd needs a price for every model of the chain; "
                f"none is known for {route.spec.model!r}",
            )
    if lease is not None:  # the cap holds for the sum of every worker: slices from the database
        return SharedBudget(store, run_id, lease.worker_id, picousd(spec.budget_usd), stale_s=lease.lease_s)
    spent = (await store.usage_totals(run_id)).get("cost_picousd") or 0
    return Budget(cap_picousd=picousd(spec.budget_usd), spent_picousd=spent)


async def _first_change(store: Store, run_id: str, source: RowSource) -> str:
    """Say how the input differs from the run's requests: the first changed or new request."""

    def take(it: Iterator[Any]) -> list[Any]:
        return list(islice(it, SUBMIT_BATCH))

    it = source.checked_rows()
    try:
        while chunk := await anyio.to_thread.run_sync(take, it):
            rows = [(pos, item) for _, pos, _, item in chunk if isinstance(item, Row)]
            known = await store.body_hashes(run_id, [r.custom_id for _, r in rows])
            for pos, row in rows:
                if row.custom_id not in known:
                    return f"{pos}: request {row.custom_id!r} is new"
                if known[row.custom_id] != row.body_hash:
                    return f"{pos}: the body of request {row.custom_id!r} changed"
    except InputError as exc:
        return str(exc)
    return "its sha256 differs"


async def _fresh_run_id(store: Store, base: str) -> str:
    stamp = f"{base}-{datetime.now(UTC):%Y%m%dT%H%M%S}"
    candidate, n = stamp, 1
    while await store.get_run(candidate) is not None:
        n += 1
        candidate = f"{stamp}-{n}"
    return candidate


def _verdict(
    counts: Mapping[str, int], interrupted: bool, worker: Worker, totals: Mapping[str, int | None]
) -> tuple[str, int, str]:
    stopped = [r.endpoint for r in worker.routes if r.endpoint.stopped]
    if interrupted:
        left = counts.get("in_flight", 0)
        note = f"; {left} requests were abandoned in flight (sent again on resume)" if left else ""
        return "interrupted", 130, f"interrupted: rerun the same command to resume{note}"
    if stopped and not worker.usable():
        ep = stopped[0]
        code = 2 if ep.rule == "auth" else 1
        return "aborted", code, f"stopped: {ep.stopped}"
    b = worker.budget
    if b is not None and b.exhausted and counts.get("pending", 0):
        return (
            "stopped",
            3,
            f"budget cap of ${usd(b.cap_picousd)} reached (spent ${usd(totals.get('cost_picousd') or 0)}); "
            f"{counts['pending']} requests left: rerun with a larger --budget-usd to finish",
        )
    if any(counts.get(s, 0) for s in ("failed", "pending", "in_flight", "rejected")):
        return "failed", 1, ""
    return "completed", 0, ""


async def _submit(store: Store, spec: JobSpec, run_id: str, source: RowSource) -> int:
    """Validate every row and load the run's requests, all or nothing.

    A duplicate id is caught by the table's primary key (no set of every id in memory); the
    row is then found and named. With ``on_bad_row = "skip"`` duplicates must be known row by
    row, so a set of 16-byte digests of the ids is kept instead.
    """
    seen: set[bytes] | None = set() if spec.on_bad_row == "skip" else None

    def take(it: Iterator[Any]) -> list[Any]:
        return list(islice(it, SUBMIT_BATCH))

    async def batches() -> AsyncIterator[list[dict[str, Any]]]:
        it = source.checked_rows()
        while chunk := await anyio.to_thread.run_sync(take, it):
            out = []
            for seq, pos, obj, item in chunk:
                if isinstance(item, Row) and seen is not None:
                    digest = hashlib.blake2b(item.custom_id.encode(), digest_size=16).digest()
                    if digest in seen:
                        item = _duplicate(source, pos, item.custom_id)
                    else:
                        seen.add(digest)
                if isinstance(item, InputError):
                    if spec.on_bad_row == "stop":
                        raise item
                    out.append(_rejected_row(seq, obj, item))
                    continue
                out.append(_request_row(item))
            yield out

    try:
        n = await store.load_requests(run_id, batches())
    except DuplicateRequestId:
        raise await anyio.to_thread.run_sync(_find_duplicate, source) from None
    log.info("run %s: loaded %d requests from %s", run_id, n, spec.input.path)
    return n


def _duplicate(source: RowSource, pos: str, custom_id: str) -> InputError:
    return InputError(source.path, pos, "custom_id", f"duplicate custom_id {custom_id!r}")


def _find_duplicate(source: RowSource) -> InputError:
    """Name the first row whose id appeared before (only run when the database saw one)."""
    seen: set[str] = set()
    for _, pos, _, item in source.checked_rows():
        if isinstance(item, Row):
            if item.custom_id in seen:
                return _duplicate(source, pos, item.custom_id)
            seen.add(item.custom_id)
    return InputError(source.path, "input", "custom_id", "a custom_id appears twice")


def _request_row(row: Row) -> dict[str, Any]:
    return {
        "custom_id": row.custom_id,
        "seq": row.seq,
        "body_sha256": row.body_hash,
        "body": orjson.dumps(row.body).decode(),
        "record": None if row.record is None else orjson.dumps(row.record, default=str).decode(),
        "state": "pending",
        "attempts": 0,
        "error": None,  # every row of one executemany needs the same keys
    }


def _rejected_row(seq: int, obj: Any, exc: InputError) -> dict[str, Any]:
    cid = obj.get("custom_id") if isinstance(obj, dict) else None
    return {
        "custom_id": f"rejected-{seq:08d}" if not isinstance(cid, str) else f"{cid}#rejected-{seq}",
        "seq": seq,
        "body_sha256": "",
        "body": orjson.dumps(obj, default=str).decode() if not isinstance(obj, InputError) else "null",
        "record": None,
        "state": "rejected",
        "attempts": 0,
        "error": str(exc),
    }


async def _start_mock(stack: AsyncExitStack, spec: JobSpec) -> str | None:
    if not any(spec.endpoints[r.endpoint].is_mock for r in spec.routes):
        return None
    from pipeline.mock import MockConfig, MockServer

    m = spec.mock or MockSpec()
    config = MockConfig(
        latency_ms=m.latency_ms,
        rate_429=m.rate_429,
        rate_500=m.rate_500,
        seed=m.seed,
        models=m.models if m.models is not None else tuple(r.model for r in spec.routes),
    )
    server = await anyio.to_thread.run_sync(MockServer(config).start)
    stack.callback(server.stop)
    log.info("mock server started in-process at %s", server.base_url)
    return server.base_url


def _routes(
    spec: JobSpec,
    keys: Mapping[str, str | None],
    transport: httpx.AsyncBaseTransport,
    mock_url: str | None,
    news: Mapping[str, RateNews],
) -> list[Route]:
    clients: dict[str, ChatClient] = {}
    states: dict[str, EndpointState] = {}
    routes = []
    for r in spec.routes:
        ep = spec.endpoints[r.endpoint]
        base_url = mock_url if ep.is_mock and mock_url else ep.base_url
        if r.endpoint not in clients:
            clients[r.endpoint] = ChatClient(
                ep,
                base_url=base_url,
                api_key=keys.get(r.endpoint),
                retry=spec.retry,
                transport=transport,
            )
            states[r.endpoint] = EndpointState(r.endpoint)
        routes.append(
            Route(
                spec=r,
                client=clients[r.endpoint],
                limiter=_limiter(r, news.get(r.key)),
                endpoint=states[r.endpoint],
                base_url=base_url,
                breaker=CircuitBreaker(spec.breaker),
                provider=ep.provider,
            )
        )
    return routes


def _limiter(route: RouteSpec, news: RateNews | None) -> RouteLimiter:
    limiter = RouteLimiter(route.limits, shared=news)
    if news is not None:
        news.limiter = limiter
    return limiter


@dataclass(frozen=True)
class _Lease:
    """This process is one of the run's workers: its id and how long its claims last."""

    worker_id: str
    lease_s: float


@dataclass
class _Dispatch:
    """What one session sends: which request states, and how (recovery, grace period)."""

    run_id: str
    states: tuple[str, ...]
    recover_stored: bool
    in_flight_before: int  # requests an earlier session left in flight (maybe paid)
    grace_s: float
    lease: _Lease | None = None  # None: alone on the run (SQLite), claims by pages
    news: list[RateNews] = field(default_factory=list)
    interrupted: bool = False


def _page_size(n_workers: int, rpms: list[int]) -> int:
    """How many requests the feeder claims at a time (alone on the run): four rounds of the workers, so that
    a page's query and claim (a commit) are paid once per many requests, within 50-1,000;
    with every route rate-limited, at most ~5 s of sending, so that what is marked in
    flight stays close to what really is."""
    size = 4 * n_workers
    if rpms and all(rpms):
        size = min(size, sum(rpms) // 12)
    return max(50, min(1000, size))


def _task(plan: _Dispatch, row: tuple[Any, ...]) -> Task:
    seq, cid, body_text, record, n_prior, state = row
    body = orjson.loads(body_text)
    recover = None
    if plan.recover_stored:
        tag = {"pipeline_run": plan.run_id, "pipeline_request": cid}
        metadata = body.get("metadata") if isinstance(body.get("metadata"), dict) else {}
        body = {**body, "store": True, "metadata": {**metadata, **tag}}
        if state == "in_flight":  # an earlier session may have been answered: look first
            recover = tag
    return Task(
        seq=seq,
        custom_id=cid,
        body=body,
        record=None if record is None else orjson.loads(record),
        prior_attempts=n_prior,
        recover=recover,
    )


async def _dispatch(
    store: Store,
    plan: _Dispatch,
    worker: Worker,
    recorder: Recorder,
    counters: Counters,
    display: Display | None,
    handle_signals: bool,
) -> None:
    """Feeder, workers, recorder, progress, signals, in one task group.

    The feeder claims each page of requests (write-ahead, one commit a page) before handing
    them to the workers. On the first SIGINT/SIGTERM nothing new is started, in-flight
    requests get ``grace_s`` to finish and be recorded, unsent claims are given back; a
    second signal (or the grace running out) abandons the in-flight ones, which stay marked
    in flight for the resume.
    """
    n_workers = max(1, min(10_000, sum(r.limiter.limits.concurrency for r in worker.routes)))
    page_size = _page_size(n_workers, [r.limiter.limits.rpm for r in worker.routes])
    # A whole page fits in the stream: the workers find the next request queued while the
    # feeder fetches and claims the page after it.
    task_send, task_recv = anyio.create_memory_object_stream[Task](max(n_workers, page_size))
    out_send, out_recv = anyio.create_memory_object_stream[Outcome | Claim](n_workers * 2)
    recorder_done = anyio.Event()
    dispatch_done = anyio.Event()
    stopping = anyio.Event()
    unsent: list[Task] = []

    control = out_send.clone()  # the feeder's claims, and giving back what was never sent
    leftover = task_recv.clone()  # to find tasks still queued when the run stops

    async def claim(seqs: list[int], *, release: bool = False) -> None:
        c = Claim(seqs, release=release)
        await control.send(c)
        await c.done.wait()

    pages = [min(page_size, max(50, n_workers))]  # the size of the next page

    async def next_page(after: int) -> list[tuple[Any, ...]] | None:
        """Claimed requests to send next, or None when the run has none left for us."""
        if plan.lease is None:
            # The first page is one round of the workers, so that sending starts at once, and
            # pages double up to page_size: a large page read while the first connections
            # open would hold their answers up.
            size = pages[0]
            pages[0] = min(page_size, size * 2)
            page = await store.pending_page(plan.run_id, after, size, plan.states)
            if not page or not worker.may_dispatch():
                return None
            await claim([row[0] for row in page])
            return page
        lease = plan.lease
        while not stopping.is_set() and worker.may_dispatch():
            # One round of the workers: the run's requests spread evenly over the workers.
            size = max(50, min(1000, n_workers))
            page = await store.lease(plan.run_id, lease.worker_id, size, plan.states, lease.lease_s)
            if page:
                return page
            wait = await store.lease_outlook(plan.run_id, lease.worker_id, plan.states)
            if wait is None:
                return None
            # Other workers hold the rest: their leases may run out (a dead worker's do).
            with anyio.move_on_after(min(max(wait + 0.05, 0.25), 5.0)):
                await stopping.wait()
        return None

    async def feeder(send: MemoryObjectSendStream[Task]) -> None:
        async with send:
            after = -1
            while not stopping.is_set():
                page = await next_page(after)
                if not page:
                    return
                tasks = [_task(plan, row) for row in page]
                sent = 0
                try:
                    for task in tasks:
                        if stopping.is_set() or not worker.may_dispatch():
                            return
                        try:
                            send.send_nowait(task)  # a waiting worker takes it at once
                        except anyio.WouldBlock:
                            await send.send(task)
                        sent += 1
                finally:  # also when cancelled: what was claimed but not handed over is unsent
                    unsent.extend(tasks[sent:])
                after = page[-1][0]

    async def heartbeat(lease: _Lease) -> None:
        while True:
            await anyio.sleep(lease.lease_s / 4)
            try:
                await store.heartbeat(lease.worker_id, plan.run_id, lease.lease_s)
            except StorageError as exc:  # others take our requests over if this goes on
                log.warning("worker %s: could not renew its leases: %s", lease.worker_id, exc)

    async def work(
        recv: MemoryObjectReceiveStream[Task], send: MemoryObjectSendStream[Outcome | Claim]
    ) -> None:
        # What is already queued is taken, and an outcome handed on, without a trip through
        # the event loop (anyio's receive() and send() always make one): a request's one
        # suspension is then its HTTP exchange.
        async def take() -> Task | None:
            while True:
                try:
                    task = recv.receive_nowait()
                except anyio.WouldBlock:
                    try:
                        task = await recv.receive()
                    except anyio.EndOfStream:
                        return None
                except anyio.EndOfStream:
                    return None
                if not stopping.is_set() and worker.may_dispatch():
                    return task
                unsent.append(task)

        async def give(outcome: Outcome) -> None:
            await hand_on(send, outcome)

        async with recv, send:
            await worker.serve(take, give)

    async def record() -> None:
        try:
            await recorder.run(out_recv)
        finally:
            recorder_done.set()

    async def show() -> None:
        if display is None:
            return
        while True:
            await anyio.sleep(display.interval)
            counters.in_flight = sum(r.limiter.in_flight for r in worker.routes)
            display.update(counters)

    async def grace(scope: anyio.CancelScope) -> None:
        with anyio.move_on_after(plan.grace_s):
            await dispatch_done.wait()
        scope.cancel()

    async def watch_signals(scope: anyio.CancelScope, tg: anyio.abc.TaskGroup) -> None:
        try:
            receiver = anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM)
        except (ValueError, RuntimeError, NotImplementedError):  # not the main thread
            return
        with receiver as signals:
            async for _ in signals:
                if plan.interrupted:  # the second signal: stop now
                    log.warning("stopping now: requests still in flight stay marked for the resume")
                    scope.cancel()
                    return
                plan.interrupted = True
                stopping.set()
                log.warning(
                    "stopping: no new requests; waiting up to %gs for those in flight "
                    "(press Ctrl-C again to stop at once)",
                    plan.grace_s,
                )
                tg.start_soon(grace, scope)

    async with anyio.create_task_group() as outer:
        outer.start_soon(record)
        outer.start_soon(show)
        if plan.lease is not None:
            outer.start_soon(heartbeat, plan.lease)
        for news in plan.news:
            outer.start_soon(news.run)
        async with anyio.create_task_group() as dispatch:
            if handle_signals:
                outer.start_soon(watch_signals, dispatch.cancel_scope, outer)
            dispatch.start_soon(feeder, task_send)
            # The feeder asks for its first page (and the recorder gets ready) while the
            # workers are made: a thousand of them take a few milliseconds.
            await anyio.lowlevel.checkpoint()
            async with task_recv, out_send:
                for _ in range(n_workers):
                    dispatch.start_soon(work, task_recv.clone(), out_send.clone())
                # Wait here (not in the group) so the unsent claims can be given back.
        dispatch_done.set()
        with leftover:
            while True:
                try:
                    unsent.append(leftover.receive_nowait())
                except (anyio.WouldBlock, anyio.EndOfStream):
                    break
        async with control:
            if unsent:  # claimed but never sent: not paid for, so plainly pending again
                with anyio.CancelScope(shield=True):
                    if plan.lease is not None:  # workers share the run: straight to the database
                        ids = [t.custom_id for t in unsent]
                        await store.release_leases(plan.run_id, plan.lease.worker_id, ids)
                    else:
                        await claim([t.seq for t in unsent], release=True)
        await recorder_done.wait()
        outer.cancel_scope.cancel()
    if display is not None:
        counters.in_flight = 0
        display.close(counters)


async def _write_results(
    store: Store,
    run_id: str,
    out_dir: Path,
    keep: tuple[str, ...] | None,
    states: tuple[str, ...] | list[str],
    records: bool,
) -> int:
    """Rebuild results.parquet from the database (requests in ``states``); returns its rows.
    A first pass over the records settles their columns' types, only when rows carry records."""
    path = out_dir / "results.parquet"
    sts = tuple(states)
    if not sts:
        path.unlink(missing_ok=True)
        return 0
    return await write_results(
        store.result_pages(run_id, states=sts),
        path,
        keep_columns=keep,
        typing_pages=store.result_records(run_id, states=sts) if records else None,
    )


async def _final_results(
    store: Store,
    run_id: str,
    out_dir: Path,
    keep: tuple[str, ...] | None,
    records: bool,
    parts: PartWriter,
    counts: Mapping[str, int],
    before: int,
) -> None:
    """results.parquet at the end of a session alone on the run: the results.parquet of
    earlier sessions (``before`` rows, written when this one started) and this session's part
    files, consolidated: the file the database rebuild gives, without reading the database
    again (outputs.consolidate checks the rows against the database's counts). The database
    rebuild when they cannot be trusted to be that file."""
    path = out_dir / "results.parquet"
    last = parts.take()  # the rows not written as a part yet: consolidated from memory
    pieces: list[Path | pa.Table] = [*([path] if before else []), *parts.files]
    if last is not None:
        pieces.append(last)
    expect = {s: counts.get(s, 0) for s in FINAL_STATES}
    if await anyio.to_thread.run_sync(consolidate, pieces, path, expect) is None:
        await _write_results(store, run_id, out_dir, keep, FINAL_STATES, records)
