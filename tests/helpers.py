"""Small helpers for tests: write inputs, read the database (SQLite or PostgreSQL)."""

from __future__ import annotations

import os
import re
import sqlite3
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import orjson


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return path


def spec_file(
    path: Path,
    base_url: str,
    *,
    job: str = "t",
    model: str = "mock-small",
    top: str = "",
    retry: str = "",
    extra: str = "",
) -> Path:
    """A TOML spec reading in.jsonl, with fast retries so tests never wait on backoff.
    ``top``: more top-level keys; ``retry``: more [retry] keys; ``extra``: more tables."""
    path.write_text(
        f"""
job = "{job}"
model = "{model}"
{top}

[input]
path = "in.jsonl"

[endpoints.default]
base_url = "{base_url}"

[retry]
backoff_base_s = 0.01
backoff_max_s = 0.05
max_attempts_per_route = 3
{retry}

[prices.mock-small]
input = 0.15
output = 0.60
{extra}
""",
        encoding="utf-8",
    )
    return path


def write_job(path: Path, base_url: str, *, rows: int, top: str = "", extra: str = "") -> Path:
    """A job spec at ``path`` (and its input beside it: ``rows`` plain questions) for the
    mock server at ``base_url``: fast retries, no breaker, prices for mock-small."""
    write_jsonl(path.with_suffix(".jsonl"), plain_rows(rows))
    path.write_text(
        f"""model = "mock-small"
{top}
[input]
path = "{path.with_suffix(".jsonl").name}"
[endpoints.default]
base_url = "{base_url}"
[retry]
backoff_base_s = 0.01
[breaker]
enabled = false
[prices.mock-small]
input = 0.15
output = 0.6
{extra}"""
    )
    return path


def plain_rows(n: int, prefix: str = "q") -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"{prefix}-{i}",
            "messages": [{"role": "user", "content": f"Question number {i}?"}],
        }
        for i in range(n)
    ]


def default_db() -> str:
    """The database a command uses without ``--db`` (the `workdir` fixture sets PIPELINE_DB
    in PostgreSQL mode): a URL, or a SQLite path relative to the current folder."""
    return os.environ.get("PIPELINE_DB") or "pipeline.db"


def is_url(db: str | Path) -> bool:
    return "://" in str(db)


def query(db: str | Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Run SQL (``?`` placeholders) against a SQLite file or a PostgreSQL URL; rows as tuples."""
    if not is_url(db):
        with sqlite3.connect(db) as conn:
            return conn.execute(sql, params).fetchall()
    return [tuple(r) for r in _pg_fetch(str(db), sql, params)]


def dict_rows(db: str | Path, sql: str, *params: Any) -> list[dict[str, Any]]:
    """Run SQL (``?`` placeholders) against a SQLite file or a PostgreSQL URL; rows as dicts."""
    if not is_url(db):
        with sqlite3.connect(db) as conn:
            conn.row_factory = sqlite3.Row
            return [dict(r) for r in conn.execute(sql, params).fetchall()]
    return [dict(r.items()) for r in _pg_fetch(str(db), sql, params)]


def _pg_fetch(url: str, sql: str, params: tuple[Any, ...]) -> list[Any]:
    if not url.startswith("postgresql"):
        raise ValueError(f"tests read SQLite files and PostgreSQL URLs only, not {url}")
    dsn = "postgresql://" + url.split("://", 1)[1]

    async def go() -> list[Any]:
        import asyncpg

        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            return list(await conn.fetch(pg_placeholders(sql), *params))
        finally:
            await conn.close()

    return anyio.run(go)


_TOKENS = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|\?")


def pg_placeholders(sql: str) -> str:
    """``?`` placeholders as PostgreSQL's ``$1, $2, ...``; quoted text and names left alone."""
    n = 0

    def sub(m: re.Match[str]) -> str:
        nonlocal n
        if m.group(0) != "?":
            return m.group(0)
        n += 1
        return f"${n}"

    return _TOKENS.sub(sub, sql)


def untouched(db: str | Path) -> bool:
    """Nothing was written to the database: no SQLite file, or no table in PostgreSQL."""
    if not is_url(db):
        return not Path(db).exists()
    return query(db, "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = 'public'") == [(0,)]


def as_datetime(value: str | datetime) -> datetime:
    """A DateTime column's value: SQLite gives ISO text, PostgreSQL a datetime."""
    return datetime.fromisoformat(value) if isinstance(value, str) else value


def every_row_as_text(db: str | Path) -> str:
    """Every row of every table of the pipeline's schema, as text (to look for what must not be there)."""
    from pipeline.store.schema import metadata

    return "\n".join(repr(r) for t in metadata.sorted_tables for r in query(db, f"SELECT * FROM {t.name}"))
