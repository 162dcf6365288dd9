"""Shared fixtures: an isolated working folder and environment, the database backend, the mock
server, a CLI runner.

The suite runs on SQLite (default) or on PostgreSQL (``pytest --db-backend=postgresql``). In
PostgreSQL mode each test's default database is a fresh PostgreSQL database (created before the
test, dropped after), handed to the pipeline through ``PIPELINE_DB``, which subprocesses
inherit. Tests read it back with ``helpers.query`` / ``helpers.rows``, which take either a
SQLite path or a URL. Tests about SQLite itself carry ``@pytest.mark.sqlite_only(reason)``.
A PostgreSQL server that cannot be reached fails the test in PostgreSQL mode and under CI
(CI=true); otherwise it skips the few tests that use PostgreSQL whatever the backend (pg_url).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from click.testing import CliRunner, Result

from pipeline.cli import main
from pipeline.mock import MockConfig, MockServer

PG_SERVER = "postgres@127.0.0.1:5432"
PG_ADMIN_DSN = f"postgresql://{PG_SERVER}/test"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--db-backend",
        choices=("sqlite", "postgresql"),
        default="sqlite",
        help="The database every test's default database lives in: a SQLite file in the test's "
        "folder (default), or a fresh PostgreSQL database on 127.0.0.1:5432 per test.",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "sqlite_only(reason): the test is about SQLite itself (its file, locks, WAL); "
        "skipped with --db-backend=postgresql",
    )
    config.addinivalue_line(
        "markers",
        "backend_free(reason): the test never uses the backend's database (a benchmark with its "
        "own files); skipped with --db-backend=postgresql, where it would only repeat itself",
    )


def pytest_report_header(config: pytest.Config) -> str:
    return f"database backend: {config.getoption('--db-backend')}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--db-backend") == "sqlite":
        return
    for item in items:
        for name, prefix in (("sqlite_only", "SQLite only"), ("backend_free", "same on either backend")):
            marker = item.get_closest_marker(name)
            if marker is not None:
                reason = marker.args[0] if marker.args else marker.kwargs.get("reason", "")
                if not reason:
                    raise pytest.UsageError(f"{item.nodeid}: {name} needs a reason")
                item.add_marker(pytest.mark.skip(reason=f"{prefix}: {reason}"))
        if "pg_url" in getattr(item, "fixturenames", ()):  # PostgreSQL in either pass: run once
            item.add_marker(pytest.mark.skip(reason="uses PostgreSQL in the SQLite pass already"))


async def _pg_admin(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_ADMIN_DSN, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


class PgDatabases:
    """Creates fresh PostgreSQL databases on demand and drops every one of them at the end."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.names: list[str] = []

    def create(self) -> str:
        name = f"pipeline_{uuid.uuid4().hex[:12]}"
        try:
            anyio.run(_pg_admin, f"CREATE DATABASE {name}")
        except Exception as exc:  # asyncpg raises its own errors and OSError alike
            if self.backend == "postgresql":
                pytest.fail(f"--db-backend=postgresql needs PostgreSQL at 127.0.0.1:5432: {exc}")
            if os.environ.get("CI") == "true":
                pytest.fail(f"PostgreSQL at 127.0.0.1:5432 is required under CI: {exc}")
            pytest.skip(f"no PostgreSQL at 127.0.0.1:5432: {exc}")
        self.names.append(name)
        return f"postgresql+asyncpg://{PG_SERVER}/{name}"

    def drop_all(self) -> None:
        for name in self.names:
            anyio.run(_pg_admin, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def pg_databases(db_backend: str) -> Iterator[PgDatabases]:
    dbs = PgDatabases(db_backend)
    yield dbs
    dbs.drop_all()


@pytest.fixture
def pg_url(pg_databases: PgDatabases) -> str:
    """A fresh, empty PostgreSQL database (whatever the backend), dropped afterwards."""
    return pg_databases.create()


@pytest.fixture
def db_backend(request: pytest.FixtureRequest) -> str:
    return str(request.config.getoption("--db-backend"))


@pytest.fixture(autouse=True)
def _no_ambient_pipeline_db(monkeypatch: pytest.MonkeyPatch) -> None:
    """A PIPELINE_DB of the developer's shell never reaches a test; `workdir` sets its own."""
    monkeypatch.delenv("PIPELINE_DB", raising=False)


@pytest.fixture
def workdir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, db_backend: str, pg_databases: PgDatabases
) -> Iterator[Path]:
    """A fresh current directory and an environment with no API keys in it; with PostgreSQL,
    PIPELINE_DB names a fresh database (the default database of every command)."""
    monkeypatch.chdir(tmp_path)
    for var in ("OPENAI_API_KEY", "OPENROUTER_API_KEY", "PIPELINE_TEST_KEY"):
        monkeypatch.delenv(var, raising=False)
    if db_backend == "sqlite":
        yield tmp_path
        return
    monkeypatch.setenv("PIPELINE_DB", pg_databases.create())
    yield tmp_path
    # A SQLite file here means the test did not run on PostgreSQL after all.
    stray = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.db"))
    assert not stray, f"--db-backend=postgresql, yet the test wrote SQLite files: {stray}"


@pytest.fixture
def new_db(workdir: Path, db_backend: str, pg_databases: PgDatabases) -> Callable[[str], str]:
    """A new database for ``--db``: the SQLite file NAME in the working folder, or with
    PostgreSQL a fresh database (NAME only tells them apart in the test)."""

    def make(name: str) -> str:
        return name if db_backend == "sqlite" else pg_databases.create()

    return make


@pytest.fixture
def db(new_db: Callable[[str], str]) -> str:
    """The database a test names with ``--db``: p.db in the working folder, or a PostgreSQL URL."""
    return new_db("p.db")


@pytest.fixture
def mock_server() -> Iterator[Callable[..., MockServer]]:
    """Start mock servers with the given MockConfig fields; all are stopped afterwards."""
    started: list[MockServer] = []

    def start(**config: Any) -> MockServer:
        server = MockServer(MockConfig(**config)).start()
        started.append(server)
        return server

    yield start
    for s in started:
        s.stop()


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str
    result: Result


@pytest.fixture
def cli() -> Callable[..., CliResult]:
    """Invoke the ``pipeline`` command in-process; returns exit code, stdout and stderr."""

    def invoke(*args: str, env: dict[str, str] | None = None) -> CliResult:
        runner = CliRunner()
        result = runner.invoke(main, [str(a) for a in args], env=env, catch_exceptions=False)
        return CliResult(result.exit_code, result.stdout, result.stderr, result)

    return invoke
