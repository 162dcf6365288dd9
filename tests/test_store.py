"""The schema: Alembic migrates a blank database to head, and the models agree with it; the
recorder's statements store what plain SQLAlchemy statements would.

On the suite's backend (SQLite, or PostgreSQL with --db-backend=postgresql)."""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import anyio
import orjson
import outcomes
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from helpers import as_datetime, is_url, query
from sqlalchemy import DateTime, insert, inspect, select, text, update

from pipeline.errors import StorageError
from pipeline.pricing import picousd
from pipeline.records import Attempt, Outcome
from pipeline.spec import db_url
from pipeline.store import Store
from pipeline.store.db import utcnow
from pipeline.store.schema import VIEWS, attempt, autogenerate_options, completion, metadata, request


def test_blank_database_migrates_to_head_with_tables_and_views(workdir: Path, db: str) -> None:
    """`Store.open` migrates a new database: tables, audit views, the head revision."""

    async def go() -> tuple[str, set[str], set[str]]:
        store = await Store.open(db_url(db))
        try:
            async with store.engine.connect() as conn:
                tables, views = await conn.run_sync(
                    lambda c: (set(inspect(c).get_table_names()), set(inspect(c).get_view_names()))
                )
            return await store.migrate(), tables, views  # a second upgrade is a no-op
        finally:
            await store.close()

    head, tables, views = anyio.run(go)
    assert {"run", "request", "request_input", "attempt", "completion"} <= tables
    assert views == set(VIEWS)
    assert query(db, "SELECT version_num FROM alembic_version") == [(head,)]
    assert head == "0008"


async def _migrate_to(store: Store, revision: str, *, down: bool = False) -> None:
    from alembic import command
    from alembic.config import Config

    from pipeline.store.db import migrations_dir

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))

    def move(connection: Any) -> None:
        cfg.attributes["connection"] = connection
        (command.downgrade if down else command.upgrade)(cfg, revision)

    async with store.engine.begin() as conn:
        await conn.run_sync(move)


async def _run_at_revision(store: Store, revision: str) -> datetime:
    """The store's database at ``revision`` with one run ('r') in it; the time it was made."""
    await _migrate_to(store, revision)
    now = utcnow()
    async with store.engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO run (run_id, job, spec_json, input_path, input_sha256, loaded, state, "
                "created_at) VALUES ('r', 'j', '{}', 'x', 'h', :t, 'running', :now)"
            ),
            {"t": True, "now": now},
        )
    return now


def test_bodies_of_runs_before_0005_move_to_request_input_and_back(workdir: Path, db: str) -> None:
    """A database of revision 0004 with a run (bodies and records in ``request``, one request
    answered): after the upgrade the run's requests read back the same bodies and records from
    ``request_input``, ``request`` has lost the two columns, and every key still holds; the
    downgrade puts them back."""
    bodies = [orjson.dumps({"messages": [{"role": "user", "content": f"q{i} ✓"}]}).decode() for i in range(4)]
    table = "request"

    async def go() -> tuple[Any, ...]:
        store = await Store.open(db_url(db), migrate=False)
        try:
            now = await _run_at_revision(store, "0004")
            async with store.engine.begin() as conn:
                for i, body in enumerate(bodies):
                    await conn.execute(
                        text(
                            "INSERT INTO request (run_id, custom_id, seq, body_sha256, body, record, state, "
                            "attempts) VALUES ('r', :cid, :seq, 'h', :body, :record, :state, :n)"
                        ),
                        {
                            "cid": f"c{i}",
                            "seq": i,
                            "body": body,
                            "record": orjson.dumps({"id": i}).decode() if i % 2 else None,
                            "state": "succeeded" if i == 0 else "pending",
                            "n": 1 if i == 0 else 0,
                        },
                    )
                await conn.execute(
                    text(
                        "INSERT INTO attempt (run_id, custom_id, attempt_no, endpoint, base_url, model, "
                        "started_at, outcome) VALUES ('r', 'c0', 1, 'e', 'http://x', 'm', :now, 'success')"
                    ),
                    {"now": now},
                )
            await store.migrate()
            page = await store.pending_page("r", -1, 10)
            records = [r async for page_ in store.result_records("r") for r in page_]
            async with store.engine.connect() as conn:
                columns = await conn.run_sync(lambda c: [k["name"] for k in inspect(c).get_columns(table)])
                if conn.dialect.name == "sqlite":  # PostgreSQL checks every key as it goes
                    assert (await conn.execute(text("PRAGMA foreign_key_check"))).all() == []
            await _migrate_to(store, "0004", down=True)
            async with store.engine.connect() as conn:
                back = (await conn.execute(text("SELECT body, record FROM request ORDER BY seq"))).all()
            return page, records, columns, back
        finally:
            await store.close()

    page, records, columns, back = anyio.run(go)
    assert [(seq, cid, body, record) for seq, cid, body, record, _, _ in page] == [
        (i, f"c{i}", bodies[i], '{"id":' + str(i) + "}" if i % 2 else None) for i in (1, 2, 3)
    ]
    assert records == [None, '{"id":1}', None, '{"id":3}']
    assert "body" not in columns and "record" not in columns and "body_sha256" in columns
    assert [tuple(r) for r in back] == [
        (body, '{"id":' + str(i) + "}" if i % 2 else None) for i, body in enumerate(bodies)
    ]


def test_attempts_before_0006_are_keyed_by_their_requests_seq_and_back(workdir: Path, db: str) -> None:
    """A database of revision 0005 with attempts and completions keyed by custom id (ids not in
    input order): after the upgrade each row has its request's seq and is keyed by it, every
    value kept, the audit view answers as before; the downgrade keys them by custom id again."""
    ids = ["f3c1", "0a9e", "7d42"]  # seq 0, 1, 2
    rows = [("f3c1", 1, "timeout", None), ("f3c1", 2, "success", "first"), ("7d42", 1, "success", "third")]

    async def go() -> tuple[Any, ...]:
        store = await Store.open(db_url(db), migrate=False)
        try:
            now = await _run_at_revision(store, "0005")
            async with store.engine.begin() as conn:
                for seq, cid in enumerate(ids):
                    done = cid != "0a9e"
                    await conn.execute(
                        text(
                            "INSERT INTO request (run_id, custom_id, seq, body_sha256, state, attempts, "
                            "final_attempt_no) VALUES ('r', :cid, :seq, 'h', :state, :n, :final)"
                        ),
                        {
                            "cid": cid,
                            "seq": seq,
                            "state": "succeeded" if done else "pending",
                            "n": {"f3c1": 2, "7d42": 1}.get(cid, 0),
                            "final": {"f3c1": 2, "7d42": 1}.get(cid),
                        },
                    )
                for cid, no, outcome, content in rows:
                    await conn.execute(
                        text(
                            "INSERT INTO attempt (run_id, custom_id, attempt_no, endpoint, base_url, model, "
                            "started_at, outcome, prompt_tokens) "
                            "VALUES ('r', :cid, :no, 'e', 'http://x', 'm', :now, :outcome, :no)"
                        ),
                        {"cid": cid, "no": no, "now": now, "outcome": outcome},
                    )
                    if content is not None:
                        await conn.execute(
                            text(
                                "INSERT INTO completion (run_id, custom_id, attempt_no, content, raw) "
                                "VALUES ('r', :cid, :no, :content, '{}')"
                            ),
                            {"cid": cid, "no": no, "content": content},
                        )

            async def state() -> tuple[Any, ...]:
                async with store.engine.connect() as conn:
                    keys = await conn.run_sync(
                        lambda c: [
                            inspect(c).get_pk_constraint(t)["constrained_columns"]
                            for t in ("attempt", "completion")
                        ]
                    )
                    if conn.dialect.name == "sqlite":  # PostgreSQL checks every key as it goes
                        assert (await conn.execute(text("PRAGMA foreign_key_check"))).all() == []
                    view = (
                        await conn.execute(
                            text(
                                "SELECT custom_id, seq, content, prompt_tokens FROM request_result "
                                "ORDER BY seq"
                            )
                        )
                    ).all()
                    counts = (await conn.execute(text("SELECT COUNT(*) FROM attempt_bill"))).all()
                return keys, [tuple(r) for r in view], counts

            await store.migrate()
            upgraded = await state()
            async with store.engine.connect() as conn:
                attempts = (
                    await conn.execute(
                        text(
                            "SELECT seq, custom_id, attempt_no, outcome FROM attempt ORDER BY seq, attempt_no"
                        )
                    )
                ).all()
                completions = (
                    await conn.execute(
                        text("SELECT seq, custom_id, attempt_no, content FROM completion ORDER BY seq")
                    )
                ).all()
            results = [(r["custom_id"], r["content"]) async for page in store.iter_results("r") for r in page]
            await _migrate_to(store, "0005", down=True)
            downgraded = await state()
            async with store.engine.connect() as conn:
                columns = await conn.run_sync(
                    lambda c: [k["name"] for k in inspect(c).get_columns("attempt")]
                )
            return upgraded, downgraded, attempts, completions, results, columns
        finally:
            await store.close()

    upgraded, downgraded, attempts, completions, results, columns = anyio.run(go)
    view = [("f3c1", 0, "first", 2), ("0a9e", 1, None, None), ("7d42", 2, "third", 1)]
    assert upgraded == ([["run_id", "seq", "attempt_no"]] * 2, view, [(3,)])
    assert [tuple(r) for r in attempts] == [
        (0, "f3c1", 1, "timeout"),
        (0, "f3c1", 2, "success"),
        (2, "7d42", 1, "success"),
    ]
    assert [tuple(r) for r in completions] == [(0, "f3c1", 2, "first"), (2, "7d42", 1, "third")]
    assert results == [("f3c1", "first"), ("0a9e", None), ("7d42", "third")]
    assert downgraded == ([["run_id", "custom_id", "attempt_no"]] * 2, view, [(3,)])
    assert "seq" not in columns


@pytest.mark.sqlite_only("the index is dropped on SQLite only")
def test_the_request_state_index_goes_on_sqlite_at_0007_and_comes_back(workdir: Path, db: str) -> None:
    """0007 drops SQLite's index on (run_id, state, seq), whose entries moved at every change of
    a request's state; downgrading makes it again."""

    def indexes() -> set[str]:
        return {name for (name,) in query(db, "SELECT name FROM sqlite_master WHERE type = 'index'")}

    async def go(revision: str, down: bool = False) -> None:
        store = await Store.open(db_url(db), migrate=False)
        try:
            await _migrate_to(store, revision, down=down)
        finally:
            await store.close()

    anyio.run(go, "0006")
    assert "ix_request_run_id_state_seq" in indexes()
    anyio.run(go, "head")
    assert "ix_request_run_id_state_seq" not in indexes()
    anyio.run(go, "0006", True)
    assert "ix_request_run_id_state_seq" in indexes()


def test_usage_json_leaves_the_attempt_at_0008_and_comes_back_from_the_completions(
    workdir: Path, db: str
) -> None:
    """0008 drops ``attempt.usage_json`` (the same usage object is in ``completion.raw``); the
    downgrade adds it back, filled from each attempt's completion, NULL where the usage was our
    estimate or there is no completion."""
    usage = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12, "cost": 0.0001}

    async def go() -> tuple[list[str], list[tuple[Any, ...]]]:
        store = await Store.open(db_url(db), migrate=False)
        try:
            now = await _run_at_revision(store, "0007")
            async with store.engine.begin() as conn:
                for seq, estimated in ((0, False), (1, True), (2, False)):
                    await conn.execute(
                        text(
                            "INSERT INTO request (run_id, custom_id, seq, body_sha256, state, attempts) "
                            "VALUES ('r', :cid, :seq, 'h', 'succeeded', 1)"
                        ),
                        {"cid": f"c{seq}", "seq": seq},
                    )
                    await conn.execute(
                        text(
                            "INSERT INTO attempt (run_id, seq, custom_id, attempt_no, endpoint, base_url, "
                            "model, started_at, outcome, usage_estimated, usage_json) VALUES ('r', :seq, "
                            ":cid, 1, 'e', 'http://x', 'm', :now, 'success', :est, :usage)"
                        ),
                        {
                            "seq": seq,
                            "cid": f"c{seq}",
                            "now": now,
                            "est": estimated,
                            "usage": None if estimated else orjson.dumps(usage).decode(),
                        },
                    )
                    if seq < 2:  # the third attempt has no completion
                        raw = {"id": f"x{seq}", "usage": {**usage, "estimated": True} if estimated else usage}
                        await conn.execute(
                            text(
                                "INSERT INTO completion (run_id, seq, custom_id, attempt_no, raw) "
                                "VALUES ('r', :seq, :cid, 1, :raw)"
                            ),
                            {"seq": seq, "cid": f"c{seq}", "raw": orjson.dumps(raw).decode()},
                        )
            await store.migrate()
            async with store.engine.connect() as conn:
                columns = await conn.run_sync(
                    lambda c: [k["name"] for k in inspect(c).get_columns("attempt")]
                )
            await _migrate_to(store, "0007", down=True)
            async with store.engine.connect() as conn:
                back = (await conn.execute(text("SELECT seq, usage_json FROM attempt ORDER BY seq"))).all()
            return columns, [tuple(r) for r in back]
        finally:
            await store.close()

    columns, back = anyio.run(go)
    assert "usage_json" not in columns and "prompt_tokens" in columns
    assert [(seq, None if u is None else orjson.loads(u)) for seq, u in back] == [
        (0, usage),
        (1, None),
        (2, None),
    ]


@pytest.mark.sqlite_only("WAL is a SQLite journal mode")
def test_sqlite_database_runs_in_wal_mode(workdir: Path, db: str) -> None:
    """A SQLite file opened by the store is in WAL mode."""

    async def go() -> None:
        store = await Store.open(db_url(db))
        await store.close()

    anyio.run(go)
    assert query(db, "PRAGMA journal_mode") == [("wal",)]


def test_schema_module_and_migrations_agree(workdir: Path, db: str) -> None:
    """Autogenerate finds no difference between the migrated database and schema.py."""

    async def go() -> list[Any]:
        store = await Store.open(db_url(db))
        try:
            async with store.engine.connect() as conn:
                return await conn.run_sync(
                    lambda c: compare_metadata(
                        MigrationContext.configure(c, opts=autogenerate_options(c.dialect.name)), metadata
                    )
                )
        finally:
            await store.close()

    assert anyio.run(go) == []


def test_views_answer_on_an_empty_database(workdir: Path, db: str) -> None:
    """Every audit view is valid SQL on the backend (empty result, no error)."""

    async def go() -> None:
        store = await Store.open(db_url(db))
        try:
            for name in VIEWS:
                assert await store.execute_text(f"SELECT * FROM {name}") == []
        finally:
            await store.close()

    anyio.run(go)


# -- the recorder's statements ---------------------------------------------------------------


def _attempt_values(run_id: str, o: Outcome, a: Attempt) -> dict[str, Any]:
    u = a.usage
    return {
        "run_id": run_id,
        "seq": o.seq,
        "custom_id": o.custom_id,
        "attempt_no": a.attempt_no,
        "endpoint": a.endpoint,
        "base_url": a.base_url,
        "model": a.model,
        "started_at": a.started_at,
        "latency_ms": a.latency_ms,
        "http_status": a.http_status,
        "outcome": a.outcome,
        "error_class": a.error_class,
        "error_message": a.error_message,
        "retry_after_s": a.retry_after_s,
        "wait_s": a.wait_s,
        "provider_request_id": a.provider_request_id,
        "prompt_tokens": u and u.prompt,
        "completion_tokens": u and u.completion,
        "total_tokens": u and u.total,
        "cached_tokens": u and u.cached,
        "cache_write_tokens": u and u.cache_write,
        "reasoning_tokens": u and u.reasoning,
        "audio_prompt_tokens": u and u.audio_prompt,
        "audio_completion_tokens": u and u.audio_completion,
        "accepted_prediction_tokens": u and u.accepted_prediction,
        "rejected_prediction_tokens": u and u.rejected_prediction,
        "usage_estimated": None if u is None else u.estimated,
        "cost_picousd": a.cost_picousd,
        "cost_source": a.cost_source,
        "cost_note": a.cost_note,
        "reported_cost_picousd": None if u is None or u.reported_cost is None else picousd(u.reported_cost),
        "upstream_cost_picousd": None if u is None or u.upstream_cost is None else picousd(u.upstream_cost),
        "stream": a.stream,
        "ttft_ms": a.ttft_ms,
        "ttlt_ms": a.ttlt_ms,
        "output_tokens_per_s": a.output_tokens_per_s,
        "partial": a.partial,
    }


def _completion_values(run_id: str, o: Outcome, a: Attempt) -> dict[str, Any]:
    c = a.completion
    assert c is not None
    first = c.choices[0]
    return {
        "run_id": run_id,
        "seq": o.seq,
        "custom_id": o.custom_id,
        "attempt_no": a.attempt_no,
        "response_id": c.response_id,
        "model": c.model,
        "provider": c.provider,
        "system_fingerprint": c.system_fingerprint,
        "finish_reason": first.finish_reason,
        "content": first.content,
        "reasoning": first.reasoning,
        "refusal": first.refusal,
        "tool_calls": None if first.tool_calls is None else orjson.dumps(first.tool_calls).decode(),
        "choices_json": None
        if len(c.choices) < 2
        else orjson.dumps([x.to_dict() for x in c.choices]).decode(),
        "raw": c.raw.decode(),
        "parsed": a.parsed,
        "validation_error": a.validation_error,
    }


async def _record_plainly(store: Store, run_id: str, outcomes: Sequence[Outcome]) -> None:
    """What Store.record_outcomes means, said the plain SQLAlchemy way: one statement per row,
    every new value of a request computed in Python from the row as it is."""
    now = utcnow()
    async with store.engine.begin() as conn:
        for o in outcomes:
            for a in o.attempts:
                await conn.execute(insert(attempt).values(_attempt_values(run_id, o, a)))
                if a.completion is not None:
                    await conn.execute(insert(completion).values(_completion_values(run_id, o, a)))
            where = (request.c.run_id == run_id) & (request.c.custom_id == o.custom_id)
            old = (await conn.execute(select(request).where(where))).mappings().one()
            costs = [a.cost_picousd for a in o.attempts if a.cost_picousd is not None]
            reported = [
                picousd(a.usage.reported_cost)
                for a in o.attempts
                if a.usage and a.usage.reported_cost is not None
            ]
            values = {
                "state": o.state,
                "attempts": old["attempts"] + len(o.attempts),
                "final_attempt_no": o.attempts[-1].attempt_no if o.attempts else old["final_attempt_no"],
                "error": o.error,
                "cost_picousd": (old["cost_picousd"] or 0) + sum(costs) if costs else old["cost_picousd"],
                "reported_cost_picousd": (old["reported_cost_picousd"] or 0) + sum(reported)
                if reported
                else old["reported_cost_picousd"],
                "finished_at": None if o.state == "pending" else now,
            }
            await conn.execute(update(request).where(where).values(values))


async def _loaded(url: str, n: int) -> Store:
    store = await Store.open(url)
    await store.create_run(
        run_id="r", job="j", spec_json="{}", input_path="x", input_sha256="h", state="running"
    )
    await store.load_requests("r", outcomes.batches(outcomes.request_rows(n)))
    return store


def _tables(db: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the run's tables; on SQLite with each value's storage class too."""
    out = {}
    for table, key in (
        ("attempt", "custom_id, attempt_no"),
        ("completion", "custom_id, attempt_no"),
        ("request", "seq"),
    ):
        names = [c.name for c in metadata.tables[table].columns if c.name != "finished_at"]
        cols = ", ".join(names)
        if not is_url(db):
            cols += ", " + ", ".join(f"typeof({c})" for c in names)
        if table == "request":  # the finishing time is the batch's: only whether there is one
            cols += ", finished_at IS NULL"
            if not is_url(db):  # and its text
                cols += ", typeof(finished_at), length(finished_at)"
        out[table] = query(db, f"SELECT {cols} FROM {table} ORDER BY {key}")
    return out


def test_recorded_rows_are_those_of_plain_sqlalchemy_statements(new_db: Callable[[str], str]) -> None:
    """Every kind of outcome, answered twice (a resumed session): record_outcomes stores the
    values, storage classes and sums that one plain SQLAlchemy statement per row stores."""
    fast, plain = new_db("fast.db"), new_db("plain.db")
    first = outcomes.varied(3 * outcomes.KINDS)
    second = outcomes.again(first[: outcomes.KINDS + 3])

    async def go() -> None:
        for db, record in ((fast, None), (plain, _record_plainly)):
            store = await _loaded(db_url(db), len(first))
            try:
                for batch in (first, second):
                    if record is None:
                        await store.record_outcomes("r", batch)
                    else:
                        await record(store, "r", batch)
            finally:
                await store.close()

    anyio.run(go)
    got, want = _tables(fast), _tables(plain)
    assert [len(got[t]) for t in got] == [len(want[t]) for t in want] == [35, 26, 24]
    assert got == want


def test_many_batches_of_many_sizes_are_stored_whole(new_db: Callable[[str], str]) -> None:
    """Batches of 1 to 1,100 outcomes (chunks of every size, all-NULL columns and not): every
    attempt, completion and finished state is there, values as plain statements store them."""
    fast, plain = new_db("fast.db"), new_db("plain.db")
    every = outcomes.varied(2_500)
    sizes = [1, 2, 3, 7, 64, 100, 1_100, 200, 1_023]

    async def go() -> None:
        for db, record in ((fast, None), (plain, _record_plainly)):
            store = await _loaded(db_url(db), len(every))
            try:
                k = 0
                for size in sizes:
                    batch = every[k : k + size]
                    k += size
                    if record is None:
                        await store.record_outcomes("r", batch)
                    else:
                        await record(store, "r", batch)
            finally:
                await store.close()

    anyio.run(go)
    assert _tables(fast) == _tables(plain)


def test_tallies_are_the_counts_and_the_bill_of_the_rows(db: str) -> None:
    """Store.tallies (the end of a run): requests per state and the sums over every attempt,
    as plain SQL over the stored rows gives them, and as the two separate reads give them."""
    every = outcomes.varied(3 * outcomes.KINDS)

    async def go() -> tuple[Any, ...]:
        store = await _loaded(db_url(db), len(every) + 5)  # 5 requests left pending
        try:
            await store.record_outcomes("r", every)
            return await store.tallies("r"), await store.state_counts("r"), await store.usage_totals("r")
        finally:
            await store.close()

    (counts, totals), counts_alone, totals_alone = anyio.run(go)
    assert (counts, totals) == (counts_alone, totals_alone)
    assert counts == dict(query(db, "SELECT state, COUNT(*) FROM request GROUP BY state"))
    assert counts["pending"] == 5 + sum(o.state == "pending" for o in every)
    assert sum(counts.values()) == len(every) + 5 and len(counts) > 2
    (want,) = query(
        db,
        "SELECT COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), SUM(cached_tokens), "
        "SUM(reasoning_tokens), SUM(cost_picousd), SUM(reported_cost_picousd), "
        "SUM(CASE WHEN cost_picousd IS NULL AND total_tokens IS NOT NULL THEN 1 ELSE 0 END) FROM attempt",
    )
    assert tuple(totals.values()) == tuple(None if v is None else int(v) for v in want)
    assert totals["attempts"] == sum(len(o.attempts) for o in every)
    assert totals["prompt_tokens"] and totals["cost_picousd"] and totals["reported_cost_picousd"]


@pytest.mark.sqlite_only("SQLite's query plans")
def test_pages_of_requests_are_read_in_seq_order_from_an_index_not_sorted(db: str) -> None:
    """The feeder's pages (new runs and resumes) and the result pages take their requests in
    input order from an index and stop at the page's end: no query sorts the run's requests
    (joined to request_input in the FROM, SQLite sorted every later request for each page)."""
    from sqlalchemy import event

    seen: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, many: bool) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "request" in statement and not many:
            seen.append((statement, parameters))

    async def go() -> None:
        store = await _loaded(db_url(db), 300)
        event.listen(store.engine.sync_engine, "before_cursor_execute", capture)
        try:
            for states in (("pending",), ("pending", "in_flight"), ("pending", "in_flight", "failed")):
                assert len(await store.pending_page("r", 10, 50, states)) == 50
            assert [len(p["seq"]) async for p in store.result_pages("r", page=100)] == [100, 100, 100]
            assert [len(p) async for p in store.result_records("r", page=100)] == [100, 100, 100]
        finally:
            await store.close()

    anyio.run(go)
    assert len(seen) == 3 + 4 + 4
    for statement, parameters in seen:
        plan = " / ".join(row[3] for row in query(db, "EXPLAIN QUERY PLAN " + statement, *parameters))
        assert "TEMP B-TREE" not in plan and "SCAN request " not in plan + " ", (statement, plan)


@pytest.mark.sqlite_only("SQLite's query plans")
def test_the_recorders_updates_find_each_request_by_its_seq_in_an_index(db: str) -> None:
    """Claims, give-backs and a batch's finishing UPDATE look each request up by (run_id, seq)
    in an index, never by going through the run's requests (nor by custom_id, which is often
    random and would take a page of the index per request)."""
    every = outcomes.varied(40)

    async def go() -> list[tuple[str, Any]]:
        store = await _loaded(db_url(db), 300)
        try:
            writer = store._writer
            assert writer is not None
            rows = store.outcome_rows("r", every)
            assert rows.statements is not None and rows.finish_once
            updates = [(sql, params) for sql, params in rows.statements if sql.startswith("UPDATE")]
            claims = writer.statements.claims("r", [([1, 2, 3], False), ([2], True)], utcnow())
            assert updates and len(claims) == 2  # finishing the batch's requests; claim, give back
            return updates + claims
        finally:
            await store.close()

    for statement, parameters in anyio.run(go):
        plan = " / ".join(row[3] for row in query(db, "EXPLAIN QUERY PLAN " + statement, *parameters))
        assert "SCAN request" not in plan and re.search(r"SEARCH request USING .*seq=\?", plan), plan


def test_a_batch_that_fails_leaves_nothing_of_itself(db: str, workdir: Path) -> None:
    """An outcome for a request that is not in the run: StorageError, and none of the batch's
    rows are stored (its good outcomes neither)."""
    good = outcomes.varied(10)
    bad = outcomes.outcome(0)
    bad.custom_id = "not-loaded"

    async def go() -> None:
        store = await _loaded(db_url(db), len(good))
        try:
            with pytest.raises(StorageError, match="database"):
                await store.record_outcomes("r", [*good, bad])
        finally:
            await store.close()

    anyio.run(go)
    assert query(db, "SELECT COUNT(*) FROM attempt") == [(0,)]
    assert query(db, "SELECT COUNT(*) FROM completion") == [(0,)]
    assert query(db, "SELECT DISTINCT state FROM request") == [("pending",)]


def test_an_outcome_of_a_request_not_in_the_run_fails_its_batch(db: str, workdir: Path) -> None:
    """An outcome whose request (its seq) was never loaded: its attempt and completion would
    have no parent row. The batch fails with a StorageError naming the broken key, and none of
    it is stored. On SQLite the recorder's connection checks no foreign keys itself: the
    finishing UPDATE's count of requests found is the check."""
    good = outcomes.varied(10)
    stray = outcomes.outcome(10)  # requests 0..9 are loaded: seq 10 is not

    async def go() -> None:
        store = await _loaded(db_url(db), len(good))
        try:
            with pytest.raises(StorageError, match=r"(?i)foreign key") as caught:
                await store.record_outcomes("r", [*good, stray])
            if store.engine.dialect.name == "sqlite":
                assert "1 of the batch's 11 requests are not in run 'r'" in str(caught.value)
        finally:
            await store.close()

    anyio.run(go)
    assert query(db, "SELECT COUNT(*) FROM attempt") == [(0,)]
    assert query(db, "SELECT COUNT(*) FROM completion") == [(0,)]
    assert query(db, "SELECT DISTINCT state FROM request") == [("pending",)]


def test_claims_in_one_transaction_mark_and_give_back_requests(db: str, workdir: Path) -> None:
    """claim_pages: pages claimed (in flight, with the claim time) and given back (only those
    still in flight: pending again, claim time cleared), in order."""
    ids = [outcomes.custom_id(i) for i in range(10)]
    seqs = list(range(10))

    async def go() -> None:
        store = await _loaded(db_url(db), 10)
        try:
            pages = [(seqs[:4], False), (seqs[4:8], False), (seqs[2:6], True), ([], False)]
            await store.claim_pages("r", pages)
            await store.claim("r", seqs[9:], release=True)  # not in flight: left alone
            await store.claim("r", seqs[8:9])
        finally:
            await store.close()

    anyio.run(go)
    got = query(db, "SELECT custom_id, state, claimed_at FROM request ORDER BY seq")
    states = [(cid, st) for cid, st, _ in got]
    assert states == [(c, "in_flight") for c in ids[:2]] + [(c, "pending") for c in ids[2:6]] + [
        (c, "in_flight") for c in ids[6:9]
    ] + [(ids[9], "pending")]
    claimed = {cid: at for cid, _, at in got}
    assert all(claimed[c] is None for c in ids[2:6] + ids[9:])
    stamps = [as_datetime(claimed[c]) for c in ids[:2] + ids[6:9]]
    assert all(abs((s - utcnow()).total_seconds()) < 60 for s in stamps)
    if not is_url(db):  # SQLAlchemy's SQLite text for a datetime
        assert all(
            re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}", claimed[c]) for c in ids[:2] + ids[6:9]
        )


@pytest.mark.sqlite_only("the SQLite text of datetimes")
def test_sqlite_datetime_text_is_sqlalchemy_s(workdir: Path) -> None:
    """The recorder's own datetime text is SQLAlchemy's DATETIME text on SQLite, to the character."""
    from sqlalchemy.dialects import sqlite as sqlite_dialect

    from pipeline.store.db import _SqliteStatements

    dialect = sqlite_dialect.dialect()
    process = DateTime().dialect_impl(dialect).bind_processor(dialect)
    assert process is not None
    statements = _SqliteStatements(dialect)
    values = [
        datetime(2026, 11, 24, 12, 30, 15, 123456),
        datetime(2026, 11, 24, 12, 30, 15),  # no microseconds: still six digits
        datetime(5, 1, 2, 3, 4, 5, 6),
        datetime(2026, 1, 1, tzinfo=UTC),
        datetime(2026, 1, 1, 1, tzinfo=timezone(timedelta(hours=2))),
        None,
    ]
    assert [statements.stamp(v) for v in values] == [process(v) for v in values]
    naive = [datetime(2026, 11, 24) + timedelta(microseconds=7 * i) for i in range(100)]
    # C loops (orjson's text, or isoformat when a value has no microseconds), or not
    for column in (naive[1:], naive, [naive[0]] * 50 + [None] * 50, naive + values, values * 20):
        assert statements.stamp_all(column) == [process(v) for v in column]


def _columns(rows: Sequence[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Rows given column by column, as Rows.column_chunks takes them."""
    return list(zip(*rows, strict=True))


def test_rows_chunks_cover_the_rows_in_order_with_null_columns_as_literals() -> None:
    """Rows: chunks of powers of two, in order; a column NULL in a whole chunk is a literal."""
    from pipeline.store.prepared import Rows

    rows = [(i, None if i < 5 else f"v{i}", None, i * 2) for i in range(13)]
    stmt = Rows("INSERT INTO t VALUES {values}", 4, max_rows=8)
    chunks = stmt.column_chunks(_columns(rows))
    assert [sql.count("(") for sql, _ in chunks] == [8, 4, 1]
    sql, params = chunks[0]
    assert sql == "INSERT INTO t VALUES " + ",".join(["(?,?,NULL,?)"] * 8)
    assert params == [x for r in rows[:8] for x in (r[0], r[1], r[3])]
    assert chunks[2] == ("INSERT INTO t VALUES (?,?,NULL,?)", [12, "v12", 24])
    with sqlite3.connect(":memory:") as conn:
        conn.execute("CREATE TABLE t (a, b, c, d)")
        for sql, params in chunks:
            conn.execute(sql, params)
        assert conn.execute("SELECT * FROM t").fetchall() == rows
    with pytest.raises(ValueError, match="rows of 4 values"):
        stmt.column_chunks(_columns([(1, 2, 3)]))


def test_rows_bind_a_column_with_one_value_in_a_chunk_once() -> None:
    """Rows: a shared column holding one value (of one type) in every row of a chunk is bound
    once and referred to by number; otherwise it is bound per row. The rows stored are the same."""
    from pipeline.store.prepared import Rows

    rows = [("run", i, "ok" if i != 9 else "no", 1, None) for i in range(12)]
    stmt = Rows("INSERT INTO t VALUES {values}", 5, max_rows=8, shared=[0, 2, 3])
    chunks = stmt.column_chunks(_columns(rows))
    assert [len(p) for _, p in chunks] == [3 + 8, 2 + 4 * 2]  # 8 rows: run, ok, 1 once; 4: run, 1
    sql, params = chunks[0]
    # the first row numbers its own parameters after the shared ones; the rest are plain "?"
    # (each the next number: SQLite 3.40 compiles numbered ones in quadratic time)
    assert sql == "INSERT INTO t VALUES (?1,?4,?2,?3,NULL)," + ",".join(["(?1,?,?2,?3,NULL)"] * 7)
    assert params == ["run", "ok", 1, *range(8)]
    assert chunks[1] == (
        "INSERT INTO t VALUES (?1,?3,?4,?2,NULL),(?1,?,?,?2,NULL),(?1,?,?,?2,NULL),(?1,?,?,?2,NULL)",
        ["run", 1, 8, "ok", 9, "no", 10, "ok", 11, "ok"],
    )
    # equal in Python, not one type: bound per row (1 and 1.0 are not one value in a TEXT column)
    mixed = [("run", 0, "ok", 1, None), ("run", 1, "ok", 1.0, None)]
    assert stmt.column_chunks(_columns(mixed))[0] == (
        "INSERT INTO t VALUES (?1,?3,?2,?4,NULL),(?1,?,?2,?,NULL)",
        ["run", "ok", 0, 1, 1, 1.0],
    )
    # every column but one shared or NULL: that one is a value per row, not a tuple
    alone = [("run", i, "ok", 1, None) for i in range(2)]
    assert stmt.column_chunks(_columns(alone))[0][1] == ["run", "ok", 1, 0, 1]
    with sqlite3.connect(":memory:") as conn:
        conn.execute("CREATE TABLE t (a, b, c, d TEXT, e)")
        for sql, params in [*chunks, *stmt.column_chunks(_columns(mixed))]:
            conn.execute(sql, params)
        assert conn.execute("SELECT * FROM t").fetchall() == [
            (a, b, c, str(d), e) for a, b, c, d, e in [*rows, *mixed]
        ]
    with pytest.raises(ValueError, match="out of range"):
        Rows("INSERT INTO t VALUES {values}", 5, max_rows=8, shared=[5])


def _attempts_within(path: Path, expected: int, timeout_s: float) -> int:
    """Blocks its caller (an event loop, here) until the database holds ``expected`` attempts,
    at most ``timeout_s``; the count then."""
    with sqlite3.connect(path) as reader:
        deadline = time.monotonic() + timeout_s
        while True:
            (n,) = reader.execute("SELECT COUNT(*) FROM attempt").fetchone()
            if n == expected or time.monotonic() > deadline:
                return int(n)
            time.sleep(0.005)


@pytest.mark.sqlite_only("the SQLite writer's thread")
def test_the_writer_takes_the_next_transaction_without_the_event_loop(workdir: Path) -> None:
    """Two batches begun (Store.start_outcomes), then the event loop blocked: both are committed
    meanwhile, the second as soon as the first is (the writer's thread does not wait for the
    loop between them); their results come when the loop runs again."""
    every = outcomes.varied(400)
    expected = sum(len(o.attempts) for o in every)
    seen: list[int] = []

    async def go() -> None:
        store = await _loaded(db_url("p.db"), len(every))
        try:
            first = store.start_outcomes(store.outcome_rows("r", every[:200]))
            second = store.start_outcomes(store.outcome_rows("r", every[200:]))
            seen.append(_attempts_within(workdir / "p.db", expected, 30.0))  # the loop blocked
            assert (await first) is not None and (await second) is not None
        finally:
            await store.close()

    anyio.run(go)
    assert seen == [expected]


@pytest.mark.sqlite_only("the SQLite write-ahead log and its checkpoints")
def test_the_wal_is_checkpointed_while_the_recorder_writes_and_the_thread_ends_with_the_store(
    workdir: Path,
) -> None:
    """Batch after batch, the WAL is copied into the database file by the checkpoints' thread
    (the log stays a few batches long, not the whole run); closing the store ends the thread."""
    import threading

    every = outcomes.varied(40_000)

    async def go() -> list[int]:
        store = await _loaded(db_url("p.db"), len(every))
        sizes = []
        try:
            for k in range(0, len(every), 1000):
                await store.record_outcomes("r", every[k : k + 1000])
                await anyio.sleep(0.01)  # as batches come: the checkpoint runs meanwhile
                sizes.append((workdir / "p.db-wal").stat().st_size)
            return sizes
        finally:
            await store.close()

    sizes = anyio.run(go)
    # The file keeps its largest size (the load's one transaction, ~10 MB); ~0.85 MB a batch
    # here, 40 batches: +35 MB from the first batch to the last without checkpoints.
    assert sizes[-1] - sizes[0] < 5 * 2**20, [round(s / 2**20, 1) for s in sizes]
    assert not [t for t in threading.enumerate() if t.name == "pipeline-wal-checkpoints"]
    assert query("p.db", "SELECT COUNT(*) FROM attempt") == [(sum(len(o.attempts) for o in every),)]
