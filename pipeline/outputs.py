"""Parquet and JSONL outputs, derived from the database.

Layout under the output folder, by job and run::

    OUT/JOB/RUN/results.parquet        one row per finished request, in input order
    OUT/JOB/RUN/parts/part-*.parquet   while a run is going: requests finished since it started

Every file is written to a temporary name and renamed, so a file is complete or absent.
While a run goes, ``results.parquet`` holds what earlier sessions finished and the parts
hold this session's; at the end both are consolidated into one file (:func:`consolidate`: the
very file the database rebuild writes, checked against the database's counts), or rebuilt from
the database when they cannot be trusted to be it (and by the worker that finds a shared run
done). At any moment, ``OUT/**/*.parquet`` holds each finished request once.

For template runs the input record's columns come first, then the answer columns.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import Any

import anyio
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.pricing import attempts_cost, picousd, usd, usd_text
from pipeline.records import Outcome

__all__ = [
    "CONSOLIDATE_MAX_BYTES",
    "RESULT_SCHEMA",
    "PartWriter",
    "ResultRows",
    "consolidate",
    "result_rows",
    "write_jsonl",
    "write_parquet",
    "write_results",
]

MONEY = pa.decimal128(38, 12)
RESULT_SCHEMA = pa.schema(
    [
        ("custom_id", pa.string()),
        ("seq", pa.int64()),
        ("state", pa.string()),
        ("endpoint", pa.string()),
        ("model", pa.string()),
        ("response_model", pa.string()),
        ("response_id", pa.string()),
        ("finish_reason", pa.string()),
        ("content", pa.string()),
        ("parsed", pa.string()),
        ("reasoning", pa.string()),
        ("refusal", pa.string()),
        ("tool_calls", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("total_tokens", pa.int64()),
        ("cached_tokens", pa.int64()),
        ("reasoning_tokens", pa.int64()),
        ("cost_usd", MONEY),
        ("reported_cost_usd", MONEY),
        ("attempts", pa.int64()),
        ("error", pa.string()),
        ("choices", pa.string()),
    ]
)
_RESULT_NAMES = frozenset(RESULT_SCHEMA.names)
_MONEY_COLUMNS = frozenset(("cost_usd", "reported_cost_usd"))
# Where each result column comes from in Store.result_pages' columns (the database's names).
_FROM_DB = {
    "cost_usd": "cost_picousd",
    "reported_cost_usd": "reported_cost_picousd",
    "choices": "choices_json",
}

# A consolidated results.parquet is built in memory: above this much data (uncompressed, as
# the files' metadata say; ~1.5x that in memory, and the writing as much again) the database
# rebuild, which streams, is used instead (bench/memory.py).
CONSOLIDATE_MAX_BYTES = 16 * 1024 * 1024
CONSOLIDATE_ROW_GROUP = 16_384  # rows put in input order, and written, at a time


def _money(picousd: Sequence[int | None]) -> pa.Array:
    """Exact USD from integer picodollars: the same 128-bit value as ``usd()`` gives, in C."""
    return pa.array(picousd, pa.int64()).cast(pa.decimal128(38, 0)).view(MONEY)


def _result_arrays(columns: Sequence[Sequence[Any]]) -> list[pa.Array]:
    """The result columns (RESULT_SCHEMA's order; money as integer picodollars) as arrays."""
    return [
        _money(col) if field.name in _MONEY_COLUMNS else pa.array(col, type=field.type)
        for field, col in zip(RESULT_SCHEMA, columns, strict=True)
    ]


_NO_ANSWER = (None,) * 8  # response_model .. tool_calls
_NO_TOKENS = (None,) * 5
_TOKENS = attrgetter("prompt", "completion", "total", "cached", "reasoning")
_OUTCOME = attrgetter("custom_id", "seq", "state")
_FINAL = attrgetter("endpoint", "model", "completion", "usage", "parsed", "cost_picousd")
_ANSWER = attrgetter("model", "response_id", "choices")
_CHOICE = attrgetter("finish_reason", "content", "reasoning", "refusal", "tool_calls")


@dataclass(frozen=True, slots=True)
class ResultRows:
    """Finished requests as result rows, column by column (built before their commit)."""

    arrays: list[pa.Array]  # RESULT_SCHEMA's columns
    records: list[Any]  # each row's input record (a dict, or None)

    def __len__(self) -> int:
        return len(self.records)


def result_rows(
    outcomes: Sequence[Outcome], totals: Mapping[str, tuple[int, int | None, int | None]] | None = None
) -> ResultRows:
    """Outcomes as the result rows the database gives for them (see Store.result_pages).

    ``totals``: (attempts, cost_picousd, reported_cost_picousd) of requests that earlier
    sessions had attempted too, as the database sums them (Recorded.totals)."""
    rows = []
    for o in outcomes:
        attempts = o.attempts
        n = o.prior_attempts + len(attempts)
        choices = None
        if not attempts:
            head: tuple[Any, ...] = (None, None)
            answer: tuple[Any, ...] = _NO_ANSWER
            tokens: tuple[Any, ...] = _NO_TOKENS
            cost = reported = None
        else:
            a = attempts[-1]
            endpoint, model, c, u, parsed, cost = _FINAL(a)
            head = (endpoint, model)
            if len(attempts) > 1:
                cost, reported = attempts_cost(attempts)
            else:
                reported = None if u is None or u.reported_cost is None else picousd(u.reported_cost)
            if c is None:
                answer = _NO_ANSWER
            else:
                response_model, response_id, all_choices = _ANSWER(c)
                first = all_choices[0]
                finish_reason, content, reasoning, refusal, calls = _CHOICE(first)
                answer = (
                    response_model,
                    response_id,
                    finish_reason,
                    content,
                    parsed,
                    reasoning,
                    refusal,
                    None if calls is None else orjson.dumps(calls).decode(),
                )
                if len(all_choices) > 1:
                    choices = orjson.dumps([ch.to_dict() for ch in all_choices]).decode()
            tokens = _NO_TOKENS if u is None else _TOKENS(u)
        if totals and o.custom_id in totals:
            n, cost, reported = totals[o.custom_id]
        rows.append((*_OUTCOME(o), *head, *answer, *tokens, cost, reported, n, o.error, choices))
    columns: list[Sequence[Any]] = list(zip(*rows, strict=True)) if rows else [()] * len(RESULT_SCHEMA)
    return ResultRows(_result_arrays(columns), [o.record for o in outcomes])


def _result_columns(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    cols: dict[str, list[Any]] = {}
    for name in RESULT_SCHEMA.names:  # column by column: one pass over the rows each
        if name == "cost_usd":
            cols[name] = [usd(r.get("cost_picousd")) for r in rows]
        elif name == "choices":
            cols[name] = [r.get("choices_json") for r in rows]
        elif name == "reported_cost_usd":
            cols[name] = [usd(r.get("reported_cost_picousd")) for r in rows]
        else:
            cols[name] = [r.get(name) for r in rows]
    return cols


def _records(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]] | None:
    return _parsed([r.get("record") for r in rows])


def _parsed(records: Sequence[Any]) -> list[dict[str, Any]] | None:
    """The rows' records (JSON text parsed), or None when a row has none."""
    recs = []
    for rec in records:
        if isinstance(rec, str | bytes):
            rec = orjson.loads(rec)
        if rec is None:
            return None
        recs.append(rec)
    return recs


class _RecordTyper:
    """Decides one Arrow type per record column across pages (mixed types become JSON text)."""

    def __init__(self, keep: Sequence[str] | None) -> None:
        self.keep = keep
        self.types: dict[str, pa.DataType] = {}

    def columns(self, recs: Sequence[Mapping[str, Any]]) -> list[str]:
        if self.keep is not None:
            return list(self.keep)
        seen: dict[str, None] = dict.fromkeys(self.types)
        for rec in recs:
            for k in rec:
                seen.setdefault(k, None)
        return list(seen)

    def observe(self, recs: Sequence[Mapping[str, Any]]) -> None:
        for col in self.columns(recs):
            t = _infer([rec.get(col) for rec in recs])
            old = self.types.get(col)
            self.types[col] = t if old is None else _unify(old, t)

    def arrays(self, recs: Sequence[Mapping[str, Any]]) -> dict[str, pa.Array]:
        out: dict[str, pa.Array] = {}
        for col in self.columns(recs):
            t = self.types.get(col) or _infer([rec.get(col) for rec in recs])
            values = [rec.get(col) for rec in recs]
            if t == pa.string():
                values = [v if v is None or isinstance(v, str) else orjson.dumps(v).decode() for v in values]
            try:
                out[col] = pa.array(values, type=t)
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                out[col] = pa.array(
                    [None if v is None else orjson.dumps(v).decode() for v in values], pa.string()
                )
        return out


def _infer(values: list[Any]) -> pa.DataType:
    try:
        t = pa.array(values).type
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.string()
    return t


def _unify(a: pa.DataType, b: pa.DataType) -> pa.DataType:
    if a == b or pa.types.is_null(b):
        return a
    if pa.types.is_null(a):
        return b
    if (pa.types.is_integer(a) and pa.types.is_floating(b)) or (
        pa.types.is_floating(a) and pa.types.is_integer(b)
    ):
        return pa.float64()
    return pa.string()


def _assemble(
    results: Sequence[pa.Array | pa.ChunkedArray],
    recs: Sequence[Mapping[str, Any]] | None,
    typer: _RecordTyper,
) -> pa.Table:
    """A result table: the records' columns first (renamed input_X when X is a result column),
    then the result columns."""
    arrays: dict[str, pa.Array | pa.ChunkedArray] = {}
    if recs is not None:
        for col, arr in typer.arrays(recs).items():
            arrays[f"input_{col}" if col in _RESULT_NAMES else col] = arr
    for field, arr in zip(RESULT_SCHEMA, results, strict=True):
        arrays[field.name] = arr
    return pa.table(arrays)


def _table(rows: Sequence[Mapping[str, Any]], typer: _RecordTyper) -> pa.Table:
    cols = _result_columns(rows)
    return _assemble([pa.array(cols[f.name], type=f.type) for f in RESULT_SCHEMA], _records(rows), typer)


def _replace(tmp: Path, final: Path) -> None:
    os.replace(tmp, final)


async def write_parquet(
    pages: AsyncIterator[list[dict[str, Any]]] | None,
    path: Path,
    *,
    keep_columns: Sequence[str] | None = None,
    typing_pages: AsyncIterator[list[dict[str, Any]]] | None = None,
) -> int:
    """Write result pages (from Store.iter_results) to ``path`` atomically; returns rows.

    ``typing_pages``, if given, is a first pass over the same rows to settle record column
    types, so the file has one schema whatever the pages hold.
    """
    typer = _RecordTyper(keep_columns)
    if typing_pages is not None:
        async for page in typing_pages:
            recs = _records(page)
            if recs:
                typer.observe(recs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # workers may finish together
    writer: pq.ParquetWriter | None = None
    n = 0
    try:
        if pages is not None:
            async for page in pages:
                table = _table(page, typer)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema, compression="zstd")
                elif table.schema != writer.schema:
                    table = table.cast(writer.schema)
                await anyio.to_thread.run_sync(writer.write_table, table)
                n += len(page)
        if writer is None:
            writer = pq.ParquetWriter(tmp, RESULT_SCHEMA, compression="zstd")
        writer.close()
        writer = None
        _replace(tmp, path)
    finally:
        if writer is not None:
            writer.close()
        if tmp.exists():
            tmp.unlink()
    return n


async def write_results(
    pages: AsyncIterator[Mapping[str, Sequence[Any]]],
    path: Path,
    *,
    keep_columns: Sequence[str] | None = None,
    typing_pages: AsyncIterator[Sequence[Any]] | None = None,
) -> int:
    """``write_parquet`` for column pages (Store.result_pages): the same file, without a dict
    per row. ``typing_pages``: the rows' records (JSON text) page by page, a first pass that
    settles the record columns' types."""
    typer = _RecordTyper(keep_columns)
    if typing_pages is not None:
        async for texts in typing_pages:
            recs = _parsed(texts)
            if recs:
                typer.observe(recs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # workers may finish together
    writer: pq.ParquetWriter | None = None
    n = 0
    try:
        async for page in pages:
            results = _result_arrays([page[_FROM_DB.get(name, name)] for name in RESULT_SCHEMA.names])
            table = _assemble(results, _parsed(page["record"]), typer)
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema, compression="zstd")
            elif table.schema != writer.schema:
                table = table.cast(writer.schema)
            await anyio.to_thread.run_sync(writer.write_table, table)
            n += table.num_rows
        if writer is None:
            writer = pq.ParquetWriter(tmp, RESULT_SCHEMA, compression="zstd")
        writer.close()
        writer = None
        _replace(tmp, path)
    finally:
        if writer is not None:
            writer.close()
        if tmp.exists():
            tmp.unlink()
    return n


class PartWriter:
    """Buffers finished requests of this session and writes them as whole part files."""

    def __init__(
        self, folder: Path, *, keep_columns: Sequence[str] | None = None, part_rows: int = 10_000
    ) -> None:
        self.folder = folder
        self.part_rows = part_rows
        self._typer = _RecordTyper(keep_columns)
        self._pending: list[ResultRows] = []
        self._rows = 0
        self._next = 1
        self.files: list[Path] = []  # the part files written, in order
        self.written = 0

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        self.files = []

    def add(self, rows: ResultRows) -> bool:
        """Buffer rows; True when a part is due."""
        if len(rows):
            self._pending.append(rows)
            self._rows += len(rows)
        return self.due

    @property
    def due(self) -> bool:
        return self._rows >= self.part_rows

    def take(self) -> pa.Table | None:
        """What is buffered, as the table its part file would hold, taken out of the buffer
        (for the end of a session: consolidated at once, never written as a part)."""
        if not self._pending:
            return None
        pending, self._pending, self._rows = self._pending, [], 0
        recs = _parsed([r for rows in pending for r in rows.records])
        if recs:
            self._typer.observe(recs)
        results = [pa.chunked_array([rows.arrays[i] for rows in pending]) for i in range(len(RESULT_SCHEMA))]
        return _assemble(results, recs, self._typer)

    async def flush(self) -> None:
        """Write what is buffered as one part file (the file is written off the event loop)."""
        table = self.take()
        if table is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.folder / f"part-{self._next:05d}.parquet"
        tmp = self.folder / f".part-{self._next:05d}.parquet.tmp"
        self._next += 1

        def write() -> None:
            pq.write_table(table, tmp, compression="zstd")
            _replace(tmp, final)

        await anyio.to_thread.run_sync(write)
        self.files.append(final)
        self.written += table.num_rows


# Record column types whose typing does not depend on how rows were split into pages: the
# database rebuild's typer (pages in input order) and the parts' (in the order answers came)
# reach the same type for them. Nested types (structs, lists) are merged per page by Arrow.
_SCALAR = (pa.null(), pa.bool_(), pa.int64(), pa.float64(), pa.string())


def consolidate(
    pieces: Sequence[Path | pa.Table],
    path: Path,
    expect: Mapping[str, int],
    *,
    max_bytes: int = CONSOLIDATE_MAX_BYTES,
) -> int | None:
    """Write the rows of result files (``pieces``: this session's parts, and the
    results.parquet of earlier sessions; or tables of such rows, see :meth:`PartWriter.take`)
    as one file at ``path``, in input order, atomically; returns its rows. The file is the one
    the database rebuild would write for the same rows.

    Returns None and writes nothing when the pieces cannot be trusted to be that file: they do
    not hold exactly ``expect`` (rows per state: the database's counts) with each request once;
    their columns differ; a record column's types differ otherwise than the rebuild resolves
    them (null and another type, int and float), or are not scalar; or they hold more than
    ``max_bytes`` (in memory at once, where the rebuild streams).
    """
    try:
        files = [pq.ParquetFile(p) for p in pieces if not isinstance(p, pa.Table)]
    except (OSError, pa.ArrowInvalid):
        return None
    files = [f for f in files if f.metadata.num_rows]
    held = [p for p in pieces if isinstance(p, pa.Table) and p.num_rows]
    want = sum(expect.values())
    if not want or sum(f.metadata.num_rows for f in files) + sum(t.num_rows for t in held) != want:
        return None
    size = sum(
        f.metadata.row_group(i).total_byte_size for f in files for i in range(f.metadata.num_row_groups)
    ) + sum(t.nbytes for t in held)
    if size > max_bytes:
        return None
    tables = [f.read() for f in files] + held
    schema = _common_schema([t.schema for t in tables])
    if schema is None:
        return None
    # The pieces' chunks side by side (no copy), then written in input order a row group at
    # a time: one sorted copy of the whole table took ~4x the data's size at once.
    table = pa.concat_tables([t if t.schema == schema else t.cast(schema) for t in tables])
    order = pc.sort_indices(table["seq"])
    seq = table["seq"].take(order)
    if len(seq) > 1 and not pc.all(pc.greater(seq[1:], seq[:-1])).as_py():
        return None  # a request twice
    counts = {d["values"]: d["counts"] for d in pc.value_counts(table["state"]).to_pylist()}
    if counts != {k: v for k, v in expect.items() if v}:
        return None
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for start in range(0, len(order), CONSOLIDATE_ROW_GROUP):
                writer.write_table(table.take(order.slice(start, CONSOLIDATE_ROW_GROUP)))
        _replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return int(table.num_rows)


def _common_schema(schemas: Sequence[pa.Schema]) -> pa.Schema | None:
    """The schema the database rebuild gives to rows of these schemas, if it is sure."""
    first = schemas[0]
    names = first.names
    if any(s.names != names for s in schemas) or len(names) < len(RESULT_SCHEMA):
        return None
    n_records = len(names) - len(RESULT_SCHEMA)
    fields = []
    for i, name in enumerate(names):
        types = {s.field(i).type for s in schemas}
        if i >= n_records:  # a result column: its type is fixed
            if types != {RESULT_SCHEMA.field(i - n_records).type}:
                return None
            fields.append(RESULT_SCHEMA.field(i - n_records))
            continue
        if not all(t in _SCALAR for t in types):
            return None
        known = types - {pa.null()}
        if len(known) > 1:
            if known != {pa.int64(), pa.float64()}:
                return None
            known = {pa.float64()}
        fields.append(pa.field(name, known.pop() if known else pa.null()))
    return pa.schema(fields)


async def write_jsonl(pages: AsyncIterator[list[dict[str, Any]]], path: Path) -> int:
    """OpenAI Batch API output lines: {"id", "custom_id", "response", "error"}, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # workers may finish together
    n = 0
    try:
        with tmp.open("wb") as f:
            async for page in pages:
                for r in page:
                    if r["state"] == "pending":
                        continue
                    f.write(orjson.dumps(batch_output_line(r)))
                    f.write(b"\n")
                    n += 1
        _replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return n


def batch_output_line(r: Mapping[str, Any]) -> dict[str, Any]:
    import hashlib

    line_id = "batch_req_" + hashlib.sha256(f"{r['custom_id']}".encode()).hexdigest()[:24]
    response: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    if r["state"] == "succeeded" and r.get("raw"):
        try:
            body = orjson.loads(r["raw"])
        except orjson.JSONDecodeError:
            body = r["raw"]
        response = {
            "status_code": r.get("http_status") or 200,
            "request_id": r.get("provider_request_id"),
            "body": body,
        }
    else:
        code = "rejected" if r["state"] == "rejected" else (r.get("error_class") or "failed")
        error = {"code": code, "message": r.get("error") or r["state"]}
        if r.get("http_status"):
            response = {
                "status_code": r["http_status"],
                "request_id": r.get("provider_request_id"),
                "body": {"error": {"message": r.get("error"), "type": r.get("error_class"), "code": None}},
            }
    billing = {
        "attempts": r.get("attempts"),
        "prompt_tokens": r.get("prompt_tokens"),
        "completion_tokens": r.get("completion_tokens"),
        "cached_tokens": r.get("cached_tokens"),
        "reasoning_tokens": r.get("reasoning_tokens"),
        "cost_usd": usd_text(r.get("cost_picousd")),
        "reported_cost_usd": usd_text(r.get("reported_cost_picousd")),
    }
    return {
        "id": line_id,
        "custom_id": r["custom_id"],
        "response": response,
        "error": error,
        "billing": billing,
    }
