"""The schema: Alembic migrates a blank database to head, and the models agree with it.

On the suite's backend (SQLite, or PostgreSQL with --db-backend=postgresql)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from helpers import query
from sqlalchemy import inspect

from pipeline.spec import db_url
from pipeline.store import Store
from pipeline.store.schema import VIEWS, metadata


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
    assert {"run", "request", "attempt", "completion"} <= tables
    assert views == set(VIEWS)
    assert query(db, "SELECT version_num FROM alembic_version") == [(head,)]
    assert head == "0003"


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
                        MigrationContext.configure(c, opts={"compare_type": True}), metadata
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
