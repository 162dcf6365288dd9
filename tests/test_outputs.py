"""Parquet outputs: the database rebuild of results.parquet, the part files, and their
consolidation into the very file the database rebuild writes (or a refusal to, and the rebuild).

On the suite's backend (SQLite, or PostgreSQL with --db-backend=postgresql)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import outcomes
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import outputs
from pipeline.outputs import PartWriter, consolidate, result_rows, write_parquet, write_results
from pipeline.progress import Counters
from pipeline.recorder import Recorder
from pipeline.records import Outcome
from pipeline.spec import db_url
from pipeline.store import Store

FINAL = ("succeeded", "failed", "rejected")


async def _loaded(db: str, n: int, *, records: bool) -> Store:
    store = await Store.open(db_url(db))
    await store.create_run(
        run_id="r", job="j", spec_json="{}", input_path="x", input_sha256="h", state="running"
    )
    await store.load_requests("r", outcomes.batches(outcomes.request_rows(n, records=records)))
    return store


async def _record(store: Store, batch: Sequence[Outcome], parts: PartWriter | None = None) -> Recorder:
    """Through the recorder, as a session does (batches of 10: many commits and parts)."""
    recorder = Recorder(store, "r", parts=parts, counters=Counters(total=len(batch)), batch_size=10)
    send, receive = anyio.create_memory_object_stream[Any](16)
    async with anyio.create_task_group() as tg:
        tg.start_soon(recorder.run, receive)
        async with send:
            for o in batch:
                await send.send(o)
    return recorder


async def _reference(store: Store, path: Path, keep: Sequence[str] | None = None) -> pa.Table:
    """The database rebuild as the export writes it (a dict per row)."""
    await write_parquet(
        store.iter_results("r", states=FINAL),
        path,
        keep_columns=keep,
        typing_pages=store.iter_results("r", states=FINAL),
    )
    return pq.read_table(path)


def _finished(recorded: Sequence[Outcome]) -> int:
    """Requests whose last recorded outcome ended them."""
    last = {o.custom_id: o.state for o in recorded}
    return sum(state != "pending" for state in last.values())


@pytest.mark.parametrize(
    ("records", "keep"),
    [
        pytest.param(False, None, id="plain"),
        pytest.param(True, None, id="records"),
        pytest.param(True, ("score", "id", "missing"), id="kept-columns"),
    ],
)
def test_the_rebuild_by_columns_writes_the_file_of_the_rebuild_by_rows(
    workdir: Path, db: str, records: bool, keep: tuple[str, ...] | None
) -> None:
    """write_results (column pages, one pass) writes what write_parquet (a dict per row) writes:
    every kind of outcome, answered twice for some, money exact, records typed alike."""
    first = outcomes.varied(5_000)
    second = outcomes.again(first[:50])

    async def go() -> tuple[pa.Table, pa.Table]:
        store = await _loaded(db, len(first), records=records)
        try:
            await store.record_outcomes("r", first)
            await store.record_outcomes("r", second)
            n = await write_results(
                store.result_pages("r", states=FINAL),
                workdir / "fast.parquet",
                keep_columns=keep,
                typing_pages=store.result_records("r", states=FINAL) if records else None,
            )
            assert n == _finished(first + second)
            return pq.read_table(workdir / "fast.parquet"), await _reference(
                store, workdir / "ref.parquet", keep
            )
        finally:
            await store.close()

    fast, ref = anyio.run(go)
    assert fast.schema == ref.schema
    assert fast.equals(ref)
    if records:
        assert fast.schema.field("score").type == pa.float64()  # ints and floats: floats


@pytest.mark.parametrize("row_group", [None, 7], ids=["one-row-group", "row-groups-of-7"])
def test_parts_and_earlier_results_consolidate_into_the_database_rebuild(
    workdir: Path, db: str, row_group: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session resumed with --retry-failed: earlier sessions' answers (rebuilt from the
    database when it starts) and this session's parts (failed and unfinished requests answered
    again: their sums are the database's, read back) make the very file the database rebuild
    writes; put in input order and written a row group at a time, however many."""
    if row_group is not None:
        monkeypatch.setattr(outputs, "CONSOLIDATE_ROW_GROUP", row_group)
    every = outcomes.varied(600)
    earlier = every[:250]
    now = every[250:] + outcomes.again([o for o in earlier if o.state in ("failed", "pending")])
    out = workdir / "out"

    async def go() -> tuple[pa.Table, pa.Table, int | None]:
        store = await _loaded(db, len(every), records=True)
        try:
            await _record(store, earlier)
            kept = ("succeeded", "rejected")  # the states a --retry-failed session does not send
            before = await write_results(
                store.result_pages("r", states=kept),
                out / "results.parquet",
                typing_pages=store.result_records("r", states=kept),
            )
            assert before
            parts = PartWriter(out / "parts", part_rows=64)
            await _record(store, now, parts)
            assert len(parts.files) >= 5
            ref = await _reference(store, workdir / "ref.parquet")
            counts = await store.state_counts("r")
            expect = {s: counts.get(s, 0) for s in FINAL}
            n = consolidate([out / "results.parquet", *parts.files], out / "results.parquet", expect)
            return pq.read_table(out / "results.parquet"), ref, n
        finally:
            await store.close()

    got, ref, n = anyio.run(go)
    assert n == ref.num_rows == _finished(every + now)
    assert got.schema == ref.schema
    assert got.equals(ref)
    groups = pq.ParquetFile(out / "results.parquet").metadata.num_row_groups
    assert groups == (1 if row_group is None else -(-n // row_group))


def _piece(path: Path, rows: list[dict[str, Any]]) -> Path:
    """A result file of these rows as the part writer writes it (records: the row's keys)."""
    parts = PartWriter(path.parent / path.stem)
    outs = []
    for r in rows:
        o = outcomes.outcome(r["seq"] * outcomes.KINDS)  # kind 0: a plain answer
        o.seq, o.record = r["seq"], r.get("record")
        outs.append(o)
    parts.add(result_rows(outs))
    anyio.run(parts.flush)
    return parts.files[0]


@pytest.mark.parametrize(
    ("first", "second", "merged", "values"),
    [
        pytest.param([1, 2], [2.5, None], pa.float64(), [1.0, 2.0, 2.5, None], id="int-and-float"),
        pytest.param([None, None], ["a", "b"], pa.string(), [None, None, "a", "b"], id="null-and-text"),
        pytest.param([True, False], [None, True], pa.bool_(), [True, False, None, True], id="bool-and-null"),
        pytest.param([1, 2], ["a", "b"], None, None, id="int-and-text"),
        pytest.param([{"a": 1}, {"a": 2}], [{"a": 3}, {"a": 4}], None, None, id="struct"),
    ],
)
def test_record_columns_typed_apart_are_unified_as_the_rebuild_would_or_left_to_it(
    tmp_path: Path, first: list[Any], second: list[Any], merged: pa.DataType | None, values: list[Any] | None
) -> None:
    """Parts whose record column came out typed differently: null with a type, int with float
    are unified as the database rebuild unifies them; any other mix, and nested types (typed by
    Arrow per page), are left to the rebuild (None, nothing written)."""
    a = _piece(tmp_path / "a", [{"seq": i, "record": {"x": v}} for i, v in enumerate(first)])
    b = _piece(tmp_path / "b", [{"seq": i + 10, "record": {"x": v}} for i, v in enumerate(second)])
    out = tmp_path / "results.parquet"
    n = consolidate([b, a], out, {"succeeded": 4})
    if merged is None:
        assert n is None and not out.exists()
        return
    assert n == 4
    table = pq.read_table(out)
    assert table.schema.field("x").type == merged
    assert table.column("seq").to_pylist() == [0, 1, 10, 11]  # input order
    assert table.column("x").to_pylist() == values


def test_consolidation_refuses_pieces_that_are_not_the_database_s_rows(tmp_path: Path) -> None:
    """Rows missing or extra for a state, a request twice, a missing file, more data than the
    memory bound: None, and nothing written."""
    a = _piece(tmp_path / "a", [{"seq": 0}, {"seq": 1}])
    b = _piece(tmp_path / "b", [{"seq": 2}])
    twice = _piece(tmp_path / "c", [{"seq": 1}])
    out = tmp_path / "results.parquet"
    assert consolidate([a, b], out, {"succeeded": 3}, max_bytes=10**9) == 3
    out.unlink()
    for pieces, expect, bound in (
        ([a], {"succeeded": 3}, 10**9),
        ([a, b], {"succeeded": 2, "failed": 1}, 10**9),
        ([a, twice], {"succeeded": 3}, 10**9),
        ([a, tmp_path / "gone.parquet"], {"succeeded": 3}, 10**9),
        ([a, b], {"succeeded": 3}, 100),
        ([], {"succeeded": 0}, 10**9),
    ):
        assert consolidate(pieces, out, expect, max_bytes=bound) is None
        assert not out.exists()
