"""Read-back commands: status, export, report. They only read the database."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date
from pathlib import Path
from typing import Any

import anyio
from sqlalchemy import Date, bindparam, text

from pipeline.errors import RunStateError, UserError
from pipeline.inputs import RowSource
from pipeline.outputs import write_jsonl, write_parquet
from pipeline.pricing import PriceBook, usd_text
from pipeline.records import Usage
from pipeline.spec import JobSpec, db_display, db_url
from pipeline.store.db import Store, utcnow
from pipeline.tokens import estimate_prompt_tokens
from pipeline.worker import DEFAULT_OUTPUT_RESERVE

__all__ = ["estimate", "export", "report", "status"]


def _exists(db: str) -> bool:
    return "://" in db or Path(db).is_file()


async def _open(db: str) -> Store:
    if not _exists(db):
        raise RunStateError(f"database {db_display(db)} not found (pass --db PATH, or run a job first)")
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
        counts, totals = await store.tallies(rid)
        workers = await store.workers(rid)
    finally:
        await store.close()
    return {
        "run_id": rid,
        "job": run["job"],
        "state": run["state"],
        "input": run["input_path"],
        "requests": sum(counts.values()),
        "counts": {s: counts.get(s, 0) for s in ("pending", "in_flight", "succeeded", "failed", "rejected")},
        "attempts": totals.get("attempts") or 0,
        "prompt_tokens": totals.get("prompt_tokens") or 0,
        "completion_tokens": totals.get("completion_tokens") or 0,
        "cached_tokens": totals.get("cached_tokens") or 0,
        "reasoning_tokens": totals.get("reasoning_tokens") or 0,
        "cost_usd": usd_text(totals.get("cost_picousd")),
        "reported_cost_usd": usd_text(totals.get("reported_cost_picousd")),
        "unpriced_attempts": totals.get("unpriced_attempts") or 0,
        "created_at": _iso(run["created_at"]),
        "finished_at": _iso(run["finished_at"]),
        "error": run["error"],
        "workers": [
            {
                "worker_id": w["worker_id"],
                "host": w["host"],
                "pid": w["pid"],
                "recorded": w["recorded"],
                "heartbeat_at": _iso(w["heartbeat_at"]),
                "finished_at": _iso(w["finished_at"]),
            }
            for w in workers
        ],
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
    """Cost and token audit from every attempt (billed failures included), grouped by
    model, day, run or route. Computed and provider-reported cost side by side."""
    groups = {
        "model": (["a.endpoint", "a.model"], ["endpoint", "model"]),
        "route": (["a.endpoint", "a.model"], ["endpoint", "model"]),
        "day": (["date(a.started_at)"], ["day"]),
        "run": (["a.run_id"], ["run_id"]),
    }
    exprs, labels = groups[by]
    key = ", ".join(exprs)
    select_key = ", ".join(f"{e} AS {n}" for e, n in zip(exprs, labels, strict=True))
    failed = "a.outcome <> 'success'"
    sql = f"""
        SELECT {select_key},
               COUNT(DISTINCT a.run_id || '/' || a.custom_id) AS requests,
               COUNT(*) AS attempts,
               SUM(CASE WHEN {failed} THEN 1 ELSE 0 END) AS failed_attempts,
               SUM(CASE WHEN {failed} AND a.total_tokens IS NOT NULL THEN 1 ELSE 0 END) AS billed_failures,
               COALESCE(SUM(a.prompt_tokens), 0) AS prompt_tokens,
               COALESCE(SUM(a.cached_tokens), 0) AS cached_tokens,
               COALESCE(SUM(a.cache_write_tokens), 0) AS cache_write_tokens,
               COALESCE(SUM(a.completion_tokens), 0) AS completion_tokens,
               COALESCE(SUM(a.reasoning_tokens), 0) AS reasoning_tokens,
               SUM(CASE WHEN a.cost_picousd IS NULL AND a.total_tokens IS NOT NULL THEN 1 ELSE 0 END)
                   AS unpriced_attempts,
               SUM(a.cost_picousd) AS cost_picousd,
               SUM(a.reported_cost_picousd) AS reported_cost_picousd,
               SUM(CASE WHEN a.reported_cost_picousd IS NOT NULL AND a.cost_picousd IS NOT NULL
                        THEN a.reported_cost_picousd - a.cost_picousd END) AS difference_picousd,
               AVG(a.latency_ms) AS avg_latency_ms,
               AVG(a.ttft_ms) AS avg_ttft_ms,
               AVG(a.output_tokens_per_s) AS avg_output_tokens_per_s
        FROM attempt a
        {"WHERE date(a.started_at) >= :since" if since else ""}
        GROUP BY {key}
        ORDER BY {key}"""
    params: dict[str, Any] = {}
    stmt = text(sql)
    if since is not None:
        # A typed parameter: text on SQLite, a date for PostgreSQL (asyncpg refuses a string).
        params["since"] = _day(since, "--since")
        stmt = stmt.bindparams(bindparam("since", type_=Date))
    store = await _open(db)
    try:
        rows = await store.execute_text(stmt, params)
    finally:
        await store.close()
    out = []
    for r in rows:
        r = dict(r)
        for name in ("cost", "reported_cost", "difference"):
            pico = r.pop(f"{name}_picousd")
            r[f"{name}_usd"] = usd_text(None if pico is None else int(pico))
        for name in ("avg_latency_ms", "avg_ttft_ms", "avg_output_tokens_per_s"):
            r[name] = None if r[name] is None else round(float(r[name]), 1)
        out.append(r)
    cols = list(out[0]) if out else [*labels, "requests", "attempts", "cost_usd"]
    return cols, out


def _day(value: str, flag: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise UserError(f"{flag}: expected a day as YYYY-MM-DD, got {value!r}") from None


async def estimate(spec: JobSpec) -> dict[str, Any]:
    """Rows, estimated tokens and cost per route, before anything is spent. Streams the input."""
    source = RowSource(
        spec.input,
        template=spec.template,
        defaults=spec.request_defaults,
        models=frozenset(r.model for r in spec.routes),
    )

    def scan() -> tuple[int, int, int]:
        rows = prompt = output = 0
        for row in source.rows():
            rows += 1
            prompt += estimate_prompt_tokens(row.body)
            allowance = row.body.get("max_completion_tokens") or row.body.get("max_tokens")
            output += int(allowance or DEFAULT_OUTPUT_RESERVE) * int(row.body.get("n") or 1)
        return rows, prompt, output

    rows, prompt, output = await anyio.to_thread.run_sync(scan)
    prices = PriceBook(spec.prices)
    now = utcnow()
    routes = []
    for r in spec.routes:
        provider = spec.endpoints[r.endpoint].provider

        def price(p: int, c: int, model: str = r.model, prov: str | None = provider) -> str | None:
            cost = prices.cost(model, Usage(prompt=p, completion=c, total=p + c), provider=prov, at=now)
            return usd_text(cost.picousd)

        routes.append(
            {
                "endpoint": r.endpoint,
                "model": r.model,
                "input_cost_usd": price(prompt, 0),
                "expected_cost_usd": price(prompt, output // 2),
                "worst_case_cost_usd": price(prompt, output),
            }
        )
    return {
        "input": str(spec.input.path),
        "rows": rows,
        "prompt_tokens": prompt,
        "max_output_tokens": output,
        "routes": routes,
        "notes": [
            "prompt tokens are estimated as characters / 4 plus per-message overhead",
            "expected cost assumes half the output allowance (max_tokens, or "
            f"{DEFAULT_OUTPUT_RESERVE} when unset) is used; worst case assumes all of it",
            "each route is priced as if it answered every request",
        ],
    }
