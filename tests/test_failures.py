"""One test per row of the failure classification table (``pipeline.policy.TABLE``), end to end.

Each test runs the real pipeline (``pipeline run`` in-process) over real HTTP on loopback
against the mock server, told to misbehave for one model (``MockConfig.model_faults``), into a
real SQLite file, and checks what the run did: its exit status, each request's state and the
route of its final attempt, how many requests the server received, and the recorded attempts
(outcome, error class, HTTP status, Retry-After seen, wait before the next attempt).

Rows and actions:

* transient (408, 409, 429, 5xx, connect error, read timeout, reset, body cut short, invalid
  JSON, ``finish_reason: "error"``): retried on the route; retries spent -> the next route;
* model-specific (404, context length, content filter): the next route at once;
* other 4xx (400, 422): the request fails after one attempt, the run goes on;
* 401 / 403 / 402 / 429 ``insufficient_quota``: the endpoint is stopped.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import as_datetime, default_db, dict_rows, plain_rows, query, write_jsonl

from pipeline.mock import MockServer, ModelFaults

PRIMARY = "mock-small"  # the model that misbehaves
FALLBACK = "mock-large"  # the next route of the chain, healthy unless said otherwise
SECRET = "sk-test-failures-NEVER-PRINT-0123456789"
DATE = -1.0  # expected Retry-After given as an HTTP date: whole seconds, so 0 < wait <= 2


def write_spec(
    workdir: Path,
    endpoints: dict[str, str],
    *,
    fallbacks: str = f'["{FALLBACK}"]',
    retry: dict[str, float] | None = None,
    extra: str = "",
) -> Path:
    """A job spec: PRIMARY on the first endpoint, then ``fallbacks``; fast backoff."""
    settings = {
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.05,
        "max_attempts_per_route": 3,
        "max_attempts_per_request": 10,
        "connect_timeout_s": 2,
        "read_timeout_s": 10,
        **(retry or {}),
    }
    tables = "".join(
        f'\n[endpoints.{name}]\nbase_url = "{url}"\napi_key_env = "PIPELINE_TEST_KEY"\n'
        for name, url in endpoints.items()
    )
    first = next(iter(endpoints))
    retry_lines = "".join(f"{k} = {v}\n" for k, v in settings.items())
    text = f"""
job = "failures"
model = {{ model = "{PRIMARY}", endpoint = "{first}" }}
fallbacks = {fallbacks}

[input]
path = "in.jsonl"
{tables}
[retry]
{retry_lines}
{extra}
"""
    path = workdir / "job.toml"
    path.write_text(text, encoding="utf-8")
    return path


def run(cli: Callable[..., Any], spec: Path, *more: str, key: str = SECRET) -> Any:
    return cli("run", spec, "--out", "out", "-q", *more, env={"PIPELINE_TEST_KEY": key})


def attempts_by_request() -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in dict_rows(default_db(), "SELECT * FROM attempt ORDER BY custom_id, attempt_no"):
        out.setdefault(r["custom_id"], []).append(r)
    return out


def requests() -> dict[str, tuple[str, int, str | None, str | None]]:
    """custom_id -> (state, attempts, endpoint and model of the final attempt)."""
    rows = query(
        default_db(),
        "SELECT r.custom_id, r.state, r.attempts, a.endpoint, a.model FROM request r "
        "LEFT JOIN attempt a ON a.run_id = r.run_id AND a.custom_id = r.custom_id "
        "AND a.attempt_no = r.final_attempt_no",
    )
    return {cid: (state, n, ep, model) for cid, state, n, ep, model in rows}


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def gap_s(earlier: dict[str, Any], later: dict[str, Any]) -> float:
    return (as_datetime(later["started_at"]) - as_datetime(earlier["started_at"])).total_seconds()


def check_wait(attempt: dict[str, Any], retry_after: float | None, route_attempt: int) -> None:
    """The recorded wait: the server's Retry-After when it sent one, else jittered backoff."""
    if retry_after is None:
        assert attempt["retry_after_s"] is None
        ceiling = min(0.05, 0.01 * 2 ** (route_attempt - 1))
        assert attempt["wait_s"] is not None and 0.0 <= attempt["wait_s"] <= ceiling
    elif retry_after == DATE:
        assert 0.0 < attempt["retry_after_s"] <= 2.0
        assert attempt["wait_s"] == pytest.approx(attempt["retry_after_s"])
    else:
        assert attempt["retry_after_s"] == pytest.approx(retry_after)
        assert attempt["wait_s"] == pytest.approx(retry_after)


# --------------------------------------------------------------------------- retried rows

#: (fault, error_class, http_status, Retry-After the attempt records, transient failures, [retry])
RETRIED = [
    pytest.param(dict(kind="status", status=408), "timeout_or_conflict", 408, None, 2, {}, id="408"),
    pytest.param(dict(kind="status", status=409), "timeout_or_conflict", 409, None, 2, {}, id="409"),
    pytest.param(
        dict(kind="status", status=429, retry_after_s=1.0, retry_after="seconds"),
        "rate_limited",
        429,
        1.0,
        1,
        {},
        id="429-retry-after-seconds",
    ),
    pytest.param(
        dict(kind="status", status=429, retry_after_s=1.0, retry_after="date"),
        "rate_limited",
        429,
        DATE,
        1,
        {},
        id="429-retry-after-http-date",
    ),
    pytest.param(
        dict(kind="status", status=429, retry_after_s=0.3, retry_after="ms"),
        "rate_limited",
        429,
        0.3,
        1,
        {},
        id="429-retry-after-ms",
    ),
    pytest.param(dict(kind="status", status=500), "server_error", 500, None, 2, {}, id="500"),
    pytest.param(dict(kind="status", status=502), "server_error", 502, None, 2, {}, id="502"),
    pytest.param(dict(kind="status", status=503), "server_error", 503, None, 2, {}, id="503"),
    pytest.param(dict(kind="status", status=504), "server_error", 504, None, 2, {}, id="504"),
    pytest.param(dict(kind="status", status=520, html=True), "server_error", 520, None, 2, {}, id="520-html"),
    pytest.param(dict(kind="status", status=529), "server_error", 529, None, 2, {}, id="529"),
    pytest.param(dict(kind="hang"), "transport", None, None, 1, {"read_timeout_s": 0.5}, id="read-timeout"),
    pytest.param(dict(kind="reset"), "transport", None, None, 2, {}, id="connection-reset"),
    pytest.param(dict(kind="truncated"), "transport", None, None, 2, {}, id="body-cut-short"),
    pytest.param(dict(kind="invalid_json"), "invalid_response", 200, None, 2, {}, id="invalid-json"),
    pytest.param(dict(kind="finish_error"), "finish_error", 200, None, 2, {}, id="finish-reason-error"),
]
N_REQUESTS = 3


@pytest.mark.parametrize(("fault", "error_class", "status", "retry_after", "failures", "retry"), RETRIED)
def test_transient_failure_is_retried_on_the_same_route_until_it_succeeds(
    workdir: Path,
    mock_server: Callable[..., MockServer],
    cli: Callable[..., Any],
    fault: dict[str, Any],
    error_class: str,
    status: int | None,
    retry_after: float | None,
    failures: int,
    retry: dict[str, float],
) -> None:
    """A transient failure is retried on its route (after Retry-After if given) and then succeeds."""
    server = mock_server(model_faults={PRIMARY: ModelFaults(first=failures, **fault)})
    write_jsonl(workdir / "in.jsonl", plain_rows(N_REQUESTS))
    r = run(cli, write_spec(workdir, {"default": server.base_url}, retry=retry))
    assert r.exit_code == 0, r.stderr
    assert set(requests().values()) == {("succeeded", failures + 1, "default", PRIMARY)}
    assert server.stats().by_model == {PRIMARY: N_REQUESTS * (failures + 1)}
    for rows in attempts_by_request().values():
        *failed, last = rows
        assert [(a["outcome"], a["error_class"], a["http_status"]) for a in failed] == [
            ("retry", error_class, status)
        ] * failures
        assert all(a["model"] == PRIMARY for a in rows)
        for i, a in enumerate(failed, start=1):
            check_wait(a, retry_after, i)
        if retry_after is not None:  # the wait really happened
            assert gap_s(failed[0], rows[1]) >= failed[0]["wait_s"] - 0.05
        assert (last["outcome"], last["error_class"], last["http_status"]) == ("success", None, 200)


@pytest.mark.parametrize(("fault", "error_class", "status", "retry_after", "failures", "retry"), RETRIED)
def test_permanent_transient_failure_spends_the_route_retries_then_takes_the_next_route(
    workdir: Path,
    mock_server: Callable[..., MockServer],
    cli: Callable[..., Any],
    fault: dict[str, Any],
    error_class: str,
    status: int | None,
    retry_after: float | None,
    failures: int,
    retry: dict[str, float],
) -> None:
    """A transient kind that never clears: max_attempts_per_route attempts, then the fallback answers."""
    server = mock_server(model_faults={PRIMARY: ModelFaults(**fault)})
    write_jsonl(workdir / "in.jsonl", plain_rows(N_REQUESTS))
    r = run(cli, write_spec(workdir, {"default": server.base_url}, retry=retry))
    assert r.exit_code == 0, r.stderr
    assert set(requests().values()) == {("succeeded", 4, "default", FALLBACK)}
    assert server.stats().by_model == {PRIMARY: 3 * N_REQUESTS, FALLBACK: N_REQUESTS}
    for rows in attempts_by_request().values():
        assert [(a["model"], a["outcome"], a["error_class"], a["http_status"]) for a in rows] == [
            (PRIMARY, "retry", error_class, status),
            (PRIMARY, "retry", error_class, status),
            (PRIMARY, "retries_spent", error_class, status),
            (FALLBACK, "success", None, 200),
        ]
        check_wait(rows[0], retry_after, 1)
        check_wait(rows[1], retry_after, 2)


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param(ModelFaults("status", status=503), id="backoff"),
        pytest.param(ModelFaults("status", status=429, retry_after_s=1.0), id="retry-after"),
    ],
)
def test_the_last_attempt_on_a_route_records_no_wait(
    workdir: Path, mock_server: Callable[..., MockServer], cli: Callable[..., Any], fault: ModelFaults
) -> None:
    """Retries spent: the next route is tried at once, and the route's last attempt records no wait."""
    server = mock_server(model_faults={PRIMARY: fault})
    write_jsonl(workdir / "in.jsonl", plain_rows(1))
    r = run(cli, write_spec(workdir, {"default": server.base_url}))
    assert r.exit_code == 0, r.stderr
    rows = attempts_by_request()["q-0"]
    assert [(a["model"], a["outcome"]) for a in rows] == [
        (PRIMARY, "retry"),
        (PRIMARY, "retry"),
        (PRIMARY, "retries_spent"),
        (FALLBACK, "success"),
    ]
    assert gap_s(rows[2], rows[3]) < 0.5  # no wait happened between the routes ...
    assert rows[2]["wait_s"] is None  # ... so none is recorded


@pytest.mark.parametrize("with_fallback", [False, True], ids=["no-fallback", "fallback-endpoint"])
def test_connect_error_is_retried_then_the_next_route_or_failed(
    workdir: Path, mock_server: Callable[..., MockServer], cli: Callable[..., Any], with_fallback: bool
) -> None:
    """Nobody listening: retried on the route, then the next route; with none left, failed (exit 1)."""
    backup = mock_server()
    endpoints = {"dead": f"http://127.0.0.1:{closed_port()}/v1"}
    fallbacks = "[]"
    if with_fallback:
        endpoints["backup"] = backup.base_url
        fallbacks = f'[{{ model = "{FALLBACK}", endpoint = "backup" }}]'
    write_jsonl(workdir / "in.jsonl", plain_rows(N_REQUESTS))
    r = run(cli, write_spec(workdir, endpoints, fallbacks=fallbacks))
    if with_fallback:
        assert r.exit_code == 0, r.stderr
        assert set(requests().values()) == {("succeeded", 4, "backup", FALLBACK)}
        assert backup.stats().by_model == {FALLBACK: N_REQUESTS}
    else:
        assert r.exit_code == 1, r.stderr
        assert set(requests().values()) == {("failed", 3, "dead", PRIMARY)}
        assert backup.stats().requests_total == 0
    for rows in attempts_by_request().values():
        dead = rows[:3]
        assert [(a["endpoint"], a["outcome"], a["error_class"], a["http_status"]) for a in dead] == [
            ("dead", "retry", "transport", None),
            ("dead", "retry", "transport", None),
            ("dead", "retries_spent", "transport", None),
        ]
        check_wait(dead[0], None, 1)
        check_wait(dead[1], None, 2)
        assert len(rows) == (4 if with_fallback else 3)


# --------------------------------------------------------------------------- next route at once

MODEL_SPECIFIC = [
    pytest.param(dict(kind="status", status=404), "model_not_found", 404, id="404-model-not-found"),
    pytest.param(dict(kind="context_length"), "context_length", 400, id="context-length-exceeded"),
    pytest.param(dict(kind="content_filter_400"), "content_filter", 400, id="content-filter-400"),
    pytest.param(dict(kind="content_filter_finish"), "content_filter", 200, id="content-filter-finish"),
]


@pytest.mark.parametrize(("fault", "error_class", "status"), MODEL_SPECIFIC)
def test_model_specific_failure_moves_to_the_next_route_at_once(
    workdir: Path,
    mock_server: Callable[..., MockServer],
    cli: Callable[..., Any],
    fault: dict[str, Any],
    error_class: str,
    status: int,
) -> None:
    """Model not found, context too long, content filter: one attempt, then the next route."""
    server = mock_server(model_faults={PRIMARY: ModelFaults(**fault)})
    write_jsonl(workdir / "in.jsonl", plain_rows(N_REQUESTS))
    r = run(cli, write_spec(workdir, {"default": server.base_url}))
    assert r.exit_code == 0, r.stderr
    assert set(requests().values()) == {("succeeded", 2, "default", FALLBACK)}
    assert server.stats().by_model == {PRIMARY: N_REQUESTS, FALLBACK: N_REQUESTS}
    for rows in attempts_by_request().values():
        assert [(a["model"], a["outcome"], a["error_class"], a["http_status"]) for a in rows] == [
            (PRIMARY, "fallback", error_class, status),
            (FALLBACK, "success", None, 200),
        ]
        assert rows[0]["wait_s"] is None and rows[0]["retry_after_s"] is None


@pytest.mark.parametrize(("fault", "error_class", "status"), MODEL_SPECIFIC[2:])
def test_content_filter_fails_the_request_when_the_policy_says_fail(
    workdir: Path,
    mock_server: Callable[..., MockServer],
    cli: Callable[..., Any],
    fault: dict[str, Any],
    error_class: str,
    status: int,
) -> None:
    """With [policy] content_filter = "fail", a filtered request fails after its one attempt."""
    server = mock_server(model_faults={PRIMARY: ModelFaults(**fault)})
    write_jsonl(workdir / "in.jsonl", plain_rows(N_REQUESTS))
    spec = write_spec(workdir, {"default": server.base_url}, extra='[policy]\ncontent_filter = "fail"\n')
    r = run(cli, spec)
    assert r.exit_code == 1, r.stderr
    assert set(requests().values()) == {("failed", 1, "default", PRIMARY)}
    assert server.stats().by_model == {PRIMARY: N_REQUESTS}
    for rows in attempts_by_request().values():
        assert [(a["outcome"], a["error_class"], a["http_status"]) for a in rows] == [
            ("fail", error_class, status)
        ]


# --------------------------------------------------------------------------- the request fails


@pytest.mark.parametrize("status", [400, 422])
def test_other_4xx_fails_only_that_request_after_one_attempt(
    workdir: Path, mock_server: Callable[..., MockServer], cli: Callable[..., Any], status: int
) -> None:
    """A 400 / 422 fails its request at once (no retry, no fallback); the others succeed; exit 1."""
    fault = ModelFaults("bad_request", status=status, match="POISON")
    server = mock_server(model_faults={PRIMARY: fault})
    rows = plain_rows(5)
    rows[2]["messages"][0]["content"] = "POISON row"
    write_jsonl(workdir / "in.jsonl", rows)
    r = run(cli, write_spec(workdir, {"default": server.base_url}))
    assert r.exit_code == 1, r.stderr
    states = requests()
    assert states.pop("q-2") == ("failed", 1, "default", PRIMARY)
    assert set(states.values()) == {("succeeded", 1, "default", PRIMARY)}
    assert server.stats().by_model == {PRIMARY: 5}
    [bad] = attempts_by_request()["q-2"]
    assert (bad["outcome"], bad["error_class"], bad["http_status"], bad["wait_s"]) == (
        "fail",
        "bad_request",
        status,
        None,
    )


# --------------------------------------------------------------------------- the endpoint stops

STOPS = [
    pytest.param(None, "auth", 401, 2, id="401-wrong-key"),
    pytest.param(ModelFaults("unauthorized", status=403), "auth", 403, 2, id="403"),
    pytest.param(ModelFaults("insufficient_quota", status=402), "quota", 402, 1, id="402-no-credits"),
    pytest.param(ModelFaults("insufficient_quota"), "quota", 429, 1, id="429-insufficient-quota"),
]
MANY = 50
CONCURRENCY = 4


def check_stop_message(stderr: str, status: int) -> None:
    """One line (beside the run's progress log lines) says which endpoint stopped us and why."""
    assert "Traceback" not in stderr
    about = [line for line in stderr.splitlines() if "endpoint" in line or f"HTTP {status}" in line]
    assert len(about) == 1, stderr
    assert "endpoint default" in about[0] and f"HTTP {status}" in about[0]


def refusing_server(mock_server: Callable[..., MockServer], fault: ModelFaults | None) -> MockServer:
    """A server that refuses us: a different key (401), or the fault for PRIMARY and FALLBACK."""
    if fault is None:
        return mock_server(api_key="sk-the-right-key")
    return mock_server(model_faults={PRIMARY: fault, FALLBACK: fault})


@pytest.mark.parametrize(
    "fallbacks",
    ["[]", f'["{FALLBACK}"]'],
    ids=["no-fallback", "fallback-on-the-same-endpoint"],
)
@pytest.mark.parametrize(("fault", "error_class", "status", "exit_code"), STOPS)
def test_refusal_stops_the_endpoint_after_the_first_failure_and_leaves_requests_pending(
    workdir: Path,
    mock_server: Callable[..., MockServer],
    cli: Callable[..., Any],
    fault: ModelFaults | None,
    error_class: str,
    status: int,
    exit_code: int,
    fallbacks: str,
) -> None:
    """401/403 (exit 2), 402 and insufficient_quota (exit 1): the endpoint stops, nothing is retried."""
    server = refusing_server(mock_server, fault)
    write_jsonl(workdir / "in.jsonl", plain_rows(MANY))
    spec = write_spec(
        workdir,
        {"default": server.base_url},
        fallbacks=fallbacks,
        extra=f"[limits]\nconcurrency = {CONCURRENCY}\n",
    )
    r = run(cli, spec)
    assert r.exit_code == exit_code, r.stderr
    # At most the requests already in flight when the first refusal came back.
    assert 1 <= server.stats().requests_total <= CONCURRENCY
    check_stop_message(r.stderr, status)
    assert SECRET not in r.stderr + r.stdout
    assert {state for state, *_ in requests().values()} == {"pending"}
    tried = attempts_by_request()
    assert 1 <= len(tried) <= CONCURRENCY
    for rows in tried.values():
        assert [(a["outcome"], a["error_class"], a["http_status"], a["wait_s"]) for a in rows] == [
            ("stop_endpoint", error_class, status, None)
        ]
        assert rows[0]["model"] == PRIMARY and rows[0]["retry_after_s"] is None


def test_wrong_key_run_resumes_every_request_once_the_key_is_fixed(
    workdir: Path, mock_server: Callable[..., MockServer], cli: Callable[..., Any]
) -> None:
    """After a 401 stop, rerunning with the right key sends every request and finishes (exit 0)."""
    server = mock_server(api_key="sk-the-right-key")
    write_jsonl(workdir / "in.jsonl", plain_rows(MANY))
    spec = write_spec(workdir, {"default": server.base_url}, extra=f"[limits]\nconcurrency = {CONCURRENCY}\n")
    assert run(cli, spec).exit_code == 2
    refused = server.stats().requests_total
    again = run(cli, spec, key="sk-the-right-key")
    assert again.exit_code == 0, again.stderr
    assert server.stats().by_status == {401: refused, 200: MANY}
    assert {state for state, *_ in requests().values()} == {"succeeded"}


@pytest.mark.parametrize(("fault", "error_class", "status", "exit_code"), STOPS)
def test_refusal_sends_the_requests_to_the_fallback_endpoint(
    workdir: Path,
    mock_server: Callable[..., MockServer],
    cli: Callable[..., Any],
    fault: ModelFaults | None,
    error_class: str,
    status: int,
    exit_code: int,
) -> None:
    """When one endpoint stops, the requests flow to the fallback on a second endpoint."""
    server = refusing_server(mock_server, fault)
    backup = mock_server()
    write_jsonl(workdir / "in.jsonl", plain_rows(MANY))
    spec = write_spec(
        workdir,
        {"default": server.base_url, "backup": backup.base_url},
        fallbacks=f'[{{ model = "{FALLBACK}", endpoint = "backup" }}]',
        extra=f"[limits]\nconcurrency = {CONCURRENCY}\n",
    )
    r = run(cli, spec)
    assert r.exit_code == 0, r.stderr
    assert 1 <= server.stats().requests_total <= CONCURRENCY
    assert backup.stats().by_status == {200: MANY}
    assert {(s, ep, m) for s, _, ep, m in requests().values()} == {("succeeded", "backup", FALLBACK)}
    for rows in attempts_by_request().values():
        *refused, last = rows
        assert [(a["endpoint"], a["outcome"], a["error_class"], a["http_status"]) for a in refused] in (
            [],
            [("default", "stop_endpoint", error_class, status)],
        )
        assert (last["endpoint"], last["outcome"]) == ("backup", "success")


# --------------------------------------------------------------------------- attempt caps


def test_max_attempts_per_request_bounds_attempts_across_routes(
    workdir: Path, mock_server: Callable[..., MockServer], cli: Callable[..., Any]
) -> None:
    """Both routes failing: 3 attempts on the first, then 1 on the next, when the request's cap is 4."""
    always = ModelFaults("status", status=503)
    server = mock_server(model_faults={PRIMARY: always, FALLBACK: always})
    write_jsonl(workdir / "in.jsonl", plain_rows(N_REQUESTS))
    spec = write_spec(workdir, {"default": server.base_url}, retry={"max_attempts_per_request": 4})
    r = run(cli, spec)
    assert r.exit_code == 1, r.stderr
    assert set(requests().values()) == {("failed", 4, "default", FALLBACK)}
    assert server.stats().by_model == {PRIMARY: 3 * N_REQUESTS, FALLBACK: N_REQUESTS}
    for rows in attempts_by_request().values():
        assert [(a["model"], a["outcome"]) for a in rows] == [
            (PRIMARY, "retry"),
            (PRIMARY, "retry"),
            (PRIMARY, "retries_spent"),
            (FALLBACK, "retries_spent"),
        ]


def test_every_route_spent_leaves_the_request_failed_after_each_routes_retries(
    workdir: Path, mock_server: Callable[..., MockServer], cli: Callable[..., Any]
) -> None:
    """Both routes failing, caps not reached: max_attempts_per_route on each, then failed (exit 1)."""
    always = ModelFaults("status", status=500)
    server = mock_server(model_faults={PRIMARY: always, FALLBACK: always})
    write_jsonl(workdir / "in.jsonl", plain_rows(N_REQUESTS))
    r = run(cli, write_spec(workdir, {"default": server.base_url}, retry={"max_attempts_per_route": 2}))
    assert r.exit_code == 1, r.stderr
    assert set(requests().values()) == {("failed", 4, "default", FALLBACK)}
    assert server.stats().by_model == {PRIMARY: 2 * N_REQUESTS, FALLBACK: 2 * N_REQUESTS}
    for rows in attempts_by_request().values():
        assert [(a["model"], a["outcome"], a["http_status"]) for a in rows] == [
            (PRIMARY, "retry", 500),
            (PRIMARY, "retries_spent", 500),
            (FALLBACK, "retry", 500),
            (FALLBACK, "retries_spent", 500),
        ]


def test_a_request_past_its_deadline_fails_and_the_same_worker_answers_the_next(
    workdir: Path, mock_server: Callable[..., MockServer], cli: Callable[..., Any]
) -> None:
    """deadline_s = 1 and the first answer never comes (read timeout 30 s): that request fails
    at its deadline, its attempt marked so, and the one worker (concurrency 1) goes on to answer
    the other two: a deadline ends a request, not the worker that carried it. (No fallback
    route: a second route's concurrency would add a second worker.)"""
    server = mock_server(model_faults={PRIMARY: ModelFaults("hang", match="Question number 0?")})
    write_jsonl(workdir / "in.jsonl", plain_rows(N_REQUESTS))
    spec = write_spec(
        workdir,
        {"default": server.base_url},
        fallbacks="[]",
        retry={"deadline_s": 1, "read_timeout_s": 30},
        extra="[limits]\nconcurrency = 1\n",
    )
    started = time.monotonic()
    r = run(cli, spec)
    elapsed = time.monotonic() - started
    assert r.exit_code == 1, r.stderr
    assert requests() == {
        "q-0": ("failed", 1, "default", PRIMARY),
        "q-1": ("succeeded", 1, "default", PRIMARY),
        "q-2": ("succeeded", 1, "default", PRIMARY),
    }
    (timed_out,) = attempts_by_request()["q-0"]
    assert (timed_out["outcome"], timed_out["error_class"]) == ("deadline", "deadline")
    (error,) = query(default_db(), "SELECT error FROM request WHERE custom_id = 'q-0'")[0]
    assert error == "deadline of 1s exceeded"
    assert 1.0 <= elapsed < 10.0
