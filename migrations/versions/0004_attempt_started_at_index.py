"""The attempt table loses its index on started_at.

No query of the pipeline reads attempts by their start time (reports and the audit views group
by ``date(started_at)``, which an index on the column cannot serve), and keeping the index
cost the recorder ~6% of SQLite's work per attempt (bench/recorder.py).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("ix_attempt_started_at", "attempt")


def downgrade() -> None:
    op.create_index("ix_attempt_started_at", "attempt", ["started_at"])
