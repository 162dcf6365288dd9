"""Alembic environment: migrates the pipeline's database (SQLite or PostgreSQL).

The pipeline runs migrations itself (``pipeline db upgrade``, and before every run) by
handing an open connection in ``config.attributes["connection"]`` (the async cookbook's
``run_sync`` pattern). Run from the ``alembic`` command line, it opens its own engine
from ``sqlalchemy.url``, async drivers included.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import async_engine_from_config

from pipeline.store.schema import autogenerate_options, metadata

config = context.config
target_metadata = metadata


def do_run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=True,  # SQLite alters tables by copy
        **autogenerate_options(connection.dialect.name),
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations() -> None:
    engine = async_engine_from_config(
        config.get_section(config.config_ini_section, {}),
        prefix="sqlalchemy.",
        poolclass=pool.NullPool,
    )
    async with engine.connect() as connection:
        await connection.run_sync(do_run_migrations)
    await engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; migrate a live database")

shared = config.attributes.get("connection")
if shared is not None:
    do_run_migrations(shared)
else:
    asyncio.run(run_async_migrations())
