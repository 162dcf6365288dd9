"""Read-back commands: status, export, report. They only read the database."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

from pipeline.errors import RunStateError
from pipeline.outputs import write_jsonl, write_parquet
from pipeline.pricing import usd
from pipeline.spec import db_url
from pipeline.store.db import Store

__all__ = ["export", "report", "status"]


def _exists(db: str) -> bool:
    return "://" in db or Path(db).is_file()


async def _open(db: str) -> Store:
    if not _exists(db):
        raise RunStateError(f"database {db} not found (pass --db PATH, or run a job first)")
    return await Store.open(db_url(db))


async def _run_id(store: Store, run_id: str | None) -> str:
    if run_id is None:
        latest = await store.latest_run_id()
        if latest is None:
            raise RunStateError("the database holds no run yet")
        return latest
    if await store.get_run(run_id) is None:
        runs = ", ".join(r["run_id"] for r in await store.list_runs()) or "none"
        raise RunStateError(f"no run {run_id!r} in the database (runs: {runs})")
    return run_id


async def status(db: str, run_id: str | None) -> dict[str, Any]:
    """Progress of a run: counts by state, tokens, cost so far."""
    store = await _open(db)
    try:
        rid = await _run_id(store, run_id)
        run = await store.get_run(rid)
        assert run is not None
        counts = await store.state_counts(rid)
        totals = await store.usage_totals(rid)
    finally:
        await store.close()
    cost = usd(totals.get("cost_picousd"))
    reported = usd(totals.get("reported_cost_picousd"))
    return {
        "run_id": rid,
        "job": run["job"],
        "state": run["state"],
        "input": run["input_path"],
        "requests": sum(counts.values()),
        "counts": {s: counts.get(s, 0) for s in ("pending", "succeeded", "failed", "rejected")},
        "attempts": totals.get("attempts") or 0,
        "prompt_tokens": totals.get("prompt_tokens") or 0,
        "completion_tokens": totals.get("completion_tokens") or 0,
        "cached_tokens": totals.get("cached_tokens") or 0,
        "reasoning_tokens": totals.get("reasoning_tokens") or 0,
        "cost_usd": None if cost is None else str(cost.normalize() if cost else Decimal(0)),
        "reported_cost_usd": None if reported is None else str(reported),
        "unpriced_attempts": totals.get("unpriced_attempts") or 0,
        "created_at": _iso(run["created_at"]),
        "finished_at": _iso(run["finished_at"]),
        "error": run["error"],
    }


def _iso(v: Any) -> str | None:
    return None if v is None else v.isoformat(sep=" ", timespec="seconds")


async def export(db: str, run_id: str, fmt: str, out: Path) -> int:
    """Rewrite a run's outputs from the database; returns the rows written."""
    store = await _open(db)
    try:
        rid = await _run_id(store, run_id)
        if fmt == "jsonl":
            return await write_jsonl(store.iter_results(rid), out)
        return await write_parquet(store.iter_results(rid), out, typing_pages=store.iter_results(rid))
    finally:
        await store.close()


async def report(db: str, by: str, since: str | None) -> tuple[Sequence[str], list[dict[str, Any]]]:
    """Cost and token audit, grouped by model, day, run or route, from the SQL views."""
    store = await _open(db)
    try:
        where = "WHERE date(a.started_at) >= :since" if since else ""
        params = {"since": since} if since else {}
        money = "SUM(a.cost_picousd) AS cost_picousd, SUM(a.reported_cost_picousd) AS reported_cost_picousd"
        tokens = (
            "COUNT(*) AS attempts, SUM(CASE WHEN a.outcome = 'success' THEN 1 ELSE 0 END) AS succeeded, "
            "SUM(a.prompt_tokens) AS prompt_tokens, SUM(a.cached_tokens) AS cached_tokens, "
            "SUM(a.completion_tokens) AS completion_tokens, SUM(a.reasoning_tokens) AS reasoning_tokens"
        )
        key = {
            "model": "a.endpoint, a.model",
            "day": "date(a.started_at)",
            "run": "a.run_id",
            "route": "a.endpoint, a.model",
        }[by]
        label = {
            "model": "a.endpoint AS endpoint, a.model AS model",
            "day": "date(a.started_at) AS day",
            "run": "a.run_id AS run_id",
            "route": "a.endpoint AS endpoint, a.model AS model",
        }[by]
        sql = f"SELECT {label}, {tokens}, {money} FROM attempt a {where} GROUP BY {key} ORDER BY {key}"
        rows = await store.execute_text(sql, params)
    finally:
        await store.close()
    out = []
    for r in rows:
        r = dict(r)
        r["cost_usd"] = _money(r.pop("cost_picousd"))
        r["reported_cost_usd"] = _money(r.pop("reported_cost_picousd"))
        out.append(r)
    cols = list(out[0]) if out else []
    return cols, out


def _money(pico: Any) -> str | None:
    v = usd(None if pico is None else int(pico))
    return None if v is None else f"{v:.6f}"
