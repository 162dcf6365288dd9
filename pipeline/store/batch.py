"""The rows a batch of outcomes writes: attempts, completions, and the requests' new states.

Built column by column, without touching the database, so that the recorder builds one batch
while the database writes the one before. A column is one C loop over the whole batch (``map``
of an attribute getter, or ``zip`` over NamedTuples), where a row was a tuple built per
outcome in Python and taken apart again column by column for SQLite's many-row statements
(``Rows.column_chunks``): a batch's columns and statements cost the recorder's event loop
4.3-4.5 us per outcome against 7.2 for the rows and their chunks (20 batches of 1,024 of
``bench/recorder.py``'s outcomes). The engine's path (PostgreSQL, workers sharing a run) takes
rows: :attr:`OutcomeRows.attempts` and its siblings turn the columns into tuples once, on
demand.

The columns of each table are named once here (``ATTEMPT_KEYS``, ``COMPLETION_KEYS``,
``FINISH_KEYS``); ``Prepared`` checks them against the tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from operator import attrgetter, itemgetter, methodcaller
from typing import Any

import orjson

from pipeline.pricing import attempts_cost, picousd
from pipeline.records import Attempt, Completion, Outcome, Usage

__all__ = [
    "ATTEMPT_KEYS",
    "ATTEMPT_SHARED",
    "COMPLETION_KEYS",
    "COMPLETION_SHARED",
    "FINISH_KEYS",
    "FINISH_SHARED",
    "OutcomeRows",
    "outcome_rows",
]

# The usage's token details: zero in most answers, so one value in a batch (see ATTEMPT_SHARED).
TOKEN_DETAILS = (
    "cached_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "audio_prompt_tokens",
    "audio_completion_tokens",
    "accepted_prediction_tokens",
    "rejected_prediction_tokens",
)
# The Attempt's own fields, stored under their names
_ATTEMPT_OWN = (
    "attempt_no",
    "endpoint",
    "base_url",
    "model",
    "started_at",
    "latency_ms",
    "http_status",
    "outcome",
    "error_class",
    "error_message",
    "retry_after_s",
    "wait_s",
    "provider_request_id",
    "cost_picousd",
    "cost_source",
    "cost_note",
    "stream",
    "ttft_ms",
    "ttlt_ms",
    "output_tokens_per_s",
    "partial",
)
# The Usage fields stored as counts, in the columns' order: prompt_tokens .. usage_estimated
_USAGE_COUNTS = (
    "prompt",
    "completion",
    "total",
    "cached",
    "cache_write",
    "reasoning",
    "audio_prompt",
    "audio_completion",
    "accepted_prediction",
    "rejected_prediction",
    "estimated",
)
ATTEMPT_KEYS = (
    "run_id",
    "custom_id",
    "seq",
    *_ATTEMPT_OWN,
    # from its usage
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    *TOKEN_DETAILS,
    "usage_estimated",
    "reported_cost_picousd",
    "upstream_cost_picousd",
)
# Columns that usually hold one value in a whole batch (bound once per chunk, see Rows):
# the run, the route, a success's status and zero token details; not the counts and costs.
ATTEMPT_SHARED = (
    "run_id",
    "attempt_no",
    "endpoint",
    "base_url",
    "model",
    "http_status",
    "outcome",
    "error_class",
    "cost_source",
    "cost_note",
    "stream",
    "partial",
    *TOKEN_DETAILS,
    "usage_estimated",
)
COMPLETION_KEYS = (
    "run_id",
    "custom_id",
    "seq",
    "attempt_no",
    "response_id",
    "model",
    "provider",
    "system_fingerprint",
    "finish_reason",
    "content",
    "reasoning",
    "refusal",
    "tool_calls",
    "choices_json",
    "raw",
    "parsed",
    "validation_error",
)
COMPLETION_SHARED = ("run_id", "attempt_no", "model", "provider", "system_fingerprint", "finish_reason")
# A finished request's new values (the statement: Store's _FINISH, or its many-row form on SQLite)
FINISH_KEYS = (
    "b_run_id",
    "b_seq",
    "b_state",
    "b_n",
    "b_final",
    "b_error",
    "b_cost",
    "b_reported",
    "b_finished",
)
FINISH_SHARED = ("b_run_id", "b_state", "b_n", "b_final", "b_error", "b_finished")

# Every field of a Usage None: the usage columns of an attempt without one
_NO_USAGE = Usage._make([None] * len(Usage._fields))
_U = {name: Usage._fields.index(name) for name in Usage._fields}
_C = {name: Completion._fields.index(name) for name in Completion._fields}
_OWN = attrgetter(*_ATTEMPT_OWN)  # one C call for the 21 of them
_USAGE, _COMPLETION = attrgetter("usage"), attrgetter("completion")
_CUSTOM_ID, _SEQ, _STATE, _ERROR, _ATTEMPTS = (
    attrgetter(name) for name in ("custom_id", "seq", "state", "error", "attempts")
)
_FIRST = itemgetter(0)
_CHOICE = attrgetter("finish_reason", "content", "reasoning", "refusal")
_TOOL_CALLS = attrgetter("tool_calls")
_PARSED, _VALIDATION_ERROR = attrgetter("parsed"), attrgetter("validation_error")
_TEXT = methodcaller("decode", "utf-8", "replace")


@dataclass(slots=True)
class OutcomeRows:
    """A batch of outcomes as the rows it writes, column by column: ``attempt_columns[k][i]``
    is the i-th attempt's value of ``ATTEMPT_KEYS[k]`` (``completion_columns``:
    ``COMPLETION_KEYS``; ``request_columns``: ``FINISH_KEYS``, a request each)."""

    run_id: str
    outcomes: Sequence[Outcome]
    owner: str | None
    attempt_columns: list[Sequence[Any]]
    completion_columns: list[Sequence[Any]]
    request_columns: list[Sequence[Any]]
    # SQLite: the statements, built with the rows (see Store.outcome_rows)
    statements: list[tuple[str, list[Any]]] | None = None
    finish_once: bool = True  # every request once: the requests' UPDATE is in ``statements``
    _rows: dict[str, list[tuple[Any, ...]]] = field(default_factory=dict)

    @property
    def n_attempts(self) -> int:
        return len(self.attempt_columns[0])

    @property
    def n_completions(self) -> int:
        return len(self.completion_columns[0])

    @property
    def attempts(self) -> list[tuple[Any, ...]]:
        """The attempts as tuples of ``ATTEMPT_KEYS`` (made once; changes to the list stay)."""
        return self._as_rows("attempt", self.attempt_columns)

    @property
    def completions(self) -> list[tuple[Any, ...]]:
        return self._as_rows("completion", self.completion_columns)

    @property
    def requests(self) -> list[tuple[Any, ...]]:
        return self._as_rows("request", self.request_columns)

    def _as_rows(self, name: str, columns: list[Sequence[Any]]) -> list[tuple[Any, ...]]:
        rows = self._rows.get(name)
        if rows is None:
            rows = self._rows[name] = list(zip(*columns, strict=True))
        return rows


def outcome_rows(run_id: str, outcomes: Sequence[Outcome], owner: str | None, now: datetime) -> OutcomeRows:
    """The rows of a batch; ``now`` is its requests' finishing time."""
    n = len(outcomes)
    counts = list(map(len, map(_ATTEMPTS, outcomes)))
    if counts.count(1) == n:  # the usual batch: one attempt each
        attempts: list[Attempt] = list(map(_FIRST, map(_ATTEMPTS, outcomes)))
        cids: list[str] = list(map(_CUSTOM_ID, outcomes))
        seqs: list[int] = list(map(_SEQ, outcomes))
    else:
        attempts, cids, seqs = [], [], []
        for o in outcomes:
            attempts += o.attempts
            cids += [o.custom_id] * len(o.attempts)
            seqs += [o.seq] * len(o.attempts)
    acols = _attempt_columns(run_id, attempts, cids, seqs)
    return OutcomeRows(
        run_id,
        outcomes,
        owner,
        acols,
        _completion_columns(run_id, attempts, cids, seqs),
        _request_columns(run_id, outcomes, counts, acols, now),
    )


def _attempt_columns(
    run_id: str, attempts: list[Attempt], cids: list[str], seqs: list[int]
) -> list[Sequence[Any]]:
    m = len(attempts)
    if not m:
        return [()] * len(ATTEMPT_KEYS)
    own = list(zip(*map(_OWN, attempts), strict=True))
    usages = list(map(_USAGE, attempts))
    if usages.count(None):
        usages = [_NO_USAGE if u is None else u for u in usages]
    u = list(zip(*usages, strict=True))
    return [
        [run_id] * m,
        cids,
        seqs,
        *own,
        *(u[_U[name]] for name in _USAGE_COUNTS),
        _picousd_column(u[_U["reported_cost"]]),
        _picousd_column(u[_U["upstream_cost"]]),
    ]


def _completion_columns(
    run_id: str, attempts: list[Attempt], cids: list[str], seqs: list[int]
) -> list[Sequence[Any]]:
    completions: list[Completion | None] = list(map(_COMPLETION, attempts))
    if completions.count(None):  # only the attempts with a completion
        kept = [i for i, c in enumerate(completions) if c is not None]
        attempts = [attempts[i] for i in kept]
        cids = [cids[i] for i in kept]
        seqs = [seqs[i] for i in kept]
        completions = [completions[i] for i in kept]
    m = len(completions)
    if not m:
        return [()] * len(COMPLETION_KEYS)
    c = list(zip(*completions, strict=True))
    choices: Sequence[Any] = c[_C["choices"]]
    firsts = list(map(_FIRST, choices))
    choice = list(zip(*map(_CHOICE, firsts), strict=True))
    return [
        [run_id] * m,
        cids,
        seqs,
        [a.attempt_no for a in attempts],
        c[_C["response_id"]],
        c[_C["model"]],
        c[_C["provider"]],
        c[_C["system_fingerprint"]],
        *choice,  # finish_reason, content, reasoning, refusal
        _json_column(list(map(_TOOL_CALLS, firsts))),
        _choices_column(choices),
        list(map(_TEXT, c[_C["raw"]])),
        list(map(_PARSED, attempts)),
        list(map(_VALIDATION_ERROR, attempts)),
    ]


def _request_columns(
    run_id: str,
    outcomes: Sequence[Outcome],
    counts: list[int],
    acols: list[Sequence[Any]],
    now: datetime,
) -> list[Sequence[Any]]:
    n = len(outcomes)
    if not n:
        return [()] * len(FINISH_KEYS)
    states = list(map(_STATE, outcomes))
    finished: list[datetime | None] = (
        [now] * n if not states.count("pending") else [None if s == "pending" else now for s in states]
    )
    if counts.count(1) == n:  # one attempt each: the request's sums are its attempt's values
        final: Sequence[Any] = acols[ATTEMPT_KEYS.index("attempt_no")]
        cost: Sequence[Any] = acols[ATTEMPT_KEYS.index("cost_picousd")]
        reported: Sequence[Any] = acols[ATTEMPT_KEYS.index("reported_cost_picousd")]
    else:
        final = [o.attempts[-1].attempt_no if o.attempts else None for o in outcomes]
        cost, reported = zip(*map(attempts_cost, map(_ATTEMPTS, outcomes)), strict=True)
    return [
        [run_id] * n,
        list(map(_SEQ, outcomes)),
        states,
        counts,
        final,
        list(map(_ERROR, outcomes)),
        cost,
        reported,
        finished,
    ]


def _json_column(values: Sequence[Any]) -> Sequence[str | None]:
    """Each value as JSON text (None stays NULL)."""
    if values.count(None) == len(values):
        return values
    dumps = orjson.dumps
    return [None if v is None else dumps(v).decode() for v in values]


def _picousd_column(values: Sequence[Any]) -> Sequence[int | None]:
    """Each amount of USD in picodollars (None stays NULL)."""
    if values.count(None) == len(values):
        return values
    return [None if v is None else picousd(v) for v in values]


def _choices_column(choices: Sequence[tuple[Any, ...]]) -> Sequence[str | None]:
    """Every choice as JSON, where an answer has more than one (n > 1)."""
    if max(map(len, choices)) < 2:
        return [None] * len(choices)
    return [None if len(ch) < 2 else orjson.dumps([x.to_dict() for x in ch]).decode() for ch in choices]
