"""PostgreSQL as the store: the same migrations, views and commands as on SQLite.

Uses the server these machines run on 127.0.0.1:5432 (trust auth) whatever the suite's
--db-backend: each test gets a fresh database (conftest's ``pg_url``). Under CI (CI=true) a
server that cannot be reached fails the test instead of skipping it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import orjson
from helpers import plain_rows, write_job, write_jsonl

from pipeline.mock import MockServer
from pipeline.store import Store
from pipeline.store.schema import VIEWS


def test_migrations_views_and_models_agree_on_postgresql(pg_url: str) -> None:
    """A blank PostgreSQL database migrates to head; every view answers; autogenerate finds no drift."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from pipeline.store.schema import autogenerate_options, metadata

    async def go() -> tuple[str, list[Any]]:
        store = await Store.open(pg_url)
        try:
            for view in VIEWS:
                assert await store.execute_text(f"SELECT * FROM {view}") == []
            async with store.engine.connect() as conn:
                diff = await conn.run_sync(
                    lambda c: compare_metadata(
                        MigrationContext.configure(c, opts=autogenerate_options(c.dialect.name)), metadata
                    )
                )
            return await store.migrate(), diff
        finally:
            await store.close()

    head, diff = anyio.run(go)
    assert head == "0008"
    assert diff == []


def test_run_status_report_and_export_work_on_postgresql(
    workdir: Path, pg_url: str, mock_server: Callable[..., MockServer], cli: Callable[..., Any]
) -> None:
    """The whole flow with --db postgresql+asyncpg://...: run, resume, status, report, export."""
    server = mock_server(fail_first=1, fail_status=500)
    spec = write_job(workdir / "in.toml", server.base_url, rows=30)
    # trust auth ignores the password: it stands for a real one that must never be shown
    secret_url = pg_url.replace("postgres@", "postgres:s3cret-pw@")
    args = ["run", str(spec), "--db", secret_url, "--out", "out"]
    r = cli(*args)
    assert r.exit_code == 0, r.stderr
    assert "s3cret-pw" not in r.stdout + r.stderr and "postgres:***@" in r.stdout
    again = cli(*args)
    assert again.exit_code == 0 and server.stats().completions == 30
    status = orjson.loads(cli("status", "--db", pg_url, "--json").stdout)
    assert status["counts"]["succeeded"] == 30 and status["attempts"] == 60
    assert status["cost_usd"] is not None
    report = orjson.loads(cli("report", "--db", pg_url, "--by", "route", "--format", "json").stdout)
    assert [(x["model"], x["attempts"], x["failed_attempts"]) for x in report] == [("mock-small", 60, 30)]
    assert cli("export", "in", "--db", pg_url, "-o", "x.jsonl").exit_code == 0
    assert len((workdir / "x.jsonl").read_bytes().splitlines()) == 30


def test_a_password_in_pipeline_db_is_never_printed(
    workdir: Path, pg_url: str, mock_server: Callable[..., MockServer], cli: Callable[..., Any]
) -> None:
    """PIPELINE_DB holding a URL with a password: run, status, report, db upgrade work and hide it."""
    server = mock_server()
    write_jsonl(workdir / "in.jsonl", plain_rows(3))
    # trust auth ignores the password: it stands for a real one that must never be shown
    env = {"PIPELINE_DB": pg_url.replace("postgres@", "postgres:s3cret-pw@")}
    args = ["run", "--input", "in.jsonl", "--base-url", server.base_url, "--model", "mock-small", "-q"]
    outputs = [
        cli(*args, env=env),
        cli("status", env=env),
        cli("report", env=env),
        cli("db", "upgrade", env=env),
    ]
    assert [r.exit_code for r in outputs] == [0, 0, 0, 0], [r.stderr for r in outputs]
    for r in outputs:
        assert "s3cret-pw" not in r.stdout + r.stderr
    assert "postgres:***@" in outputs[0].stdout and "postgres:***@" in outputs[3].stdout
    assert "3 succeeded" in outputs[1].stdout
