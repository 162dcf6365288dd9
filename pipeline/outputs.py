"""Parquet and JSONL outputs, derived from the database.

Layout under the output folder, by job and run::

    OUT/JOB/RUN/results.parquet        one row per finished request, in input order
    OUT/JOB/RUN/parts/part-*.parquet   while a run is going: requests finished since it started

Every file is written to a temporary name and renamed, so a file is complete or absent.
While a run goes, ``results.parquet`` holds what earlier sessions finished and the parts
hold this session's; at the end both are rebuilt from the database into one file. At any
moment, ``OUT/**/*.parquet`` holds each finished request once.

For template runs the input record's columns come first, then the answer columns.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.pricing import usd, usd_text
from pipeline.records import Outcome

__all__ = ["RESULT_SCHEMA", "PartWriter", "outcome_result", "write_jsonl", "write_parquet"]

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


def outcome_result(o: Outcome) -> dict[str, Any]:
    """An outcome as the same result row the database gives (see Store.iter_results)."""
    a = o.final
    c = a.completion if a is not None else None
    u = a.usage if a is not None else None
    first = c.first if c is not None else None
    costs = [x.cost_picousd for x in o.attempts if x.cost_picousd is not None]
    reported = [x.usage.reported_cost for x in o.attempts if x.usage and x.usage.reported_cost is not None]
    return {
        "custom_id": o.custom_id,
        "seq": o.seq,
        "state": o.state,
        "endpoint": a.endpoint if a else None,
        "model": a.model if a else None,
        "response_model": c.model if c else None,
        "response_id": c.response_id if c else None,
        "finish_reason": first.finish_reason if first else None,
        "content": first.content if first else None,
        "parsed": a.parsed if a else None,
        "choices_json": None
        if c is None or len(c.choices) < 2
        else orjson.dumps([ch.to_dict() for ch in c.choices]).decode(),
        "reasoning": first.reasoning if first else None,
        "refusal": first.refusal if first else None,
        "tool_calls": None
        if first is None or first.tool_calls is None
        else orjson.dumps(first.tool_calls).decode(),
        "prompt_tokens": u.prompt if u else None,
        "completion_tokens": u.completion if u else None,
        "total_tokens": u.total if u else None,
        "cached_tokens": u.cached if u else None,
        "reasoning_tokens": u.reasoning if u else None,
        "cost_picousd": sum(costs) if costs else None,
        "reported_cost_usd": sum(reported, Decimal(0)) if reported else None,
        "attempts": o.prior_attempts + len(o.attempts),
        "error": o.error,
        "record": o.record,
    }


def _result_columns(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    cols: dict[str, list[Any]] = {}
    for name in RESULT_SCHEMA.names:  # column by column: one pass over the rows each
        if name == "cost_usd":
            cols[name] = [usd(r.get("cost_picousd")) for r in rows]
        elif name == "choices":
            cols[name] = [r.get("choices_json") for r in rows]
        elif name == "reported_cost_usd":
            cols[name] = [_reported_usd(r) for r in rows]
        else:
            cols[name] = [r.get(name) for r in rows]
    return cols


def _reported_usd(r: Mapping[str, Any]) -> Decimal | None:
    v: Decimal | None = r.get("reported_cost_usd")
    if v is None and r.get("reported_cost_picousd") is not None:
        v = usd(r["reported_cost_picousd"])
    return v


def _records(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]] | None:
    recs = []
    for r in rows:
        rec = r.get("record")
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


def _table(rows: Sequence[Mapping[str, Any]], typer: _RecordTyper) -> pa.Table:
    arrays: dict[str, pa.Array] = {}
    recs = _records(rows)
    if recs is not None:
        for col, arr in typer.arrays(recs).items():
            arrays[f"input_{col}" if col in _RESULT_NAMES else col] = arr
    cols = _result_columns(rows)
    for field in RESULT_SCHEMA:
        arrays[field.name] = pa.array(cols[field.name], type=field.type)
    return pa.table(arrays)


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


class PartWriter:
    """Buffers finished requests of this session and writes them as whole part files."""

    def __init__(
        self, folder: Path, *, keep_columns: Sequence[str] | None = None, part_rows: int = 10_000
    ) -> None:
        self.folder = folder
        self.part_rows = part_rows
        self._typer = _RecordTyper(keep_columns)
        self._rows: list[dict[str, Any]] = []
        self._next = 1
        self.written = 0

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def add(self, rows: Iterable[dict[str, Any]]) -> bool:
        """Buffer rows; True when a part is due."""
        self._rows.extend(rows)
        return len(self._rows) >= self.part_rows

    async def flush(self) -> None:
        if not self._rows:
            return
        rows, self._rows = self._rows, []
        recs = _records(rows)
        if recs:
            self._typer.observe(recs)
        table = _table(rows, self._typer)
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.folder / f"part-{self._next:05d}.parquet"
        tmp = self.folder / f".part-{self._next:05d}.parquet.tmp"
        self._next += 1

        def write() -> None:
            pq.write_table(table, tmp, compression="zstd")
            _replace(tmp, final)

        await anyio.to_thread.run_sync(write)
        self.written += len(rows)


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
