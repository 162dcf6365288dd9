"""Request bodies and data records move out of ``request`` into ``request_input``.

A request's row is written again at each change of its state (claimed before it is sent,
then answered), and SQLite rewrites a row whole: with the body in it, every change cost as
much as the prompt's size (4 KB prompts: 2.7x SQLite's work per request, and the recorder
committed 11,300 outcomes/s instead of 24,800; ``bench/recorder.py --prompt-bytes 4000``).
``request_input`` is written once, when a run is loaded, keyed by the request's position
(``seq``). With it the recorder's rate no longer depends on the prompts' size (23,800/s).

Existing runs keep their bodies: they are copied over before the columns are dropped.
SQLite drops the columns with its own ``ALTER TABLE ... DROP COLUMN`` (3.35 or newer): a
batch copy of the table would have to drop ``request``, which ``attempt`` and now
``request_input`` refer to.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_MOVED = ("body", "record")


def _drop_columns(table: str, columns: Sequence[str]) -> None:
    if op.get_bind().dialect.name == "sqlite":
        if sqlite3.sqlite_version_info < (3, 35):
            raise RuntimeError(
                f"this migration needs SQLite 3.35 or newer (ALTER TABLE DROP COLUMN); "
                f"Python's sqlite3 has {sqlite3.sqlite_version}"
            )
        for column in columns:
            op.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    else:
        for column in columns:
            op.drop_column(table, column)


def upgrade() -> None:
    op.create_table(
        "request_input",
        sa.Column("run_id", sa.String(128), nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("record", sa.Text),
        sa.PrimaryKeyConstraint("run_id", "seq", name="pk_request_input"),
        sa.ForeignKeyConstraint(
            ["run_id", "seq"],
            ["request.run_id", "request.seq"],
            name="fk_request_input_run_id_request",
        ),
    )
    op.execute(
        "INSERT INTO request_input (run_id, seq, body, record) SELECT run_id, seq, body, record FROM request"
    )
    _drop_columns("request", _MOVED)


def downgrade() -> None:
    # Back as 0004 had them, NOT NULL included (SQLite cannot add a NOT NULL column without a
    # default: there the body column stays nullable, every row has one).
    op.add_column("request", sa.Column("body", sa.Text))
    op.add_column("request", sa.Column("record", sa.Text))
    same = "i.run_id = request.run_id AND i.seq = request.seq"
    op.execute(
        f"UPDATE request SET body = (SELECT i.body FROM request_input i WHERE {same}), "
        f"record = (SELECT i.record FROM request_input i WHERE {same})"
    )
    if op.get_bind().dialect.name != "sqlite":
        op.alter_column("request", "body", nullable=False)
    op.drop_table("request_input")
