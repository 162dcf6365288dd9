"""Outcomes of every kind the recorder meets, for the storage and output tests.

``varied(n)`` cycles through: a plain answer; a retry then an answer; a failure (non-ASCII
message); a streamed answer with reasoning and provider-reported costs of more than 12 decimals;
tool calls with two choices, a refusal, a structured answer, estimated usage and no price; a
``pending`` outcome with a refused attempt; one with no attempt at all; an answer whose
``started_at`` has no microseconds. ``again(outcomes)`` answers requests a second time, as a
resumed session does (``prior_attempts`` set, attempts numbered after them).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import datetime, timedelta
from typing import Any

import orjson

from pipeline.records import Attempt, Choice, Completion, Outcome, Usage

KINDS = 8
START = datetime(2026, 11, 24, 12, 30, 15, 123456)


def request_rows(n: int, *, records: bool = False) -> list[dict[str, Any]]:
    """The run's requests as ``Store.load_requests`` takes them (``records``: with a data record)."""
    return [
        {
            "custom_id": custom_id(i),
            "seq": i,
            "body_sha256": f"{i:064x}",
            "body": orjson.dumps({"messages": [{"role": "user", "content": f"question {i}"}]}).decode(),
            "record": orjson.dumps(record(i)).decode() if records else None,
            "state": "pending",
            "attempts": 0,
        }
        for i in range(n)
    ]


async def batches(rows: list[dict[str, Any]], size: int = 100) -> AsyncIterator[list[dict[str, Any]]]:
    for k in range(0, len(rows), size):
        yield rows[k : k + size]


def custom_id(i: int) -> str:
    return f"q-{i:05d}"


def record(i: int) -> dict[str, Any]:
    """A data record: text, an int, a float (ints in some rows: the column becomes float)."""
    return {"id": custom_id(i), "text": f"ticket {i} ✓", "stars": i % 5, "score": i % 3 if i % 2 else i / 4}


def usage(prompt: int, completion: int, **more: Any) -> Usage:
    api: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion}
    api.update(more)
    u = Usage.from_api(api)
    assert u is not None
    return u


def completion(i: int, *, choices: Sequence[Choice] | None = None, u: Usage | None = None) -> Completion:
    content = f"answer {i} — ok"
    body = {"id": f"chatcmpl-{i}", "model": "m-1", "choices": [{"message": {"content": content}}]}
    return Completion(
        response_id=f"chatcmpl-{i}",
        model="m-1",
        provider="prov" if i % 2 else None,
        system_fingerprint="fp",
        created=1,
        choices=tuple(choices or (Choice(index=0, finish_reason="stop", content=content),)),
        usage=u,
        raw=orjson.dumps(body),
        provider_request_id=f"req-{i}",
    )


def attempt(i: int, no: int, *, at: datetime | None = None, **fields: Any) -> Attempt:
    a = Attempt(
        attempt_no=no,
        endpoint="default",
        base_url="http://127.0.0.1:1/v1",
        model="m",
        started_at=at or START + timedelta(milliseconds=i),
        latency_ms=10.0 + i,
        http_status=200,
        outcome="success",
    )
    for k, v in fields.items():
        setattr(a, k, v)
    return a


def answered(i: int, no: int) -> Attempt:
    u = usage(20, 5)
    return attempt(i, no, completion=completion(i, u=u), usage=u, cost_picousd=1_000 + i, cost_source="spec")


def outcome(i: int, prior: int = 0) -> Outcome:
    """The outcome of request ``i``, of kind ``i % KINDS``; attempts numbered after ``prior``."""
    kind, cid, n = i % KINDS, custom_id(i), prior + 1
    attempts: list[Attempt]
    state, error = "succeeded", None
    if kind == 0:
        attempts = [answered(i, n)]
    elif kind == 1:
        retry = attempt(
            i,
            n,
            http_status=503,
            outcome="retry",
            error_class="server_error",
            error_message="503 from upstream",
            retry_after_s=1.5,
            wait_s=0.25,
            latency_ms=3,
        )
        attempts = [retry, answered(i, n + 1)]
    elif kind == 2:
        bad = attempt(
            i, n, http_status=400, outcome="fail", error_class="bad_request", error_message="rejeté ✗"
        )
        attempts, state, error = [bad], "failed", "rejeté ✗ (400)"
    elif kind == 3:
        u = usage(
            30,
            12,
            completion_tokens_details={"reasoning_tokens": 7},
            cost="0.0000123456789012345",
            cost_details={"upstream_inference_cost": "0.00001"},
        )
        reasoning = Choice(index=0, finish_reason="length", content="partial ✓", reasoning="thinking…")
        c = completion(i, choices=[reasoning], u=u)
        streamed = attempt(
            i,
            n,
            completion=c,
            usage=u,
            cost_picousd=2_500,
            cost_source="catalogue",
            stream=True,
            ttft_ms=12.5,
            ttlt_ms=40.0,
            output_tokens_per_s=300.0,
            partial=False,
        )
        attempts = [streamed]
    elif kind == 4:
        calls = [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
        choices = [
            Choice(index=0, finish_reason="tool_calls", content=None, refusal="no", tool_calls=calls),
            Choice(index=1, finish_reason="stop", content="second"),
        ]
        u = Usage(prompt=9, completion=3, total=12, estimated=True)
        tools = attempt(
            i,
            n,
            completion=completion(i, choices=choices, u=u),
            usage=u,
            cost_note="no price for m",
            parsed='{"label": "x"}',
        )
        attempts = [tools]
    elif kind == 5:
        refused = attempt(
            i,
            n,
            http_status=404,
            outcome="stop_endpoint",
            error_class="model_not_found",
            error_message="nope",
        )
        attempts, state, error = [refused], "pending", "every endpoint refused"
    elif kind == 6:
        attempts, state, error = [], "pending", "budget cap reached"
    else:
        a = answered(i, n)
        a.started_at = START.replace(microsecond=0)
        attempts = [a]
    return Outcome(
        seq=i,
        custom_id=cid,
        state=state,
        attempts=attempts,
        error=error,
        record=record(i),
        prior_attempts=prior,
    )


def varied(n: int) -> list[Outcome]:
    return [outcome(i) for i in range(n)]


def again(outcomes: Sequence[Outcome]) -> list[Outcome]:
    """Answer the same requests once more, as a resumed session would (after their attempts)."""
    out = []
    for o in outcomes:
        prior = o.prior_attempts + len(o.attempts)
        a = answered(o.seq, prior + 1)
        out.append(
            Outcome(
                seq=o.seq,
                custom_id=o.custom_id,
                state="succeeded",
                attempts=[a],
                record=o.record,
                prior_attempts=prior,
            )
        )
    return out
