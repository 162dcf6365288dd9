"""On SQLite, the request table loses its index on (run_id, state, seq).

Every request's state changes twice (claimed, then answered), and each change moved its entry
in that index: a delete and an insert, each a search through the index, in the recorder's
transactions. No query of a single process needs it on SQLite: the feeder's pages
(``Store.pending_page``, several states at once) and the result exports read a run in input
order from ``seq`` on, by the (run_id, seq) key, and a claim given back finds its requests by
``seq`` too (SQLite's planner chose those plans with the index there as well). Only the count of
a run's requests by state (at a run's start and end, ``pipeline status``) reads the run's rows
instead of the index: 0.66 s instead of 0.20 s for a million requests. Without it the recorder
committed ~10% more outcomes a second, ~17% more with claims (``bench/recorder.py``).

PostgreSQL keeps it: workers sharing a run lease requests by state (``Store.lease``) there.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.drop_index("ix_request_run_id_state_seq", "request")


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.create_index("ix_request_run_id_state_seq", "request", ["run_id", "state", "seq"])
