"""Attempts and completions are keyed by their request's position (``seq``), not its custom_id.

Their primary keys were ``(run_id, custom_id, attempt_no)``. Custom ids are often random
(UUIDs, hashes), and then each of a batch's ~1,000 rows went into a page of its own in both
indexes, every page written whole to the WAL and copied back by the checkpoints: with 200,000
UUID-named requests the recorder committed 14,600 outcomes/s instead of 62,000, and fell further
as the tables grew (``bench/recorder.py --random-ids``). Requests are sent, and so answered,
nearly in input order, so keyed by ``(run_id, seq, attempt_no)`` a batch's rows go into a few
pages whatever the ids look like. Each table gains ``seq`` (from its request) and keeps
``custom_id`` for reading; the audit view ``request_result`` joins on ``seq``.

SQLite cannot change a table's primary key: both tables are copied into new ones (the views,
which name them, are dropped meanwhile and created again as they were). PostgreSQL alters them.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JOINS = {
    "seq": """
        LEFT JOIN attempt a ON a.run_id = r.run_id AND a.seq = r.seq
             AND a.attempt_no = r.final_attempt_no
        LEFT JOIN completion c ON c.run_id = a.run_id AND c.seq = a.seq
             AND c.attempt_no = a.attempt_no""",
    "custom_id": """
        LEFT JOIN attempt a ON a.run_id = r.run_id AND a.custom_id = r.custom_id
             AND a.attempt_no = r.final_attempt_no
        LEFT JOIN completion c ON c.run_id = a.run_id AND c.custom_id = a.custom_id
             AND c.attempt_no = a.attempt_no""",
}
_REQUEST_RESULT = """
        SELECT r.run_id, r.custom_id, r.seq, r.state, r.attempts, r.error,
               a.endpoint, a.model, c.model AS response_model, c.response_id, c.finish_reason,
               c.content, c.parsed, c.reasoning, c.refusal, c.tool_calls,
               a.prompt_tokens, a.completion_tokens, a.total_tokens, a.cached_tokens,
               a.reasoning_tokens,
               r.cost_picousd / 1e12 AS cost_usd,
               r.reported_cost_picousd / 1e12 AS reported_cost_usd
        FROM request r"""


def _key_columns(by_seq: bool) -> list[sa.Column[Any]]:
    """``run_id, [seq,] custom_id, attempt_no``: new columns for each table made."""
    return [
        sa.Column("run_id", sa.String(128), nullable=False),
        *([sa.Column("seq", sa.BigInteger(), nullable=False)] if by_seq else []),
        sa.Column("custom_id", sa.String(256), nullable=False),
        sa.Column("attempt_no", sa.Integer(), nullable=False),
    ]


def _attempt_columns() -> list[sa.Column[Any]]:
    """The attempt's columns after ``run_id, [seq,] custom_id, attempt_no`` (as of 0005)."""
    return [
        sa.Column("endpoint", sa.String(128), nullable=False),
        sa.Column("base_url", sa.Text(), nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("latency_ms", sa.Float()),
        sa.Column("http_status", sa.Integer()),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("error_class", sa.String(64)),
        sa.Column("error_message", sa.Text()),
        sa.Column("retry_after_s", sa.Float()),
        sa.Column("wait_s", sa.Float()),
        sa.Column("provider_request_id", sa.String(256)),
        sa.Column("prompt_tokens", sa.Integer()),
        sa.Column("completion_tokens", sa.Integer()),
        sa.Column("total_tokens", sa.Integer()),
        sa.Column("cached_tokens", sa.Integer()),
        sa.Column("cache_write_tokens", sa.Integer()),
        sa.Column("reasoning_tokens", sa.Integer()),
        sa.Column("audio_prompt_tokens", sa.Integer()),
        sa.Column("audio_completion_tokens", sa.Integer()),
        sa.Column("accepted_prediction_tokens", sa.Integer()),
        sa.Column("rejected_prediction_tokens", sa.Integer()),
        sa.Column("usage_estimated", sa.Boolean()),
        sa.Column("usage_json", sa.Text()),
        sa.Column("cost_picousd", sa.BigInteger()),
        sa.Column("cost_source", sa.String(32)),
        sa.Column("cost_note", sa.Text()),
        sa.Column("reported_cost_picousd", sa.BigInteger()),
        sa.Column("upstream_cost_picousd", sa.BigInteger()),
        sa.Column("stream", sa.Boolean()),
        sa.Column("ttft_ms", sa.Float()),
        sa.Column("ttlt_ms", sa.Float()),
        sa.Column("output_tokens_per_s", sa.Float()),
        sa.Column("partial", sa.Boolean()),
    ]


def _completion_columns() -> list[sa.Column[Any]]:
    return [
        sa.Column("response_id", sa.String(256)),
        sa.Column("model", sa.String(256)),
        sa.Column("provider", sa.String(128)),
        sa.Column("system_fingerprint", sa.String(128)),
        sa.Column("finish_reason", sa.String(32)),
        sa.Column("content", sa.Text()),
        sa.Column("reasoning", sa.Text()),
        sa.Column("refusal", sa.Text()),
        sa.Column("tool_calls", sa.Text()),
        sa.Column("choices_json", sa.Text()),
        sa.Column("raw", sa.Text()),
        sa.Column("parsed", sa.Text()),
        sa.Column("validation_error", sa.Text()),
    ]


def _rebuild_sqlite(key: str) -> None:
    """Copy attempt and completion into tables keyed by ``key`` (seq or custom_id), in the
    order foreign keys allow: each new table refers to the new one above it."""
    by_seq = key == "seq"
    views = op.get_bind().exec_driver_sql("SELECT name, sql FROM sqlite_master WHERE type = 'view'").all()
    for name, _ in views:
        op.execute(f"DROP VIEW {name}")
    request_key = ["run_id", "seq"] if by_seq else ["run_id", "custom_id"]
    attempt_key = [*request_key, "attempt_no"]
    for table, rest, parent, parent_key in (
        ("attempt", _attempt_columns(), "request", request_key),
        ("completion", _completion_columns(), "attempt_new", attempt_key),
    ):
        columns = [*_key_columns(by_seq), *rest]
        op.create_table(
            f"{table}_new",
            *columns,
            sa.PrimaryKeyConstraint(*attempt_key, name=f"pk_{table}"),
            sa.ForeignKeyConstraint(
                parent_key,
                [f"{parent}.{k}" for k in parent_key],
                name=f"fk_{table}_run_id_{parent.removesuffix('_new')}",
            ),
        )
        names = [c.name for c in columns]
        picked = ", ".join("r.seq" if n == "seq" else f"t.{n}" for n in names)
        op.execute(
            f"INSERT INTO {table}_new ({', '.join(names)}) SELECT {picked} FROM {table} t "
            "JOIN request r ON r.run_id = t.run_id AND r.custom_id = t.custom_id"
        )
    op.drop_table("completion")  # the child first: nothing refers to it
    op.drop_table("attempt")
    op.rename_table("attempt_new", "attempt")  # completion_new's reference follows it
    op.rename_table("completion_new", "completion")
    for name, sql in views:
        if name == "request_result":
            sql = f"CREATE VIEW request_result AS {_REQUEST_RESULT}{_JOINS[key]}"
        op.execute(sql)


def _rekey_postgresql(key: str) -> None:
    """ALTER both tables to be keyed by ``key`` (seq or custom_id); ``seq`` added or dropped."""
    by_seq = key == "seq"
    request_key = "run_id, seq" if by_seq else "run_id, custom_id"
    op.execute("ALTER TABLE completion DROP CONSTRAINT fk_completion_run_id_attempt")
    if by_seq:
        for table in ("attempt", "completion"):
            op.execute(f"ALTER TABLE {table} ADD COLUMN seq BIGINT")
            op.execute(
                f"UPDATE {table} t SET seq = r.seq FROM request r "
                "WHERE r.run_id = t.run_id AND r.custom_id = t.custom_id"
            )
            op.execute(f"ALTER TABLE {table} ALTER COLUMN seq SET NOT NULL")
    else:
        op.execute(f"CREATE OR REPLACE VIEW request_result AS {_REQUEST_RESULT}{_JOINS[key]}")
    op.execute(
        "ALTER TABLE attempt DROP CONSTRAINT fk_attempt_run_id_request, DROP CONSTRAINT pk_attempt, "
        f"ADD CONSTRAINT pk_attempt PRIMARY KEY ({request_key}, attempt_no), "
        f"ADD CONSTRAINT fk_attempt_run_id_request FOREIGN KEY ({request_key}) "
        f"REFERENCES request ({request_key})"
    )
    op.execute(
        "ALTER TABLE completion DROP CONSTRAINT pk_completion, "
        f"ADD CONSTRAINT pk_completion PRIMARY KEY ({request_key}, attempt_no), "
        f"ADD CONSTRAINT fk_completion_run_id_attempt FOREIGN KEY ({request_key}, attempt_no) "
        f"REFERENCES attempt ({request_key}, attempt_no)"
    )
    if by_seq:
        op.execute(f"CREATE OR REPLACE VIEW request_result AS {_REQUEST_RESULT}{_JOINS[key]}")
    else:
        op.execute("ALTER TABLE completion DROP COLUMN seq")
        op.execute("ALTER TABLE attempt DROP COLUMN seq")


def _rekey(key: str) -> None:
    if op.get_bind().dialect.name == "sqlite":
        _rebuild_sqlite(key)
    else:
        _rekey_postgresql(key)


def upgrade() -> None:
    _rekey("seq")


def downgrade() -> None:
    _rekey("custom_id")
