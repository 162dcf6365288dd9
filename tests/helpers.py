"""Small helpers for tests: write inputs, read the database."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import orjson


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return path


def plain_rows(n: int, prefix: str = "q") -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"{prefix}-{i}",
            "messages": [{"role": "user", "content": f"Question number {i}?"}],
        }
        for i in range(n)
    ]


def query(db: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql, params).fetchall()
