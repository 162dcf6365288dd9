"""Initial schema: run, request, attempt, completion, and the audit views.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the view definitions at this revision (later revisions replace them).
VIEWS: dict[str, str] = {
    "attempt_bill": """
        SELECT a.run_id, a.custom_id, a.attempt_no, a.endpoint, a.model, a.started_at,
               a.outcome, a.error_class, a.http_status,
               a.prompt_tokens, a.cached_tokens, a.completion_tokens, a.reasoning_tokens,
               a.total_tokens, a.usage_estimated,
               a.cost_picousd, a.cost_picousd / 1e12 AS cost_usd, a.cost_source, a.cost_note,
               a.reported_cost_picousd, a.reported_cost_picousd / 1e12 AS reported_cost_usd
        FROM attempt a""",
    "request_result": """
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
             AND c.attempt_no = a.attempt_no""",
    "cost_by_model_day": """
        SELECT date(a.started_at) AS day, a.endpoint, a.model,
               COUNT(*) AS attempts,
               SUM(CASE WHEN a.outcome = 'success' THEN 1 ELSE 0 END) AS succeeded,
               SUM(a.prompt_tokens) AS prompt_tokens, SUM(a.cached_tokens) AS cached_tokens,
               SUM(a.completion_tokens) AS completion_tokens,
               SUM(a.reasoning_tokens) AS reasoning_tokens,
               SUM(a.cost_picousd) AS cost_picousd, SUM(a.cost_picousd) / 1e12 AS cost_usd,
               SUM(a.reported_cost_picousd) / 1e12 AS reported_cost_usd
        FROM attempt a
        GROUP BY date(a.started_at), a.endpoint, a.model""",
    "cost_by_run": """
        SELECT a.run_id, COUNT(*) AS attempts,
               COUNT(DISTINCT a.custom_id) AS requests,
               SUM(a.prompt_tokens) AS prompt_tokens, SUM(a.completion_tokens) AS completion_tokens,
               SUM(a.cost_picousd) AS cost_picousd, SUM(a.cost_picousd) / 1e12 AS cost_usd,
               SUM(a.reported_cost_picousd) / 1e12 AS reported_cost_usd
        FROM attempt a
        GROUP BY a.run_id""",
    "failure_rate_by_route": """
        SELECT a.endpoint, a.model, COUNT(*) AS attempts,
               SUM(CASE WHEN a.outcome <> 'success' THEN 1 ELSE 0 END) AS failures,
               1.0 * SUM(CASE WHEN a.outcome <> 'success' THEN 1 ELSE 0 END) / COUNT(*) AS failure_rate
        FROM attempt a
        GROUP BY a.endpoint, a.model""",
}


def upgrade() -> None:
    op.create_table(
        "run",
        sa.Column("run_id", sa.String(128), nullable=False),
        sa.Column("job", sa.String(128), nullable=False),
        sa.Column("spec_json", sa.Text, nullable=False),
        sa.Column("input_path", sa.Text, nullable=False),
        sa.Column("input_sha256", sa.String(64), nullable=False),
        sa.Column("input_rows", sa.BigInteger),
        sa.Column("loaded", sa.Boolean, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("exit_code", sa.Integer),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("started_at", sa.DateTime),
        sa.Column("finished_at", sa.DateTime),
        sa.PrimaryKeyConstraint("run_id", name="pk_run"),
    )
    op.create_table(
        "request",
        sa.Column("run_id", sa.String(128), nullable=False),
        sa.Column("custom_id", sa.String(256), nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("body_sha256", sa.String(64), nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("record", sa.Text),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("final_attempt_no", sa.Integer),
        sa.Column("error", sa.Text),
        sa.Column("cost_picousd", sa.BigInteger),
        sa.Column("reported_cost_picousd", sa.BigInteger),
        sa.Column("finished_at", sa.DateTime),
        sa.PrimaryKeyConstraint("run_id", "custom_id", name="pk_request"),
        sa.UniqueConstraint("run_id", "seq", name="uq_request_run_id_seq"),
        sa.ForeignKeyConstraint(["run_id"], ["run.run_id"], name="fk_request_run_id_run"),
    )
    op.create_index("ix_request_run_id_state_seq", "request", ["run_id", "state", "seq"])
    op.create_table(
        "attempt",
        sa.Column("run_id", sa.String(128), nullable=False),
        sa.Column("custom_id", sa.String(256), nullable=False),
        sa.Column("attempt_no", sa.Integer, nullable=False),
        sa.Column("endpoint", sa.String(128), nullable=False),
        sa.Column("base_url", sa.Text, nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("started_at", sa.DateTime, nullable=False),
        sa.Column("latency_ms", sa.Float),
        sa.Column("http_status", sa.Integer),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("error_class", sa.String(64)),
        sa.Column("error_message", sa.Text),
        sa.Column("retry_after_s", sa.Float),
        sa.Column("wait_s", sa.Float),
        sa.Column("provider_request_id", sa.String(256)),
        sa.Column("prompt_tokens", sa.Integer),
        sa.Column("completion_tokens", sa.Integer),
        sa.Column("total_tokens", sa.Integer),
        sa.Column("cached_tokens", sa.Integer),
        sa.Column("cache_write_tokens", sa.Integer),
        sa.Column("reasoning_tokens", sa.Integer),
        sa.Column("audio_prompt_tokens", sa.Integer),
        sa.Column("audio_completion_tokens", sa.Integer),
        sa.Column("accepted_prediction_tokens", sa.Integer),
        sa.Column("rejected_prediction_tokens", sa.Integer),
        sa.Column("usage_estimated", sa.Boolean),
        sa.Column("usage_json", sa.Text),
        sa.Column("cost_picousd", sa.BigInteger),
        sa.Column("cost_source", sa.String(32)),
        sa.Column("cost_note", sa.Text),
        sa.Column("reported_cost_picousd", sa.BigInteger),
        sa.Column("upstream_cost_picousd", sa.BigInteger),
        sa.PrimaryKeyConstraint("run_id", "custom_id", "attempt_no", name="pk_attempt"),
        sa.ForeignKeyConstraint(
            ["run_id", "custom_id"],
            ["request.run_id", "request.custom_id"],
            name="fk_attempt_run_id_request",
        ),
    )
    op.create_index("ix_attempt_started_at", "attempt", ["started_at"])
    op.create_table(
        "completion",
        sa.Column("run_id", sa.String(128), nullable=False),
        sa.Column("custom_id", sa.String(256), nullable=False),
        sa.Column("attempt_no", sa.Integer, nullable=False),
        sa.Column("response_id", sa.String(256)),
        sa.Column("model", sa.String(256)),
        sa.Column("provider", sa.String(128)),
        sa.Column("system_fingerprint", sa.String(128)),
        sa.Column("finish_reason", sa.String(32)),
        sa.Column("content", sa.Text),
        sa.Column("reasoning", sa.Text),
        sa.Column("refusal", sa.Text),
        sa.Column("tool_calls", sa.Text),
        sa.Column("choices_json", sa.Text),
        sa.Column("raw", sa.Text),
        sa.PrimaryKeyConstraint("run_id", "custom_id", "attempt_no", name="pk_completion"),
        sa.ForeignKeyConstraint(
            ["run_id", "custom_id", "attempt_no"],
            ["attempt.run_id", "attempt.custom_id", "attempt.attempt_no"],
            name="fk_completion_run_id_attempt",
        ),
    )
    for name, sql in VIEWS.items():
        op.execute(f"CREATE VIEW {name} AS {sql}")


def downgrade() -> None:
    for name in VIEWS:
        op.execute(f"DROP VIEW IF EXISTS {name}")
    op.drop_table("completion")
    op.drop_table("attempt")
    op.drop_index("ix_request_run_id_state_seq", table_name="request")
    op.drop_table("request")
    op.drop_table("run")
