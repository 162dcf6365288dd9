"""Many workers on one database: request leases, the worker table, shared rate slots.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("request", sa.Column("lease_owner", sa.String(64)))
    op.add_column("request", sa.Column("lease_until", sa.DateTime))
    op.create_table(
        "worker",
        sa.Column("worker_id", sa.String(64), nullable=False),
        sa.Column("run_id", sa.String(128), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("started_at", sa.DateTime, nullable=False),
        sa.Column("heartbeat_at", sa.DateTime, nullable=False),
        sa.Column("finished_at", sa.DateTime),
        sa.Column("budget_picousd", sa.BigInteger, nullable=False),
        sa.Column("spent_picousd", sa.BigInteger, nullable=False),
        sa.Column("recorded", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("worker_id", name="pk_worker"),
        sa.ForeignKeyConstraint(["run_id"], ["run.run_id"], name="fk_worker_run_id_run"),
    )
    op.create_index("ix_worker_run_id", "worker", ["run_id"])
    op.create_table(
        "rate_slot",
        sa.Column("route_key", sa.String(512), nullable=False),
        sa.Column("requests_tat", sa.Float, nullable=False),
        sa.Column("tokens_tat", sa.Float, nullable=False),
        sa.Column("cooldown_until", sa.Float, nullable=False),
        sa.Column("learned_rpm", sa.Float),
        sa.Column("learned_tpm", sa.Float),
        sa.PrimaryKeyConstraint("route_key", name="pk_rate_slot"),
    )


def downgrade() -> None:
    op.drop_table("rate_slot")
    op.drop_index("ix_worker_run_id", "worker")
    op.drop_table("worker")
    with op.batch_alter_table("request") as b:
        b.drop_column("lease_until")
        b.drop_column("lease_owner")
