"""The store: opens the database, migrates it, and holds every query the pipeline makes.

SQLAlchemy 2 Core on an async engine (aiosqlite by default; any async URL, e.g.
``postgresql+asyncpg://``). SQLite runs in WAL mode with a busy timeout. SQLAlchemy's
exceptions do not leave this module: they become :class:`~pipeline.errors.StorageError`
with a message a user can act on.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from operator import methodcaller
from pathlib import Path
from typing import Any, Generic, TypeVar

import anyio
import orjson
from sqlalchemy import (
    BigInteger,
    Connection,
    DateTime,
    Integer,
    Text,
    and_,
    bindparam,
    case,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.sql.elements import TextClause

from pipeline.errors import StorageError
from pipeline.records import Outcome
from pipeline.store.batch import (
    ATTEMPT_KEYS,
    ATTEMPT_SHARED,
    COMPLETION_KEYS,
    COMPLETION_SHARED,
    FINISH_KEYS,
    FINISH_SHARED,
    OutcomeRows,
    outcome_rows,
)
from pipeline.store.prepared import Prepared, Rows
from pipeline.store.schema import attempt, completion, request, request_input, run, worker

__all__ = ["DuplicateRequestId", "OutcomeRows", "Recorded", "Store", "migrations_dir", "utcnow"]


_T = TypeVar("_T")
_ISO = methodcaller("isoformat", " ", "microseconds")


class DuplicateRequestId(StorageError):
    """Loading a run's requests met a custom_id twice (the caller finds and names the row)."""


def utcnow() -> datetime:
    """Naive UTC, the one time convention of the database."""
    return datetime.now(UTC).replace(tzinfo=None)


def migrations_dir() -> Path:
    """``migrations/`` in a checkout, or its copy inside an installed wheel."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "_migrations", here.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise StorageError("cannot find the migrations folder (is the package installed completely?)")


def _explain(exc: BaseException, url: str) -> str:
    text_ = str(getattr(exc, "orig", None) or exc)
    low = text_.lower()
    where = url.split("///", 1)[-1] if url.startswith("sqlite") else url.split("@")[-1]
    if "locked" in low or "busy" in low:
        return f"database {where} is locked by another process (is another run using it?)"
    if "readonly" in low or "read-only" in low:
        return f"database {where} is read-only: check the file's permissions"
    if ("disk" in low and "full" in low) or "no space" in low:
        return f"database {where}: the disk is full"
    if "unable to open" in low:
        return f"cannot open database {where}: does its folder exist and is it writable?"
    return f"database {where}: {text_.splitlines()[0] if text_ else type(exc).__name__}"


class Store:
    """One database. Writes come from one task at a time (the recorder, or setup code)."""

    def __init__(
        self, engine: AsyncEngine, url: str, *, connect_args: Mapping[str, Any] | None = None
    ) -> None:
        self.engine = engine
        self.url = url
        self._statements: dict[str, Prepared] | None = None
        # SQLite file: the recorder's statements go through a connection of their own.
        self._writer: _SqliteWriter | None = None
        if engine.dialect.name == "sqlite" and sqlite3.sqlite_version_info >= (3, 38):  # UPDATE FROM, JSON
            args, kwargs = engine.dialect.create_connect_args(engine.url)
            if args and args[0] != ":memory:" and "mode=memory" not in str(args[0]):
                self._writer = _SqliteWriter(
                    _SqliteStatements(engine.dialect), url, args, {**kwargs, **(connect_args or {})}
                )

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    async def open(cls, url: str, *, migrate: bool = True) -> Store:
        if url.startswith("sqlite"):
            path = url.split("///", 1)[-1]
            if path and path != ":memory:":
                parent = Path(path).parent
                if not parent.exists():
                    raise StorageError(f"cannot create database {path}: folder {parent} does not exist")
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite") and "timeout=" not in url:
            kwargs["connect_args"] = {"timeout": 30.0}  # wait up to 30 s for another writer's lock
        try:
            engine = create_async_engine(url, **kwargs)
        except (SQLAlchemyError, ImportError, ValueError) as exc:
            raise StorageError(f"cannot use database URL: {exc}") from None
        if engine.dialect.name == "sqlite":
            event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        store = cls(engine, url, connect_args=kwargs.get("connect_args"))
        if migrate:
            await store.migrate()
        return store

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        await self.engine.dispose()

    async def _write(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """One transaction on the SQLite writer's connection (errors as StorageError)."""
        assert self._writer is not None
        return await self._writer.run(work)

    @asynccontextmanager
    async def _conn(self, *, write: bool = True) -> AsyncIterator[AsyncConnection]:
        try:
            if write:
                async with self.engine.begin() as conn:
                    yield conn
            else:
                async with self.engine.connect() as conn:
                    yield conn
        except (SQLAlchemyError, OSError) as exc:
            raise StorageError(_explain(exc, self.url)) from exc

    async def migrate(self) -> str:
        """Upgrade to the newest revision; returns it."""
        from alembic import command
        from alembic.config import Config
        from alembic.script import ScriptDirectory

        cfg = Config()
        cfg.set_main_option("script_location", str(migrations_dir()))
        cfg.set_main_option("sqlalchemy.url", self.url)

        def upgrade(connection: Connection) -> None:
            cfg.attributes["connection"] = connection
            command.upgrade(cfg, "head")

        async with self._conn() as conn:
            if conn.dialect.name == "postgresql":  # workers starting together migrate one at a time
                await conn.execute(text("SELECT pg_advisory_xact_lock(7270411)"))
            await conn.run_sync(upgrade)
        head = ScriptDirectory.from_config(cfg).get_current_head()
        return head or ""

    # -- runs --------------------------------------------------------------------------------

    async def get_run(self, run_id: str) -> dict[str, Any] | None:
        async with self._conn(write=False) as conn:
            row = (await conn.execute(select(run).where(run.c.run_id == run_id))).mappings().first()
        return dict(row) if row else None

    async def latest_run_id(self) -> str | None:
        async with self._conn(write=False) as conn:
            q = select(run.c.run_id).order_by(run.c.created_at.desc(), run.c.run_id.desc()).limit(1)
            return (await conn.execute(q)).scalar()

    async def list_runs(self) -> list[dict[str, Any]]:
        async with self._conn(write=False) as conn:
            rows = (await conn.execute(select(run).order_by(run.c.created_at))).mappings().all()
        return [dict(r) for r in rows]

    async def create_run(self, **values: Any) -> None:
        async with self._conn() as conn:
            await conn.execute(insert(run).values(created_at=utcnow(), loaded=False, **values))

    async def update_run(self, run_id: str, **values: Any) -> None:
        async with self._conn() as conn:
            await conn.execute(update(run).where(run.c.run_id == run_id).values(**values))

    # -- requests ----------------------------------------------------------------------------

    async def load_requests(
        self,
        run_id: str,
        batches: AsyncIterator[Sequence[Mapping[str, Any]]],
        input_rows: int | None = None,
    ) -> int:
        """Insert every request of a run in ONE transaction, then mark the run loaded.

        If the iterator raises (a bad row), nothing is written: the transaction rolls back.
        """
        n = 0
        try:
            async with self.engine.begin() as conn:
                async for batch in batches:
                    if batch:
                        await self._insert_requests(conn, run_id, batch)
                        n += len(batch)
                await conn.execute(
                    update(run).where(run.c.run_id == run_id).values(loaded=True, input_rows=input_rows or n)
                )
        except IntegrityError as exc:  # the (run, custom_id) key: an id appears twice
            raise DuplicateRequestId(_explain(exc, self.url)) from exc
        except (SQLAlchemyError, OSError) as exc:
            raise StorageError(_explain(exc, self.url)) from exc
        return n

    async def body_hashes(self, run_id: str, custom_ids: Sequence[str]) -> dict[str, str]:
        q = select(request.c.custom_id, request.c.body_sha256).where(
            request.c.run_id == run_id, request.c.custom_id.in_(custom_ids)
        )
        async with self._conn(write=False) as conn:
            return {cid: h for cid, h in (await conn.execute(q)).all()}

    async def pending_page(
        self, run_id: str, after_seq: int, limit: int, states: Sequence[str] = ("pending",)
    ) -> list[tuple[int, str, str, str | None, int, str]]:
        """Up to ``limit`` requests to send, in input order after ``after_seq``:
        (seq, custom_id, body, record, attempts so far, state)."""
        r = request
        q = (
            select(r.c.seq, r.c.custom_id, _INPUT_BODY, _INPUT_RECORD, r.c.attempts, r.c.state)
            .where(r.c.run_id == run_id, r.c.state.in_(states), r.c.seq > after_seq)
            .order_by(r.c.seq)
            .limit(limit)
        )
        async with self._conn(write=False) as conn:
            return [tuple(r) for r in (await conn.execute(q)).all()]

    async def claim(self, run_id: str, seqs: Sequence[int], *, release: bool = False) -> None:
        """Write-ahead: mark requests (by their ``seq``) in flight before they are sent (or
        give them back)."""
        await self.claim_pages(run_id, [(seqs, release)])

    async def claim_pages(self, run_id: str, pages: Sequence[tuple[Sequence[int], bool]]) -> None:
        """Several claims, as :meth:`claim` makes them, in order and in one transaction:
        (seqs, release) each."""
        pages = [(ids, release) for ids, release in pages if ids]
        if not pages:
            return
        if self._writer is not None:
            statements = self._writer.statements.claims(run_id, pages, utcnow())

            def claim(conn: sqlite3.Connection) -> None:
                for sql, params in statements:
                    conn.execute(sql, params)

            await self._write(claim)
            return
        async with self._conn() as conn:
            await _claim(conn, run_id, pages)

    async def record_outcomes(
        self, run_id: str, outcomes: Sequence[Outcome], *, owner: str | None = None
    ) -> set[str]:
        """One transaction for a batch of finished requests: attempts, completions, states.

        ``owner``: the worker recording, when several share the run (see :func:`_reconcile`);
        returns the requests another worker had already answered (their state is kept).
        """
        return (await self.write_outcomes(self.outcome_rows(run_id, outcomes, owner=owner))).kept

    def outcome_rows(
        self, run_id: str, outcomes: Sequence[Outcome], *, owner: str | None = None
    ) -> OutcomeRows:
        """The rows of a batch, built without touching the database (so the recorder can build
        the next batch while the database writes the last one)."""
        rows = outcome_rows(run_id, outcomes, owner, utcnow())
        if self._writer is not None and owner is None:
            rows.statements = self._writer.statements.outcomes(rows)
        return rows

    async def write_outcomes(
        self, rows: OutcomeRows, *, claims: Sequence[tuple[Sequence[int], bool]] = ()
    ) -> Recorded:
        """Commit a batch built by :meth:`outcome_rows`, in one transaction; ``claims`` (as
        :meth:`claim_pages` takes them) go in the same transaction, first. Waits for its end
        even when cancelled meanwhile."""
        begun = self.start_outcomes(rows, claims=lambda: claims)
        with anyio.CancelScope(shield=True):
            recorded = await begun
        return recorded

    def start_outcomes(
        self, rows: OutcomeRows, *, claims: Callable[[], Sequence[tuple[Sequence[int], bool]]] = tuple
    ) -> Awaitable[Recorded]:
        """:meth:`write_outcomes`, begun at once where it can be: on a SQLite file the
        transaction is queued for the writer's thread now, behind those begun before, and
        starts as soon as they end; await the result (it is the same whatever becomes of the
        waiting task). Elsewhere it runs when awaited; begin the next batch only after awaiting
        this one's result there.

        ``claims`` is called as the transaction starts, on the SQLite writer's thread (it must
        be safe there): the claim pages to write in it first, taken at the last moment."""
        statements = rows.statements
        if statements is None:
            return self._write_outcomes(rows, claims)
        assert self._writer is not None
        writer = self._writer
        run_id, totals_sql = rows.run_id, writer.statements.totals
        finish = None if rows.finish_once else self._prepared()["request"]
        requests = [] if finish is None else rows.requests
        # Requests answered in part by earlier sessions: their totals are the database's sums,
        # read back for the derived output.
        again = [o.custom_id for o in rows.outcomes if o.prior_attempts]

        expected = rows.n_attempts + rows.n_completions + len(rows.outcomes)

        def record(conn: sqlite3.Connection) -> Recorded:
            pages = [(ids, release) for ids, release in claims() if ids]
            if pages:
                for sql, params in writer.statements.claims(run_id, pages, utcnow()):
                    conn.execute(sql, params)
            before = conn.total_changes
            for sql, params in statements:
                conn.execute(sql, params)
            if finish is not None:  # a request twice in the batch: row by row
                conn.executemany(finish.sql, finish.params(requests))
            # The writer's connection checks no foreign keys (_SqliteWriter._connect): every
            # attempt and completion is of a request the batch finishes, so every request
            # found by its UPDATE is the check. An INSERT stores all its rows or fails.
            missing = expected - (conn.total_changes - before)
            if missing:
                raise sqlite3.IntegrityError(
                    f"FOREIGN KEY constraint failed: {missing} of the batch's {len(rows.outcomes)} "
                    f"requests are not in run {run_id!r}"
                )
            if not again:
                return Recorded(set(), {})
            found = conn.execute(totals_sql, (run_id, orjson.dumps(again).decode())).fetchall()
            return Recorded(set(), {cid: (n, cost, reported) for cid, n, cost, reported in found})

        return writer.submit(record)

    async def _write_outcomes(
        self, rows: OutcomeRows, claims: Callable[[], Sequence[tuple[Sequence[int], bool]]]
    ) -> Recorded:
        """write_outcomes through the engine (PostgreSQL; workers sharing a run)."""
        run_id, outcomes, owner = rows.run_id, rows.outcomes, rows.owner
        pages = [(ids, release) for ids, release in claims() if ids]
        again = [o.custom_id for o in outcomes if o.prior_attempts]
        async with self._conn() as conn:
            if pages:
                await _claim(conn, run_id, pages)
            kept: set[str] = set()
            if owner is not None:
                # Locks in the order every transaction of the workers takes them: the run's row
                # (claim_budget), the worker's (its heartbeat), then requests. Taking requests
                # first, then the worker's row at the end (_release_recorded) met the heartbeat
                # halfway, and the second update of a request checks its run's key, which met
                # claim_budget: PostgreSQL broke those deadlocks by failing the batch.
                await conn.execute(text("SELECT 1 FROM run WHERE run_id = :r FOR KEY SHARE"), {"r": run_id})
                await conn.execute(text("SELECT 1 FROM worker WHERE worker_id = :w FOR UPDATE"), {"w": owner})
                kept, shifted = await _reconcile(
                    conn, run_id, rows.attempts, rows.completions, rows.requests, outcomes
                )
                again += [cid for cid in shifted if cid not in again]
            prepared = self._prepared()
            for name, batch in (
                ("attempt", rows.attempts),
                ("completion", rows.completions),
                ("request", rows.requests),
            ):
                if batch:
                    await conn.exec_driver_sql(prepared[name].sql, prepared[name].params(batch))
            totals = await _request_totals(conn, run_id, again) if again else {}
            if owner is not None:
                await _release_recorded(conn, run_id, owner, outcomes)
        return Recorded(kept, totals)

    def _prepared(self) -> dict[str, Prepared]:
        """The statements run for every batch, compiled once for this database: record_outcomes'
        three, and the loader's two (_insert_requests)."""
        if self._statements is None:
            dialect = self.engine.dialect
            self._statements = {
                "attempt": Prepared(insert(attempt), dialect, ATTEMPT_KEYS, table=attempt),
                "completion": Prepared(insert(completion), dialect, COMPLETION_KEYS, table=completion),
                "request": Prepared(_FINISH, dialect, FINISH_KEYS),
                "load_request": Prepared(insert(request), dialect, _LOAD_KEYS),
                "load_input": Prepared(insert(request_input), dialect, _LOAD_INPUT_KEYS, table=request_input),
            }
        return self._statements

    async def _insert_requests(
        self, conn: AsyncConnection, run_id: str, rows: Sequence[Mapping[str, Any]]
    ) -> None:
        """Requests as the loader builds them (state and input in one mapping: ``custom_id``,
        ``seq``, ``body_sha256``, ``body``, ``state``; ``record``, ``attempts``, ``error`` if
        any) into ``request`` and ``request_input``, through statements compiled once (the
        plain ``execute`` of dicts took a third of a million-row load)."""
        prepared = self._prepared()
        states, inputs = prepared["load_request"], prepared["load_input"]
        await conn.exec_driver_sql(
            states.sql,
            states.params(
                [
                    (
                        run_id,
                        r["custom_id"],
                        r["seq"],
                        r["body_sha256"],
                        r["state"],
                        r.get("attempts", 0),
                        r.get("error"),
                    )
                    for r in rows
                ]
            ),
        )
        await conn.exec_driver_sql(
            inputs.sql, inputs.params([(run_id, r["seq"], r["body"], r.get("record")) for r in rows])
        )

    async def reject_rows(self, run_id: str, rows: Sequence[Mapping[str, Any]]) -> None:
        async with self._conn() as conn:
            await self._insert_requests(conn, run_id, rows)

    # -- reading back ------------------------------------------------------------------------

    async def state_counts(self, run_id: str) -> dict[str, int]:
        async with self._conn(write=False) as conn:
            return await _state_counts(conn, run_id)

    async def usage_totals(self, run_id: str) -> dict[str, int | None]:
        async with self._conn(write=False) as conn:
            return await _usage_totals(conn, run_id)

    async def tallies(self, run_id: str) -> tuple[dict[str, int], dict[str, int | None]]:
        """:meth:`state_counts` and :meth:`usage_totals` in one trip to the database (the end
        of a run waits for them), read in one transaction: the counts and the bill agree."""
        async with self._conn(write=False) as conn:
            return await _state_counts(conn, run_id), await _usage_totals(conn, run_id)

    async def iter_results(
        self, run_id: str, *, states: Sequence[str] | None = None, page: int = 2000
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """Pages of one row per request (final attempt, completion, usage), in input order."""
        async for keys, rows in self._result_rows(_RESULT_ROW, run_id, states, page):
            yield [dict(zip(keys, row, strict=True)) for row in rows]

    async def result_pages(
        self, run_id: str, *, states: Sequence[str] | None = None, page: int = 2000
    ) -> AsyncIterator[dict[str, Sequence[Any]]]:
        """The rows of :meth:`iter_results` that results.parquet holds, a page at a time as
        columns (name: values), in input order; without the raw body and the HTTP details."""
        async for keys, rows in self._result_rows(_RESULT_COLUMNS, run_id, states, page):
            yield dict(zip(keys, zip(*rows, strict=True), strict=True))

    async def result_records(
        self, run_id: str, *, states: Sequence[str] | None = None, page: int = 2000
    ) -> AsyncIterator[list[str | None]]:
        """The input records (JSON text) of the same rows, in the same pages."""
        async for _, rows in self._result_rows((request.c.seq, _INPUT_RECORD), run_id, states, page):
            yield [r[1] for r in rows]

    async def _result_rows(
        self, cols: Sequence[Any], run_id: str, states: Sequence[str] | None, page: int
    ) -> AsyncIterator[tuple[list[str], Sequence[Any]]]:
        """Pages of rows of the request / final attempt / completion join, by seq (cols[0])."""
        a, c, r = attempt, completion, request
        joined = r.outerjoin(
            a,
            and_(
                a.c.run_id == r.c.run_id,
                a.c.seq == r.c.seq,
                a.c.attempt_no == r.c.final_attempt_no,
            ),
        ).outerjoin(
            c,
            and_(
                c.c.run_id == a.c.run_id,
                c.c.seq == a.c.seq,
                c.c.attempt_no == a.c.attempt_no,
            ),
        )
        after = -1
        while True:
            q = select(*cols).select_from(joined).where(r.c.run_id == run_id, r.c.seq > after)
            if states is not None:
                q = q.where(r.c.state.in_(states))
            q = q.order_by(r.c.seq).limit(page)
            async with self._conn(write=False) as conn:
                result = await conn.execute(q)
                keys = list(result.keys())
                rows = result.all()
            if not rows:
                return
            yield keys, rows
            after = rows[-1][0]

    async def execute_text(
        self, sql: str | TextClause, params: Mapping[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        """A read-only query for reports: SQL text, or a text() clause with typed parameters."""
        stmt = text(sql) if isinstance(sql, str) else sql
        async with self._conn(write=False) as conn:
            return [dict(m) for m in (await conn.execute(stmt, dict(params or {}))).mappings().all()]

    # -- workers sharing a run (PostgreSQL) ---------------------------------------------------
    # Times here are the database's clock (naive UTC), so machines need not agree on theirs.

    @property
    def shared(self) -> bool:
        """Can several processes work on one run here? (PostgreSQL: row locks, SKIP LOCKED.)"""
        return self.engine.dialect.name == "postgresql"

    async def register_worker(self, worker_id: str, run_id: str, host: str, pid: int) -> None:
        async with self._conn() as conn:
            await conn.execute(
                text(
                    f"INSERT INTO worker (worker_id, run_id, host, pid, started_at, heartbeat_at, "
                    f"budget_picousd, spent_picousd, recorded) "
                    f"VALUES (:w, :r, :h, :p, {_DB_NOW}, {_DB_NOW}, 0, 0, 0)"
                ),
                {"w": worker_id, "r": run_id, "h": host, "p": pid},
            )

    async def heartbeat(self, worker_id: str, run_id: str, lease_s: float) -> None:
        """The worker is alive: renew its heartbeat and the leases of its requests."""
        async with self._conn() as conn:
            await conn.execute(
                text(f"UPDATE worker SET heartbeat_at = {_DB_NOW} WHERE worker_id = :w"), {"w": worker_id}
            )
            await conn.execute(
                text(
                    f"UPDATE request SET lease_until = {_DB_NOW} + make_interval(secs => :s) "
                    "WHERE run_id = :r AND lease_owner = :w AND state = 'in_flight'"
                ),
                {"w": worker_id, "r": run_id, "s": float(lease_s)},
            )

    async def finish_worker(self, worker_id: str) -> None:
        async with self._conn() as conn:
            await conn.execute(
                text(f"UPDATE worker SET finished_at = {_DB_NOW} WHERE worker_id = :w"), {"w": worker_id}
            )

    async def workers(self, run_id: str) -> list[dict[str, Any]]:
        """Every process that worked on the run (PostgreSQL), in the order they started."""
        q = select(worker).where(worker.c.run_id == run_id).order_by(worker.c.started_at, worker.c.worker_id)
        async with self._conn(write=False) as conn:
            return [dict(m) for m in (await conn.execute(q)).mappings().all()]

    async def live_workers(self, run_id: str, host: str | None = None) -> list[dict[str, Any]]:
        """Workers of the run that have not finished (on ``host`` only, when given)."""
        return [
            w
            for w in await self.workers(run_id)
            if w["finished_at"] is None and (host is None or w["host"] == host)
        ]

    async def end_workers(self, run_id: str, worker_ids: Sequence[str]) -> int:
        """Workers known to be dead: finish them and free their leases now. Returns requests freed."""
        if not worker_ids:
            return 0
        async with self._conn() as conn:
            await conn.execute(
                text(f"UPDATE worker SET finished_at = {_DB_NOW} WHERE worker_id IN :ids").bindparams(
                    bindparam("ids", expanding=True)
                ),
                {"ids": list(worker_ids)},
            )
            res = await conn.execute(
                text(
                    "UPDATE request SET lease_until = NULL WHERE run_id = :r AND state = 'in_flight' "
                    "AND lease_owner IN :ids"
                ).bindparams(bindparam("ids", expanding=True)),
                {"r": run_id, "ids": list(worker_ids)},
            )
            return int(res.rowcount or 0)

    async def lease(
        self, run_id: str, worker_id: str, limit: int, states: Sequence[str], lease_s: float
    ) -> list[tuple[int, str, str, str | None, int, str]]:
        """Claim up to ``limit`` requests for ``worker_id`` until the lease runs out: pending
        ones (in ``states``) and in-flight ones whose lease expired, in input order, skipping
        rows another worker is claiming at this moment. Rows as :meth:`pending_page` gives
        them, with the state each had BEFORE the claim (in_flight: maybe already paid)."""
        sql = text(
            f"""
            WITH picked AS (
                SELECT run_id, custom_id, state AS prior FROM request
                WHERE run_id = :r AND state IN :states
                  AND (state <> 'in_flight' OR lease_until IS NULL OR lease_until < {_DB_NOW})
                ORDER BY seq LIMIT :n
                FOR UPDATE SKIP LOCKED
            ), leased AS (
                UPDATE request AS q SET state = 'in_flight', claimed_at = {_DB_NOW}, lease_owner = :w,
                       lease_until = {_DB_NOW} + make_interval(secs => :s)
                FROM picked WHERE q.run_id = picked.run_id AND q.custom_id = picked.custom_id
                RETURNING q.run_id, q.seq, q.custom_id, q.attempts, picked.prior
            )
            -- The bodies are joined to what was leased, after it: the UPDATE is the one the
            -- workers had before bodies moved to request_input. With request_input joined in
            -- its FROM, three workers with one killed sent 64-82 requests twice instead of at
            -- most the 26 it held (tests/test_workers.py); a data-modifying WITH runs once.
            SELECT l.seq, l.custom_id, i.body, i.record, l.attempts, l.prior
            FROM leased l JOIN request_input i ON i.run_id = l.run_id AND i.seq = l.seq"""
        ).bindparams(bindparam("states", expanding=True))
        params = {"r": run_id, "w": worker_id, "n": limit, "s": float(lease_s), "states": list(states)}
        async with self._conn() as conn:
            rows = [tuple(r) for r in (await conn.execute(sql, params)).all()]
        rows.sort(key=lambda r: r[0])
        return rows

    async def release_leases(self, run_id: str, worker_id: str, custom_ids: Sequence[str]) -> None:
        """Give back claimed requests that were never sent: plainly pending again."""
        async with self._conn() as conn:
            for chunk in chunked(custom_ids, 500):
                await conn.execute(
                    text(
                        "UPDATE request SET state = 'pending', claimed_at = NULL, lease_owner = NULL, "
                        "lease_until = NULL WHERE run_id = :r AND lease_owner = :w AND state = 'in_flight' "
                        "AND custom_id IN :ids"
                    ).bindparams(bindparam("ids", expanding=True)),
                    {"r": run_id, "w": worker_id, "ids": chunk},
                )

    async def lease_outlook(self, run_id: str, worker_id: str, states: Sequence[str]) -> float | None:
        """Nothing claimable now: None when no other worker holds requests of the run either
        (nothing left to do), else the seconds until the first of their leases runs out."""
        sql = text(
            f"""
            SELECT COUNT(*) AS held,
                   EXTRACT(EPOCH FROM MIN(lease_until) - {_DB_NOW}) AS wait_s
            FROM request
            WHERE run_id = :r AND state = 'in_flight' AND lease_owner IS DISTINCT FROM :w"""
        )
        async with self._conn(write=False) as conn:
            row = (await conn.execute(sql, {"r": run_id, "w": worker_id})).mappings().one()
            if not row["held"]:
                left = await conn.execute(
                    text("SELECT 1 FROM request WHERE run_id = :r AND state IN :states LIMIT 1").bindparams(
                        bindparam("states", expanding=True)
                    ),
                    {"r": run_id, "states": [s for s in states if s != "in_flight"]},
                )
                return 0.0 if left.first() else None
        return max(0.0, float(row["wait_s"] or 0.0))

    async def claim_budget(
        self, run_id: str, worker_id: str, want: int, need: int, cap: int, stale_s: float
    ) -> int:
        """Take up to ``want`` picodollars (at least ``need``, else none) of the run's budget
        for this worker. What is committed: the cost every worker recorded, plus what each
        live worker holds and has not spent yet. Serialised on the run's row."""
        async with self._conn() as conn:
            await conn.execute(text("SELECT 1 FROM run WHERE run_id = :r FOR UPDATE"), {"r": run_id})
            committed = (
                await conn.execute(
                    text(
                        f"""
                        SELECT COALESCE((SELECT SUM(cost_picousd) FROM request WHERE run_id = :r), 0)
                             + COALESCE((SELECT SUM(GREATEST(budget_picousd - spent_picousd, 0))
                                          FROM worker WHERE run_id = :r AND finished_at IS NULL
                                          AND (worker_id = :w OR heartbeat_at >
                                               {_DB_NOW} - make_interval(secs => :stale))), 0)"""
                    ),
                    {"r": run_id, "w": worker_id, "stale": float(stale_s)},
                )
            ).scalar_one()
            grant = min(want, cap - int(committed))
            if grant < need:
                return 0
            await conn.execute(
                text("UPDATE worker SET budget_picousd = budget_picousd + :g WHERE worker_id = :w"),
                {"g": grant, "w": worker_id},
            )
            return grant

    async def take_rate_slots(
        self, route_key: str, kind: str, units: float, interval_s: float
    ) -> tuple[float, float, float, float | None, float | None]:
        """Book ``units`` of a shared rate limit (``kind`` requests or tokens), paced
        ``interval_s`` apart on the database clock. Returns (the booked span's start, the
        database's now, cooldown_until, learned_rpm, learned_tpm), all in database seconds."""
        col = "requests_tat" if kind == "requests" else "tokens_tat"
        async with self._conn() as conn:
            await _ensure_rate_slot(conn, route_key)
            row = (
                await conn.execute(
                    text(
                        f"""
                        WITH now_ AS (SELECT {_DB_EPOCH} AS t), old AS (
                            SELECT {col} AS tat, cooldown_until FROM rate_slot
                            WHERE route_key = :k FOR UPDATE)
                        UPDATE rate_slot SET {col} = GREATEST(old.tat, old.cooldown_until, now_.t) + :span
                        FROM old, now_ WHERE route_key = :k
                        RETURNING GREATEST(old.tat, old.cooldown_until, now_.t), now_.t,
                                  rate_slot.cooldown_until, learned_rpm, learned_tpm"""
                    ),
                    {"k": route_key, "span": float(units) * interval_s},
                )
            ).one()
        start, now, cooldown, lrpm, ltpm = row
        return float(start), float(now), float(cooldown), lrpm, ltpm

    async def rate_news(
        self,
        route_key: str,
        *,
        cooldown_s: float = 0.0,
        learned_rpm: float | None = None,
        learned_tpm: float | None = None,
    ) -> tuple[float, float, float | None, float | None]:
        """Tell every worker of a 429 (cool down ``cooldown_s`` from now) or of a learned limit,
        and read what others told: (database now, cooldown_until, learned_rpm, learned_tpm)."""
        async with self._conn() as conn:
            await _ensure_rate_slot(conn, route_key)
            row = (
                await conn.execute(
                    text(
                        f"""
                        UPDATE rate_slot SET
                            cooldown_until = GREATEST(cooldown_until, {_DB_EPOCH} + :c),
                            learned_rpm = COALESCE(CAST(:rpm AS double precision), learned_rpm),
                            learned_tpm = COALESCE(CAST(:tpm AS double precision), learned_tpm)
                        WHERE route_key = :k
                        RETURNING {_DB_EPOCH}, cooldown_until, learned_rpm, learned_tpm"""
                    ),
                    {"k": route_key, "c": float(cooldown_s), "rpm": learned_rpm, "tpm": learned_tpm},
                )
            ).one()
        now, cooldown, lrpm, ltpm = row
        return float(now), float(cooldown), lrpm, ltpm


# A request's input, looked up for each row a query returns: joined in its FROM instead, SQLite
# drove the query from request_input and sorted every later request by seq for each page (a
# 300,000-row run sent 1,000 requests/s instead of 5,100, pending_page taking ~350 ms).
_INPUT_BODY, _INPUT_RECORD = (
    select(col)
    .where(request_input.c.run_id == request.c.run_id, request_input.c.seq == request.c.seq)
    .scalar_subquery()
    .label(col.name)
    for col in (request_input.c.body, request_input.c.record)
)

# The columns of the result rows (Store.iter_results; seq first, the paging key).
_RESULT_COLUMNS = (
    request.c.seq,
    request.c.custom_id,
    request.c.state,
    request.c.attempts,
    request.c.error,
    _INPUT_RECORD,
    request.c.cost_picousd,
    request.c.reported_cost_picousd,
    attempt.c.endpoint,
    attempt.c.model,
    attempt.c.prompt_tokens,
    attempt.c.completion_tokens,
    attempt.c.total_tokens,
    attempt.c.cached_tokens,
    attempt.c.reasoning_tokens,
    completion.c.response_id,
    completion.c.model.label("response_model"),
    completion.c.finish_reason,
    completion.c.content,
    completion.c.reasoning,
    completion.c.refusal,
    completion.c.tool_calls,
    completion.c.parsed,
    completion.c.choices_json,
)
# ... and those a JSONL export needs too.
_RESULT_ROW = (
    *_RESULT_COLUMNS,
    attempt.c.http_status,
    attempt.c.provider_request_id,
    attempt.c.error_class,
    completion.c.raw,
)

# The database's clock (PostgreSQL): naive UTC like every time column, and epoch seconds.
_DB_NOW = "(clock_timestamp() AT TIME ZONE 'utc')"
_DB_EPOCH = "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS double precision)"


async def _state_counts(conn: AsyncConnection, run_id: str) -> dict[str, int]:
    q = select(request.c.state, func.count()).where(request.c.run_id == run_id).group_by(request.c.state)
    return {state: int(n) for state, n in (await conn.execute(q)).all()}


async def _usage_totals(conn: AsyncConnection, run_id: str) -> dict[str, int | None]:
    q = select(
        func.count().label("attempts"),
        func.sum(attempt.c.prompt_tokens).label("prompt_tokens"),
        func.sum(attempt.c.completion_tokens).label("completion_tokens"),
        func.sum(attempt.c.cached_tokens).label("cached_tokens"),
        func.sum(attempt.c.reasoning_tokens).label("reasoning_tokens"),
        func.sum(attempt.c.cost_picousd).label("cost_picousd"),
        func.sum(attempt.c.reported_cost_picousd).label("reported_cost_picousd"),
        func.sum(
            case(
                (attempt.c.cost_picousd.is_(None) & attempt.c.total_tokens.is_not(None), 1),
                else_=0,
            )
        ).label("unpriced_attempts"),
    ).where(attempt.c.run_id == run_id)
    row = (await conn.execute(q)).mappings().one()
    return {k: (None if v is None else int(v)) for k, v in row.items()}


async def _reconcile(
    conn: AsyncConnection,
    run_id: str,
    attempt_rows: list[tuple[Any, ...]],
    completion_rows: list[tuple[Any, ...]],
    request_rows: list[tuple[Any, ...]],
    outcomes: Sequence[Outcome],
) -> tuple[set[str], set[str]]:
    """Workers share the run: make a batch fit what other workers recorded meanwhile.

    A worker whose lease ran out (it stalled) may finish a request that another worker also
    sent. Both attempts were paid, so both are kept, numbered after what is already there;
    a success already recorded stays the request's answer. Rows are locked in key order.
    Rows are the tuples of ``ATTEMPT_KEYS``, ``COMPLETION_KEYS`` and ``FINISH_KEYS``.
    Returns the requests another worker answered first, and those whose attempts were renumbered.
    """
    ids = sorted(o.custom_id for o in outcomes)
    q = text(
        "SELECT custom_id, attempts, state FROM request WHERE run_id = :r AND custom_id IN :ids "
        "ORDER BY custom_id FOR UPDATE"
    ).bindparams(bindparam("ids", expanding=True))
    now = {cid: (n, st) for cid, n, st in (await conn.execute(q, {"r": run_id, "ids": ids})).all()}
    shift: dict[str, int] = {}
    kept: set[str] = set()
    for i, o in enumerate(outcomes):
        row = list(request_rows[i])
        n, state = now.get(o.custom_id, (o.prior_attempts, "in_flight"))
        if n != o.prior_attempts:
            shift[o.custom_id] = n - o.prior_attempts
            if row[_FINAL] is not None:
                row[_FINAL] += n - o.prior_attempts
        if state == "succeeded":
            kept.add(o.custom_id)
            row[_STATE], row[_FINAL], row[_ERROR] = "succeeded", None, None
        request_rows[i] = tuple(row)
    if shift:
        for rows, keys in ((attempt_rows, ATTEMPT_KEYS), (completion_rows, COMPLETION_KEYS)):
            cid, no = keys.index("custom_id"), keys.index("attempt_no")
            for i, r in enumerate(rows):
                if r[cid] in shift:
                    rows[i] = (*r[:no], r[no] + shift[r[cid]], *r[no + 1 :])
    return kept, set(shift)


async def _request_totals(
    conn: AsyncConnection, run_id: str, custom_ids: Sequence[str]
) -> dict[str, tuple[int, int | None, int | None]]:
    """(attempts, cost_picousd, reported_cost_picousd) of requests, as the database sums them."""
    out: dict[str, tuple[int, int | None, int | None]] = {}
    for chunk in chunked(custom_ids, 500):
        q = select(
            request.c.custom_id, request.c.attempts, request.c.cost_picousd, request.c.reported_cost_picousd
        )
        q = q.where(request.c.run_id == run_id, request.c.custom_id.in_(chunk))
        for cid, n, cost, reported in (await conn.execute(q)).all():
            out[cid] = (n, cost, reported)
    return out


async def _claim(conn: AsyncConnection, run_id: str, pages: Sequence[tuple[Sequence[int], bool]]) -> None:
    """Store.claim_pages' statements, the plain SQLAlchemy way."""
    now = utcnow()
    for ids, release in pages:
        if release:
            values: dict[str, Any] = {"state": "pending", "claimed_at": None}
            current: str | None = "in_flight"
        else:
            values, current = {"state": "in_flight", "claimed_at": now}, None
        for chunk in chunked(ids, 500):
            q = update(request).where(request.c.run_id == run_id, request.c.seq.in_(chunk))
            if current is not None:
                q = q.where(request.c.state == current)
            await conn.execute(q.values(**values))


async def _ensure_rate_slot(conn: AsyncConnection, route_key: str) -> None:
    """A provider limit's row exists from its first use on (by any worker)."""
    await conn.execute(
        text(
            "INSERT INTO rate_slot (route_key, requests_tat, tokens_tat, cooldown_until) "
            "VALUES (:k, 0, 0, 0) ON CONFLICT (route_key) DO NOTHING"
        ),
        {"k": route_key},
    )


async def _release_recorded(
    conn: AsyncConnection, run_id: str, owner: str, outcomes: Sequence[Outcome]
) -> None:
    """The worker's leases on recorded requests end; its tally (for the shared budget) grows."""
    cost = sum(a.cost_picousd or 0 for o in outcomes for a in o.attempts)
    for chunk in chunked([o.custom_id for o in outcomes], 500):
        await conn.execute(
            text(
                "UPDATE request SET lease_owner = NULL, lease_until = NULL "
                "WHERE run_id = :r AND lease_owner = :w AND custom_id IN :ids"
            ).bindparams(bindparam("ids", expanding=True)),
            {"r": run_id, "w": owner, "ids": chunk},
        )
    await conn.execute(
        text(
            f"UPDATE worker SET spent_picousd = spent_picousd + :c, recorded = recorded + :n, "
            f"heartbeat_at = {_DB_NOW} WHERE worker_id = :w"
        ),
        {"c": cost, "n": len(outcomes), "w": owner},
    )


def _add_nullable(col: Any, value: Any) -> Any:
    """col + value where NULL means "nothing yet"; NULL + NULL stays NULL."""
    return case((value.is_(None), col), else_=func.coalesce(col, 0) + value)


# A finished request: its state, attempts and cost added to what earlier sessions recorded.
_FINISH = (
    update(request)
    .where(
        and_(
            request.c.run_id == bindparam("b_run_id"),
            request.c.seq == bindparam("b_seq", type_=BigInteger),
        )
    )
    .values(
        state=bindparam("b_state"),
        # typed, so PostgreSQL knows what "$5 IS NULL" compares
        attempts=request.c.attempts + bindparam("b_n", type_=Integer),
        final_attempt_no=func.coalesce(bindparam("b_final", type_=Integer), request.c.final_attempt_no),
        error=bindparam("b_error", type_=Text),
        cost_picousd=_add_nullable(request.c.cost_picousd, bindparam("b_cost", type_=BigInteger)),
        reported_cost_picousd=_add_nullable(
            request.c.reported_cost_picousd, bindparam("b_reported", type_=BigInteger)
        ),
        finished_at=bindparam("b_finished", type_=DateTime),
    )
)
_STATE, _FINAL, _ERROR = (FINISH_KEYS.index(k) for k in ("b_state", "b_final", "b_error"))


@dataclass(frozen=True, slots=True)
class Recorded:
    """What committing a batch found: requests another worker had answered first (their state
    is kept), and the database's (attempts, cost_picousd, reported_cost_picousd) of requests
    that earlier sessions or other workers had attempted too."""

    kept: set[str]
    totals: dict[str, tuple[int, int | None, int | None]]


class _SqliteStatements:
    """The recorder's statements on SQLite, many rows per statement (see :class:`Rows`)."""

    def __init__(self, dialect: Any) -> None:
        probe = sqlite3.connect(":memory:")
        try:
            limit = probe.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        finally:
            probe.close()
        process = DateTime().dialect_impl(dialect).bind_processor(dialect)
        assert process is not None  # SQLite keeps datetimes as text

        def stamp(value: Any) -> Any:
            """SQLAlchemy's SQLite text of a datetime ("YYYY-MM-DD HH:MM:SS.ffffff")."""
            if value.__class__ is datetime and value.tzinfo is None:
                return value.isoformat(" ", "microseconds")
            return None if value is None else process(value)

        def stamp_all(values: Sequence[Any]) -> list[Any]:
            """``stamp`` of each value, in C loops when it can."""
            if values.count(values[0]) == len(values):  # one value (a batch's finishing time)
                return [stamp(values[0])] * len(values)
            if set(map(type, values)) == {datetime}:
                # orjson writes them all at once ("YYYY-MM-DDTHH:MM:SS.ffffff", quoted); only
                # the T differs, unless a value has no microseconds (orjson leaves them out)
                out = orjson.dumps(values).decode()[2:-2].replace("T", " ").split('","')
                if min(map(len, out)) == max(map(len, out)) == 26:  # naive (an offset is longer)
                    return out
                out = list(map(_ISO, values))
                if max(map(len, out)) == 26:
                    return out
            distinct = set(values)
            text = {v: stamp(v) for v in distinct}
            return list(map(text.__getitem__, values))

        def rows_for(width: int) -> int:
            """Rows per statement: a power of two, at most 1,024 and ~20,000 parameters (a
            compiled statement takes ~140 bytes per parameter, and the driver caches them)."""
            n = 1
            while n * 2 <= 1024 and n * 2 * width <= min(limit, 20_000):
                n *= 2
            return n

        self.stamp: Callable[[Any], Any] = stamp
        self.stamp_all: Callable[[Sequence[Any]], list[Any]] = stamp_all
        self.attempt = Rows(
            f"INSERT INTO attempt ({', '.join(ATTEMPT_KEYS)}) VALUES {{values}}",
            len(ATTEMPT_KEYS),
            max_rows=rows_for(len(ATTEMPT_KEYS)),
            shared=[ATTEMPT_KEYS.index(k) for k in ATTEMPT_SHARED],
            stamps=[ATTEMPT_KEYS.index("started_at")],
            stamp=stamp_all,
        )
        self.completion = Rows(
            f"INSERT INTO completion ({', '.join(COMPLETION_KEYS)}) VALUES {{values}}",
            len(COMPLETION_KEYS),
            max_rows=rows_for(len(COMPLETION_KEYS)),
            shared=[COMPLETION_KEYS.index(k) for k in COMPLETION_SHARED],
        )
        # _FINISH, for many rows: v.column1 .. v.column9 are the values of FINISH_KEYS
        v = {k: f"v.column{i + 1}" for i, k in enumerate(FINISH_KEYS)}
        self.finish = Rows(
            "UPDATE request SET "
            f"state = {v['b_state']}, attempts = request.attempts + {v['b_n']}, "
            f"final_attempt_no = coalesce({v['b_final']}, request.final_attempt_no), "
            f"error = {v['b_error']}, "
            f"cost_picousd = CASE WHEN {v['b_cost']} IS NULL THEN request.cost_picousd "
            f"ELSE coalesce(request.cost_picousd, 0) + {v['b_cost']} END, "
            f"reported_cost_picousd = CASE WHEN {v['b_reported']} IS NULL THEN request.reported_cost_picousd "
            f"ELSE coalesce(request.reported_cost_picousd, 0) + {v['b_reported']} END, "
            f"finished_at = {v['b_finished']} "
            "FROM (VALUES {values}) AS v "
            f"WHERE request.run_id = {v['b_run_id']} AND request.seq = {v['b_seq']}",
            len(FINISH_KEYS),
            max_rows=rows_for(len(FINISH_KEYS)),
            shared=[FINISH_KEYS.index(k) for k in FINISH_SHARED],
            stamps=[FINISH_KEYS.index("b_finished")],
            stamp=stamp_all,
        )

    # Store.write_outcomes' read-back of the sums of requests attempted before
    totals = (
        "SELECT custom_id, attempts, cost_picousd, reported_cost_picousd FROM request "
        "WHERE run_id = ? AND custom_id IN (SELECT value FROM json_each(?))"
    )

    def outcomes(self, rows: OutcomeRows) -> list[tuple[str, list[Any]]]:
        """The statements that write a batch (sets ``rows.finish_once``)."""
        statements = self.attempt.column_chunks(rows.attempt_columns)
        statements += self.completion.column_chunks(rows.completion_columns)
        # UPDATE ... FROM takes one source row per request: a request twice in a batch (never
        # seen, but possible in principle) goes row by row (Store.write_outcomes)
        seqs = rows.request_columns[FINISH_KEYS.index("b_seq")]
        rows.finish_once = len(set(seqs)) == len(seqs)
        if rows.finish_once:
            statements += self.finish.column_chunks(rows.request_columns)
        return statements

    def claims(
        self, run_id: str, pages: Sequence[tuple[Sequence[int], bool]], now: datetime
    ) -> list[tuple[str, Any]]:
        """The statements of claim pages: consecutive pages of one kind in one statement."""
        merged: list[tuple[list[int], bool]] = []
        for ids, release in pages:
            if merged and merged[-1][1] == release:
                merged[-1][0].extend(ids)
            else:
                merged.append((list(ids), release))
        return [self.claim(run_id, ids, release, now) for ids, release in merged]

    def claim(
        self, run_id: str, seqs: Sequence[int], release: bool, now: datetime
    ) -> tuple[str, tuple[Any, ...]]:
        """Store.claim's statement for any number of requests: their seqs as one JSON array."""
        ids = orjson.dumps(list(seqs)).decode()
        if release:
            return (
                # each found by its (run_id, seq) key (the planner looks at ``seq IN`` there)
                "UPDATE request SET state = 'pending', claimed_at = NULL WHERE run_id = ? "
                "AND state = 'in_flight' AND seq IN (SELECT value FROM json_each(?))",
                (run_id, ids),
            )
        return (
            "UPDATE request SET state = 'in_flight', claimed_at = ? WHERE run_id = ? "
            "AND seq IN (SELECT value FROM json_each(?))",
            (self.stamp(now), run_id, ids),
        )


class _SqliteWriter:
    """The connection the recorder's transactions use on a SQLite file, apart from the pool,
    in a thread of its own that runs them one after another as they are submitted.

    A whole transaction is one job of that thread (``submit``): a thread that runs Python takes
    the GIL back each time SQLite gives it up (after each statement), and while the event loop
    is busy it waits up to a switch interval each time, so a transaction costs as few trips as
    it can: one statement per chunk of rows, no pool checkout or reset. The thread goes from one
    job to the next without the event loop: the recorder submits a batch while the one before
    it commits, and the event loop, busy building the next batch's rows for ~10 ms at a time,
    learns of each commit when it is free (through the loop's ``call_soon_threadsafe``). With a
    thread handed one transaction at a time (``anyio.to_thread``), the writer waited for the
    event loop twice per batch, a quarter of the recorder's time (``bench/recorder.py``).
    Transactions are ``BEGIN IMMEDIATE`` (the write lock first, waiting for it as the pool's
    connections do) and never stay open between jobs, so the pool's connections (reads, setup
    writes) wait at most one transaction for it.

    The WAL is copied into the database file (checkpointed) by a thread of its own after each
    commit, while the next transaction is written: in the committing thread, as SQLite does by
    default, it took a fifth of the recorder's time in SQLite (``bench/recorder.py``).
    """

    def __init__(
        self, statements: _SqliteStatements, url: str, args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> None:
        self.statements = statements
        self._url = url
        self._args = list(args)
        # the driver keeps compiled statements (up to ~3 MB each): 32 hold the shapes of a few
        # kinds of batch
        self._kwargs = {
            "cached_statements": 32,
            **kwargs,
            "isolation_level": None,
            "check_same_thread": False,
        }
        self._conn: sqlite3.Connection | None = None
        self._autocheckpoint: int | None = None
        self._jobs: queue.SimpleQueue[_Job[Any] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._checkpoints = _Checkpointer(self._connect)

    def _connect(self) -> sqlite3.Connection:
        conn: sqlite3.Connection = sqlite3.connect(*self._args, **self._kwargs)
        _sqlite_pragmas(conn, None)
        # Its statements check their keys themselves (Store.start_outcomes: every request of a
        # batch found by its UPDATE; claims only update requests' states): SQLite's check of
        # each attempt's and completion's parent key, a seek into the parent's index per row,
        # was a tenth of the writer's instructions (callgrind, bench/recorder.py's rows).
        conn.execute("PRAGMA foreign_keys=OFF")
        return conn

    def submit(self, work: Callable[[sqlite3.Connection], _T]) -> asyncio.Future[_T]:
        """Queue ``work`` as one transaction; the future (of the running event loop) has its
        result, or a StorageError. The transaction runs whatever becomes of the future."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="pipeline-sqlite-writer", daemon=True)
            self._thread.start()
        self._jobs.put(_Job(work, loop, future))
        return future

    async def run(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """``submit`` and wait for the transaction's end, even when cancelled meanwhile."""
        future = self.submit(work)
        with anyio.CancelScope(shield=True):
            result = await future
        return result

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            result: Any = None
            error: BaseException | None = None
            try:
                result = self._transaction(job.work)
            except sqlite3.Error as exc:
                error = StorageError(_explain(exc, self._url))
                error.__cause__ = exc
            except BaseException as exc:  # a bug in the job: its caller raises it
                error = exc
            with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody waits
                job.loop.call_soon_threadsafe(_settle, job.future, result, error)

    def _transaction(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        conn = self._conn
        if conn is None:
            conn = self._conn = self._connect()
        # the checkpoints' thread copies the WAL; if it stopped, SQLite does it again
        autocheckpoint = 0 if self._checkpoints.working else AUTOCHECKPOINT_PAGES
        if autocheckpoint != self._autocheckpoint:
            conn.execute(f"PRAGMA wal_autocheckpoint={autocheckpoint}")
            self._autocheckpoint = autocheckpoint
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = work(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self._checkpoints.nudge()
        return result

    def close(self) -> None:
        """Ends the thread once the jobs queued before have run."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None
        self._checkpoints.close()
        if self._conn is not None:
            self._conn.close()
            self._conn = None


@dataclass(frozen=True, slots=True)
class _Job(Generic[_T]):
    work: Callable[[sqlite3.Connection], _T]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[_T]


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class _Checkpointer:
    """A thread with its own connection that checkpoints the WAL (PASSIVE: it never blocks
    the writer) each time it is nudged after a commit. It starts with the first nudge; an
    error stops it (``working`` turns False) and leaves the checkpoints to SQLite."""

    def __init__(self, connect: Callable[[], sqlite3.Connection]) -> None:
        self._connect = connect
        self._due = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.working = True

    def nudge(self) -> None:
        if not self.working:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="pipeline-wal-checkpoints", daemon=True)
            self._thread.start()
        self._due.set()

    def _loop(self) -> None:
        try:
            conn = self._connect()
        except sqlite3.Error:
            self.working = False
            return
        try:
            while True:
                self._due.wait()
                if self._stopping:
                    return
                self._due.clear()
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error:
            self.working = False  # e.g. the disk is full: the writer's own commit will say so
        finally:
            conn.close()

    def close(self) -> None:
        if self._thread is not None:
            self._stopping = True
            self._due.set()
            self._thread.join()
            self._thread = None


# SQLite copies the WAL into the database once it holds this many pages (its default, 1,000
# pages, was 4 MB with SQLite's default 4 KB pages; it stays 4 MB with ours).
AUTOCHECKPOINT_PAGES = 250


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # A new database gets 16 KB pages (an existing one keeps its own): a batch's transaction
    # writes its pages to the WAL one write each, and the checkpoints copy them one by one;
    # with 4 KB pages the recorder committed 3-7% fewer outcomes a second, for ~1-3 us more
    # CPU per outcome (bench/recorder.py). Set before WAL mode, which creates the file.
    cur.execute("PRAGMA page_size=16384")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA wal_autocheckpoint={AUTOCHECKPOINT_PAGES}")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


# The columns of a loaded request's rows (Store._insert_requests), in their order.
_LOAD_KEYS = ("run_id", "custom_id", "seq", "body_sha256", "state", "attempts", "error")
_LOAD_INPUT_KEYS = ("run_id", "seq", "body", "record")


def chunked(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
