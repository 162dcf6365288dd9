"""The schema: Alembic migrates a blank database to head, and the models agree with it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import anyio
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from pipeline.store import Store
from pipeline.store.schema import VIEWS, metadata


def test_blank_database_migrates_to_head_with_tables_views_and_wal(tmp_path: Path) -> None:
    """`Store.open` migrates a new SQLite file: tables, audit views, WAL journal."""
    db = tmp_path / "blank.db"

    async def go() -> str:
        store = await Store.open(f"sqlite+aiosqlite:///{db}")
        try:
            return await store.migrate()  # a second upgrade is a no-op
        finally:
            await store.close()

    head = anyio.run(go)
    with sqlite3.connect(db) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        views = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'view'")}
        version = conn.execute("SELECT version_num FROM alembic_version").fetchone()[0]
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    assert {"run", "request", "attempt", "completion"} <= tables
    assert views == set(VIEWS)
    assert version == head == "0003"
    assert mode == "wal"


def test_schema_module_and_migrations_agree(tmp_path: Path) -> None:
    """Autogenerate finds no difference between the migrated database and schema.py."""
    db = tmp_path / "cmp.db"

    async def go() -> None:
        store = await Store.open(f"sqlite+aiosqlite:///{db}")
        await store.close()

    anyio.run(go)
    engine = create_engine(f"sqlite:///{db}")
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
    engine.dispose()
    assert diff == []


def test_views_answer_on_an_empty_database(tmp_path: Path) -> None:
    """Every audit view is valid SQL on SQLite (empty result, no error)."""
    db = tmp_path / "v.db"

    async def go() -> None:
        store = await Store.open(f"sqlite+aiosqlite:///{db}")
        try:
            for name in VIEWS:
                assert await store.execute_text(f"SELECT * FROM {name}") == []
        finally:
            await store.close()

    anyio.run(go)
