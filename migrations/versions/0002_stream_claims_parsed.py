"""Streaming timings per attempt, write-ahead claims per request, parsed structured answers.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

REQUEST_RESULT = """
        SELECT r.run_id, r.custom_id, r.seq, r.state, r.attempts, r.error,
               a.endpoint, a.model, c.model AS response_model, c.response_id, c.finish_reason,
               c.content, c.parsed, c.reasoning, c.refusal, c.tool_calls,
               a.prompt_tokens, a.completion_tokens, a.total_tokens, a.cached_tokens,
               a.reasoning_tokens,
               r.cost_picousd / 1e12 AS cost_usd,
               r.reported_cost_picousd / 1e12 AS reported_cost_usd
        FROM request r
        LEFT JOIN attempt a ON a.run_id = r.run_id AND a.custom_id = r.custom_id
             AND a.attempt_no = r.final_attempt_no
        LEFT JOIN completion c ON c.run_id = a.run_id AND c.custom_id = a.custom_id
             AND c.attempt_no = a.attempt_no"""

REQUEST_RESULT_0001 = """
        SELECT r.run_id, r.custom_id, r.seq, r.state, r.attempts, r.error,
               a.endpoint, a.model, c.model AS response_model, c.response_id, c.finish_reason,
               c.content, c.reasoning, c.refusal, c.tool_calls,
               a.prompt_tokens, a.completion_tokens, a.total_tokens, a.cached_tokens,
               a.reasoning_tokens,
               r.cost_picousd / 1e12 AS cost_usd,
               r.reported_cost_picousd / 1e12 AS reported_cost_usd
        FROM request r
        LEFT JOIN attempt a ON a.run_id = r.run_id AND a.custom_id = r.custom_id
             AND a.attempt_no = r.final_attempt_no
        LEFT JOIN completion c ON c.run_id = a.run_id AND c.custom_id = a.custom_id
             AND c.attempt_no = a.attempt_no"""


def upgrade() -> None:
    op.execute("DROP VIEW IF EXISTS request_result")
    op.add_column("attempt", sa.Column("stream", sa.Boolean))
    op.add_column("attempt", sa.Column("ttft_ms", sa.Float))
    op.add_column("attempt", sa.Column("ttlt_ms", sa.Float))
    op.add_column("attempt", sa.Column("output_tokens_per_s", sa.Float))
    op.add_column("attempt", sa.Column("partial", sa.Boolean))
    op.add_column("completion", sa.Column("parsed", sa.Text))
    op.add_column("completion", sa.Column("validation_error", sa.Text))
    op.add_column("request", sa.Column("claimed_at", sa.DateTime))
    op.execute(f"CREATE VIEW request_result AS {REQUEST_RESULT}")


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS request_result")
    with op.batch_alter_table("request") as b:
        b.drop_column("claimed_at")
    with op.batch_alter_table("completion") as b:
        b.drop_column("validation_error")
        b.drop_column("parsed")
    with op.batch_alter_table("attempt") as b:
        for col in ("partial", "output_tokens_per_s", "ttlt_ms", "ttft_ms", "stream"):
            b.drop_column(col)
    op.execute(f"CREATE VIEW request_result AS {REQUEST_RESULT_0001}")
