"""The SQL schema, declared once. Alembic (``migrations/``) owns every change to it.

Portable to SQLite and PostgreSQL: plain types, composite keys, no JSON column types
(JSON is stored as text, written with orjson). Money is integer picodollars (1e-12 USD):
exact, summable, and wide enough for $9 million per sum.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
)

__all__ = [
    "REQUEST_STATES",
    "RUN_STATES",
    "VIEWS",
    "attempt",
    "autogenerate_options",
    "completion",
    "metadata",
    "rate_slot",
    "request",
    "request_input",
    "run",
    "worker",
]

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


def _only_on(dialect: str, index: Index) -> Index:
    """``index``, made only on ``dialect`` (and compared with databases of it only, see
    :func:`autogenerate_options`)."""
    index.info["only_on"] = dialect
    return index.ddl_if(dialect=dialect)


def autogenerate_options(dialect: str) -> dict[str, Any]:
    """How Alembic compares this metadata with a database of ``dialect`` (``migrations/env.py``,
    and the tests that find no drift): column types too, and without the objects made only on
    other dialects."""

    def include(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
        only_on = None if reflected else getattr(obj, "info", {}).get("only_on")
        return only_on is None or only_on == dialect

    return {"compare_type": True, "include_object": include}


RUN_STATES = ("created", "rejected", "running", "completed", "failed", "interrupted", "aborted", "stopped")
REQUEST_STATES = ("pending", "in_flight", "succeeded", "failed", "rejected")

run = Table(
    "run",
    metadata,
    Column("run_id", String(128), nullable=False),
    Column("job", String(128), nullable=False),
    Column("spec_json", Text, nullable=False),  # secrets removed: key variable names only
    Column("input_path", Text, nullable=False),
    Column("input_sha256", String(64), nullable=False),
    Column("input_rows", BigInteger),
    Column("loaded", Boolean, nullable=False, default=False),  # requests are in the table
    Column("state", String(16), nullable=False),
    Column("error", Text),
    Column("exit_code", Integer),
    Column("created_at", DateTime, nullable=False),
    Column("started_at", DateTime),
    Column("finished_at", DateTime),
    PrimaryKeyConstraint("run_id"),
)

request = Table(
    "request",
    metadata,
    Column("run_id", String(128), nullable=False),
    Column("custom_id", String(256), nullable=False),
    Column("seq", BigInteger, nullable=False),  # position in the input, 0-based
    Column("body_sha256", String(64), nullable=False),  # the body itself: request_input
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("final_attempt_no", Integer),
    Column("error", Text),
    Column("cost_picousd", BigInteger),  # sum of the computed cost of every attempt
    Column("reported_cost_picousd", BigInteger),  # sum of the provider-reported cost
    Column("finished_at", DateTime),
    Column("claimed_at", DateTime),  # write-ahead: set before the request is sent
    # Workers sharing a run (PostgreSQL): who holds the claim, and until when (database clock).
    Column("lease_owner", String(64)),
    Column("lease_until", DateTime),
    PrimaryKeyConstraint("run_id", "custom_id"),
    UniqueConstraint("run_id", "seq"),
    ForeignKeyConstraint(["run_id"], ["run.run_id"]),
    # Leases by state, for workers sharing a run; on SQLite (one process) no query needs it,
    # and each change of a request's state moved its entry (migration 0007)
    _only_on("postgresql", Index(None, "run_id", "state", "seq")),
)

# What the input said of a request, apart from its state: a request's row is written again at
# each change of state (claimed, answered), and SQLite rewrites a row whole, so bodies kept in
# it made every change cost as much as the prompt's size (4 KB prompts: 2.7x SQLite's work per
# request, half the recorder's throughput; bench/recorder.py --prompt-bytes). Written once.
request_input = Table(
    "request_input",
    metadata,
    Column("run_id", String(128), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("body", Text, nullable=False),  # the request as sent, without "model" (JSON)
    Column("record", Text),  # the data record of a template row (JSON)
    PrimaryKeyConstraint("run_id", "seq"),
    ForeignKeyConstraint(["run_id", "seq"], ["request.run_id", "request.seq"]),
)

# Attempts and completions are keyed by the request's position (seq), not by its custom_id:
# a key an index holds in the order requests are sent, so a batch's rows go into a few pages of
# it. Keyed by custom_id (often random: UUIDs, hashes), every row of a batch went into a page
# of its own, each written whole to the WAL: 200,000 requests with UUIDs for ids, the recorder
# committed 14,600 outcomes/s instead of 62,000 (bench/recorder.py --random-ids). The custom_id
# is kept in both, for reading (unindexed; join on seq).
attempt = Table(
    "attempt",
    metadata,
    Column("run_id", String(128), nullable=False),
    Column("seq", BigInteger, nullable=False),  # the request's
    Column("custom_id", String(256), nullable=False),
    Column("attempt_no", Integer, nullable=False),
    Column("endpoint", String(128), nullable=False),
    Column("base_url", Text, nullable=False),
    Column("model", String(256), nullable=False),
    Column("started_at", DateTime, nullable=False),
    Column("latency_ms", Float),
    Column("http_status", Integer),
    Column("outcome", String(32), nullable=False),
    Column("error_class", String(64)),
    Column("error_message", Text),
    Column("retry_after_s", Float),
    Column("wait_s", Float),
    Column("provider_request_id", String(256)),
    Column("prompt_tokens", Integer),
    Column("completion_tokens", Integer),
    Column("total_tokens", Integer),
    Column("cached_tokens", Integer),
    Column("cache_write_tokens", Integer),
    Column("reasoning_tokens", Integer),
    Column("audio_prompt_tokens", Integer),
    Column("audio_completion_tokens", Integer),
    Column("accepted_prediction_tokens", Integer),
    Column("rejected_prediction_tokens", Integer),
    Column("usage_estimated", Boolean),
    Column("cost_picousd", BigInteger),
    Column("cost_source", String(32)),
    Column("cost_note", Text),
    Column("reported_cost_picousd", BigInteger),
    Column("upstream_cost_picousd", BigInteger),
    Column("stream", Boolean),
    Column("ttft_ms", Float),  # time to first token (streamed attempts)
    Column("ttlt_ms", Float),  # time to last token
    Column("output_tokens_per_s", Float),
    Column("partial", Boolean),  # the completion is what arrived before a stream broke
    PrimaryKeyConstraint("run_id", "seq", "attempt_no"),
    ForeignKeyConstraint(["run_id", "seq"], ["request.run_id", "request.seq"]),
)

completion = Table(
    "completion",
    metadata,
    Column("run_id", String(128), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("custom_id", String(256), nullable=False),
    Column("attempt_no", Integer, nullable=False),
    Column("response_id", String(256)),
    Column("model", String(256)),  # as reported by the provider
    Column("provider", String(128)),
    Column("system_fingerprint", String(128)),
    Column("finish_reason", String(32)),
    Column("content", Text),
    Column("reasoning", Text),
    Column("refusal", Text),
    Column("tool_calls", Text),  # JSON
    Column("choices_json", Text),  # every choice, when n > 1 (JSON)
    Column("raw", Text),  # the response body as received
    Column("parsed", Text),  # the structured answer (JSON), when response_format asks for one
    Column("validation_error", Text),
    PrimaryKeyConstraint("run_id", "seq", "attempt_no"),
    ForeignKeyConstraint(
        ["run_id", "seq", "attempt_no"],
        ["attempt.run_id", "attempt.seq", "attempt.attempt_no"],
    ),
)

worker = Table(
    "worker",
    metadata,
    # One process working on a run (``pipeline run`` or ``pipeline worker``) on a shared database.
    Column("worker_id", String(64), nullable=False),
    Column("run_id", String(128), nullable=False),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("started_at", DateTime, nullable=False),
    Column("heartbeat_at", DateTime, nullable=False),
    Column("finished_at", DateTime),
    Column("budget_picousd", BigInteger, nullable=False, default=0),  # budget slices it holds
    Column("spent_picousd", BigInteger, nullable=False, default=0),  # cost it has recorded
    Column("recorded", BigInteger, nullable=False, default=0),  # requests it has recorded
    PrimaryKeyConstraint("worker_id"),
    ForeignKeyConstraint(["run_id"], ["run.run_id"]),
    Index(None, "run_id"),
)

rate_slot = Table(
    "rate_slot",
    metadata,
    # One provider rate limit (base URL + model) shared by every worker of every run: the
    # next free send time (GCRA "theoretical arrival time", seconds on the database clock)
    # for requests and for tokens, a cooldown after a 429, and limits learned from headers.
    Column("route_key", String(512), nullable=False),
    Column("requests_tat", Float, nullable=False, default=0.0),
    Column("tokens_tat", Float, nullable=False, default=0.0),
    Column("cooldown_until", Float, nullable=False, default=0.0),
    Column("learned_rpm", Float),
    Column("learned_tpm", Float),
    PrimaryKeyConstraint("route_key"),
)

# Views for audits in plain SQL (sqlite3, DuckDB, psql). Created by the migrations.
# ``date(ts)`` works on SQLite and PostgreSQL alike; costs are shown in USD (float, for
# reading) beside the exact integer picodollars.
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
               c.content, c.parsed, c.reasoning, c.refusal, c.tool_calls,
               a.prompt_tokens, a.completion_tokens, a.total_tokens, a.cached_tokens,
               a.reasoning_tokens,
               r.cost_picousd / 1e12 AS cost_usd,
               r.reported_cost_picousd / 1e12 AS reported_cost_usd
        FROM request r
        LEFT JOIN attempt a ON a.run_id = r.run_id AND a.seq = r.seq
             AND a.attempt_no = r.final_attempt_no
        LEFT JOIN completion c ON c.run_id = a.run_id AND c.seq = a.seq
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
