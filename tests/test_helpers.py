"""The test helpers that read either backend: ``?`` placeholders become PostgreSQL's ``$n``."""

from __future__ import annotations

from helpers import pg_placeholders


def test_question_marks_outside_quotes_become_numbered_placeholders() -> None:
    sql = "SELECT '?', \"odd?name\" FROM t WHERE a = ? AND b = 'it''s ?' AND c IN (?, ?)"
    assert pg_placeholders(sql) == (
        "SELECT '?', \"odd?name\" FROM t WHERE a = $1 AND b = 'it''s ?' AND c IN ($2, $3)"
    )
    assert pg_placeholders("SELECT 1") == "SELECT 1"
