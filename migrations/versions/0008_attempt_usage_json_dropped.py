"""The attempt table loses ``usage_json``: the provider's usage object is in ``completion.raw``.

An attempt has a usage only when it has a completion (the worker takes both from the same
answer), and the completion's ``raw`` body holds that usage object as the provider sent it
(``raw -> 'usage'``; a streamed answer's ``raw`` is the equivalent ``chat.completion``, its
usage chunk included). So ``usage_json`` was a second copy of it: ~250 bytes of every attempt's
~450 (a sixth of what a batch of answers wrote to the WAL and the checkpoints copied back),
and the recorder committed ~20% more outcomes a second without it (``bench/recorder.py``).
The counts the bill is made of stay columns of the attempt (prompt, completion, cached,
reasoning tokens...).

Both SQLite (3.35 and newer) and PostgreSQL drop a column in place; no view names it. The
downgrade adds it back and fills it from the completions (the usage of estimated attempts was
never stored there, and stays NULL, as it was).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_USAGE = {
    "sqlite": "json_extract(c.raw, '$.usage')",
    "postgresql": "(c.raw::json -> 'usage')::text",
}


def upgrade() -> None:
    op.drop_column("attempt", "usage_json")


def downgrade() -> None:
    op.add_column("attempt", sa.Column("usage_json", sa.Text()))
    usage = _USAGE.get(op.get_bind().dialect.name)
    if usage is None:
        return
    op.execute(
        f"""UPDATE attempt SET usage_json = (
                SELECT {usage} FROM completion c
                WHERE c.run_id = attempt.run_id AND c.seq = attempt.seq
                  AND c.attempt_no = attempt.attempt_no)
            WHERE usage_estimated = false"""
    )
