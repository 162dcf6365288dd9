"""End to end: `pipeline run` over real HTTP on loopback to the mock server, into a real
SQLite file and real Parquet files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import (
    as_datetime,
    default_db,
    dict_rows,
    every_row_as_text,
    plain_rows,
    query,
    spec_file,
    untouched,
    write_jsonl,
)

from pipeline.mock import MockServer


def run_args(db: str, server: MockServer, *more: str, model: str = "mock-small") -> list[str]:
    return [
        "run",
        "--input",
        "in.jsonl",
        "--base-url",
        server.base_url,
        "--model",
        model,
        "--db",
        db,
        "--out",
        "out",
        "-q",
        *more,
    ]


def results(workdir: Path, job: str, run_id: str | None = None) -> pa.Table:
    return pq.read_table(workdir / "out" / job / (run_id or job) / "results.parquet")


def attempts(db: str, custom_id: str) -> list[dict[str, Any]]:
    return dict_rows(db, "SELECT * FROM attempt WHERE custom_id = ? ORDER BY attempt_no", custom_id)


def test_all_requests_succeed_and_parquet_holds_the_same_rows(
    workdir: Path, db: str, mock_server: Callable[..., MockServer], cli: Callable[..., Any]
) -> None:
    """Every row gets one succeeded request in SQLite, and Parquet holds the same rows."""
    server = mock_server(latency_ms=5)
    write_jsonl(workdir / "in.jsonl", plain_rows(40))
    r = cli(*run_args(db, server))
    assert r.exit_code == 0, r.stderr
    assert query(db, "SELECT state, COUNT(*) FROM request GROUP BY state") == [("succeeded", 40)]
    assert query(db, "SELECT COUNT(*) FROM attempt WHERE outcome = 'success'") == [(40,)]
    table = results(workdir, "in").to_pylist()
    assert [row["custom_id"] for row in table] == [f"q-{i}" for i in range(40)]
    stored = dict(query(db, "SELECT custom_id, content FROM completion"))
    assert {row["custom_id"]: row["content"] for row in table} == stored
    # No price is known for mock-small without a spec: the cost is NULL, never a silent 0.
    assert all(row["prompt_tokens"] > 0 and row["cost_usd"] is None for row in table)
    assert server.stats().completions == 40
    assert list((workdir / "out").rglob("*.parquet")) == [workdir / "out" / "in" / "in" / "results.parquet"]


def test_429_with_retry_after_is_waited_out_then_succeeds(
    workdir: Path, db: str, mock_server: Callable[..., MockServer], cli: Callable[..., Any]
) -> None:
    """A 429 with Retry-After: 1 is retried on the same route after at least one second."""
    server = mock_server(fail_first=1, fail_status=429, retry_after_s=1.0)
    write_jsonl(workdir / "in.jsonl", plain_rows(3))
    r = cli(*run_args(db, server))
    assert r.exit_code == 0, r.stderr
    for i in range(3):
        first, second = attempts(db, f"q-{i}")
        assert (first["http_status"], first["outcome"], first["error_class"]) == (
            429,
            "retry",
            "rate_limited",
        )
        assert first["retry_after_s"] == 1.0 and first["wait_s"] == 1.0
        assert (second["http_status"], second["outcome"]) == (200, "success")
        gap = as_datetime(second["started_at"]) - as_datetime(first["started_at"])
        assert gap.total_seconds() >= 0.95
    assert server.stats().by_status == {429: 3, 200: 3}


def test_500_is_retried_then_succeeds(
    workdir: Path, db: str, mock_server: Callable[..., MockServer], cli: Callable[..., Any]
) -> None:
    """A 500 is retried on the same route and the second attempt succeeds."""
    server = mock_server(fail_first=1, fail_status=500)
    write_jsonl(workdir / "in.jsonl", plain_rows(4))
    spec = spec_file(workdir / "job.toml", server.base_url)
    r = cli("run", spec, "--db", db, "--out", "out", "-q")
    assert r.exit_code == 0, r.stderr
    first, second = attempts(db, "q-2")
    assert (first["http_status"], first["error_class"], first["outcome"]) == (
        500,
        "server_error",
        "retry",
    )
    assert second["outcome"] == "success" and second["model"] == "mock-small"
    assert query(db, "SELECT COUNT(*) FROM request WHERE state = 'succeeded'") == [(4,)]


def test_unknown_primary_model_falls_back_to_the_next_with_both_attempts_recorded(
    workdir: Path, db: str, mock_server: Callable[..., MockServer], cli: Callable[..., Any]
) -> None:
    """A 404 model_not_found moves straight to the fallback model; both attempts are kept."""
    server = mock_server()
    write_jsonl(workdir / "in.jsonl", plain_rows(5))
    r = cli(*run_args(db, server, "--fallback", "mock-large", model="no-such-model"))
    assert r.exit_code == 0, r.stderr
    for i in range(5):
        first, second = attempts(db, f"q-{i}")
        assert (first["model"], first["http_status"], first["outcome"], first["error_class"]) == (
            "no-such-model",
            404,
            "fallback",
            "model_not_found",
        )
        assert (second["model"], second["outcome"]) == ("mock-large", "success")
    assert server.stats().by_model == {"no-such-model": 5, "mock-large": 5}
    assert set(results(workdir, "in").column("model").to_pylist()) == {"mock-large"}


def test_retries_spent_leave_the_request_failed_and_recorded_with_exit_1(
    workdir: Path, db: str, mock_server: Callable[..., MockServer], cli: Callable[..., Any]
) -> None:
    """When every retry fails, the request is recorded failed, the run goes on, exit status 1."""
    server = mock_server(fail_first=1000, fail_status=503)
    write_jsonl(workdir / "in.jsonl", plain_rows(3))
    spec = spec_file(workdir / "job.toml", server.base_url)
    r = cli("run", spec, "--db", db, "--out", "out", "-q")
    assert r.exit_code == 1
    assert query(db, "SELECT state, attempts FROM request") == [("failed", 3)] * 3
    rows = attempts(db, "q-0")
    assert [a["outcome"] for a in rows] == ["retry", "retry", "retries_spent"]
    assert all(a["http_status"] == 503 for a in rows)
    table = results(workdir, "t").to_pylist()
    assert [(t["state"], t["attempts"]) for t in table] == [("failed", 3)] * 3
    assert "503" in table[0]["error"]
    assert server.stats().requests_total == 9


def test_malformed_line_3_exits_2_naming_it_and_sends_nothing(
    workdir: Path, db: str, mock_server: Callable[..., MockServer], cli: Callable[..., Any]
) -> None:
    """A malformed JSON line stops the run before anything is sent, with one clear line."""
    server = mock_server()
    lines = [orjson.dumps(r).decode() for r in plain_rows(4)]
    lines[2] = '{"custom_id": "q-2", "messages": [}'
    (workdir / "in.jsonl").write_text("\n".join(lines) + "\n")
    r = cli(*run_args(db, server))
    assert r.exit_code == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "in.jsonl: line 3" in err[0] and "malformed JSON" in err[0]
    assert "Traceback" not in r.stderr + r.stdout
    assert server.stats().requests_total == 0
    assert query(db, "SELECT state FROM run") == [("rejected",)]
    assert query(db, "SELECT COUNT(*) FROM request") == [(0,)]


def test_rerunning_a_finished_run_sends_nothing(
    workdir: Path, db: str, mock_server: Callable[..., MockServer], cli: Callable[..., Any]
) -> None:
    """The same command twice: the second finds every request done and sends none."""
    server = mock_server()
    write_jsonl(workdir / "in.jsonl", plain_rows(10))
    assert cli(*run_args(db, server)).exit_code == 0
    assert server.stats().requests_total == 10
    again = cli(*run_args(db, server))
    assert again.exit_code == 0, again.stderr
    assert server.stats().requests_total == 10
    assert results(workdir, "in").num_rows == 10


def test_changed_input_under_the_same_run_is_refused(
    workdir: Path, db: str, mock_server: Callable[..., MockServer], cli: Callable[..., Any]
) -> None:
    """A resumed run whose input changed stops with a clear message and exit 2."""
    server = mock_server()
    write_jsonl(workdir / "in.jsonl", plain_rows(3))
    assert cli(*run_args(db, server)).exit_code == 0
    write_jsonl(workdir / "in.jsonl", plain_rows(4))
    r = cli(*run_args(db, server))
    assert r.exit_code == 2
    assert "input changed" in r.stderr and "--new-run" in r.stderr
    assert "line 4: request 'q-3' is new" in r.stderr
    rows = plain_rows(3)
    rows[1]["temperature"] = 0.5
    write_jsonl(workdir / "in.jsonl", rows)
    r = cli(*run_args(db, server))
    assert r.exit_code == 2 and "line 2: the body of request 'q-1' changed" in r.stderr
    write_jsonl(workdir / "in.jsonl", plain_rows(4))
    fresh = cli(*run_args(db, server, "--new-run"))
    assert fresh.exit_code == 0, fresh.stderr
    assert server.stats().requests_total == 7


def test_export_writes_openai_batch_output_lines(
    workdir: Path, db: str, mock_server: Callable[..., MockServer], cli: Callable[..., Any]
) -> None:
    """`pipeline export RUN --format jsonl` writes one batch-output line per request."""
    server = mock_server(fail_first=1000, fail_status=400)
    rows = plain_rows(2)
    write_jsonl(workdir / "in.jsonl", rows)
    assert cli(*run_args(db, server)).exit_code == 1  # 400 fails the request
    server2 = mock_server()
    assert cli(*run_args(db, server2, "--new-run", "--run-id", "ok")).exit_code == 0
    r = cli("export", "ok", "--db", db, "--format", "jsonl", "-o", "ok.jsonl")
    assert r.exit_code == 0, r.stderr
    lines = [orjson.loads(x) for x in (workdir / "ok.jsonl").read_bytes().splitlines()]
    assert [x["custom_id"] for x in lines] == ["q-0", "q-1"]
    for x in lines:
        assert set(x) == {"id", "custom_id", "response", "error", "billing"}
        assert x["billing"]["attempts"] == 1 and x["billing"]["prompt_tokens"] > 0
        assert x["error"] is None and x["response"]["status_code"] == 200
        assert x["response"]["request_id"].startswith("req_")
        assert x["response"]["body"]["object"] == "chat.completion"
    failed = cli("export", "in", "--db", db, "-o", "failed.jsonl")
    assert failed.exit_code == 0
    line = orjson.loads((workdir / "failed.jsonl").read_bytes().splitlines()[0])
    assert line["response"]["status_code"] == 400 and line["error"]["code"] == "bad_request"


def test_status_reports_counts_tokens_and_cost(
    workdir: Path, db: str, mock_server: Callable[..., MockServer], cli: Callable[..., Any]
) -> None:
    """`pipeline status --json` gives counts by state, tokens and the computed cost."""
    server = mock_server()
    write_jsonl(workdir / "in.jsonl", plain_rows(6))
    spec = spec_file(workdir / "job.toml", server.base_url)
    assert cli("run", spec, "--db", db, "--out", "out", "-q").exit_code == 0
    r = cli("status", "--db", db, "--json")
    assert r.exit_code == 0, r.stderr
    info = orjson.loads(r.stdout)
    assert info["run_id"] == "t" and info["state"] == "completed"
    assert info["counts"] == {"pending": 0, "in_flight": 0, "succeeded": 6, "failed": 0, "rejected": 0}
    prompt, completion = query(db, "SELECT SUM(prompt_tokens), SUM(completion_tokens) FROM attempt")[0]
    assert (info["prompt_tokens"], info["completion_tokens"]) == (prompt, completion)
    # 0.15 and 0.60 USD per million tokens, exactly.
    expected = (prompt * 15 + completion * 60) / 100_000_000
    assert abs(float(info["cost_usd"]) - expected) < 1e-15
    text = cli("status", "t", "--db", db)
    assert "6 succeeded" in text.stdout


def test_template_rows_keep_their_columns_in_the_output(
    workdir: Path, db: str, mock_server: Callable[..., MockServer], cli: Callable[..., Any]
) -> None:
    """Data records + a template: the output holds the record's columns then the answer."""
    server = mock_server()
    write_jsonl(workdir / "in.jsonl", [{"id": f"r{i}", "text": f"text {i}", "n": i} for i in range(5)])
    spec = spec_file(
        workdir / "job.toml",
        server.base_url,
        extra='\n[template]\nmessages = [{ role = "user", content = "Label: {text}" }]\n',
    )
    spec.write_text(spec.read_text().replace('path = "in.jsonl"', 'path = "in.jsonl"\nid_column = "id"'))
    r = cli("run", spec, "--db", db, "--out", "out", "-q")
    assert r.exit_code == 0, r.stderr
    table = results(workdir, "t")
    assert table.column_names[:3] == ["id", "text", "n"]
    assert table.column("custom_id").to_pylist() == [f"r{i}" for i in range(5)]
    assert table.column("n").type == pa.int64()
    sql = "SELECT i.body FROM request_input i JOIN request r USING (run_id, seq) WHERE custom_id = 'r3'"
    body = orjson.loads(query(db, sql)[0][0])
    assert body["messages"] == [{"role": "user", "content": "Label: text 3"}]


def test_parquet_input_in_batch_api_shape_runs(
    workdir: Path, db: str, mock_server: Callable[..., MockServer], cli: Callable[..., Any]
) -> None:
    """A Parquet input of OpenAI Batch API rows is streamed and answered."""
    server = mock_server()
    rows = [
        {
            "custom_id": f"b{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "mock-small",
                "messages": [{"role": "user", "content": f"hi {i}"}],
                "max_tokens": 8,
            },
        }
        for i in range(7)
    ]
    pq.write_table(pa.Table.from_pylist(rows), workdir / "in.parquet")
    r = cli(
        "run",
        "--input",
        "in.parquet",
        "--base-url",
        server.base_url,
        "--model",
        "mock-small",
        "--db",
        db,
        "--out",
        "out",
        "-q",
    )
    assert r.exit_code == 0, r.stderr
    assert query(db, "SELECT COUNT(*) FROM request WHERE state = 'succeeded'") == [(7,)]
    assert results(workdir, "in").column("custom_id").to_pylist() == [f"b{i}" for i in range(7)]


@pytest.mark.parametrize(
    ("rows", "args", "expected"),
    [
        pytest.param(
            [{"custom_id": "a", "messages": [{"role": "user", "content": "x"}]}] * 2,
            [],
            "line 2: field 'custom_id': duplicate custom_id 'a'",
            id="duplicate-custom-id",
        ),
        pytest.param([{"custom_id": "a"}], [], "line 1: field 'messages': missing", id="no-messages"),
        pytest.param(
            [{"messages": [{"role": "user", "content": "x"}], "max_tokens": "10"}],
            [],
            "line 1: field 'max_tokens': expected int",
            id="wrong-type",
        ),
        pytest.param(
            [{"messages": [{"role": "user", "content": "x"}], "model": "gpt-9"}],
            [],
            "line 1: field 'model': unknown model 'gpt-9'",
            id="unknown-model",
        ),
        pytest.param(
            plain_rows(1),
            ["--run-id", "../escape"],
            "run_id: '../escape' is not a safe file name",
            id="unsafe-run-id",
        ),
        pytest.param(plain_rows(1), ["--job", "a/b"], "job: 'a/b' is not a safe file name", id="unsafe-job"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_sends_nothing(
    workdir: Path,
    db: str,
    mock_server: Callable[..., MockServer],
    cli: Callable[..., Any],
    rows: list[Any],
    args: list[str],
    expected: str,
) -> None:
    """Bad rows and bad flags: one line naming the place, exit 2, no request sent."""
    server = mock_server()
    write_jsonl(workdir / "in.jsonl", rows)
    r = cli(*run_args(db, server, *args))
    assert r.exit_code == 2
    assert expected in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert server.stats().requests_total == 0


def test_unknown_field_in_spec_and_missing_input_are_one_line_errors(
    workdir: Path, cli: Callable[..., Any]
) -> None:
    """A spec with an unknown field, or a missing input file, exits 2 naming the field."""
    write_jsonl(workdir / "in.jsonl", plain_rows(1))
    spec = spec_file(workdir / "job.toml", "http://127.0.0.1:9/v1")
    spec.write_text("colour = 'blue'\n" + spec.read_text())
    r = cli("run", spec)
    assert r.exit_code == 2 and "job.toml: colour: unknown field" in r.stderr
    r = cli("run", "--input", "nope.jsonl", "--base-url", "http://127.0.0.1:9/v1", "--model", "m")
    assert r.exit_code == 2 and "input.path: input file not found: nope.jsonl" in r.stderr
    assert untouched(default_db())


def test_missing_api_key_for_a_remote_endpoint_stops_before_anything(
    workdir: Path, cli: Callable[..., Any]
) -> None:
    """A remote endpoint needs its key variable; the error names it and nothing is written."""
    write_jsonl(workdir / "in.jsonl", plain_rows(1))
    r = cli(
        "run",
        "--input",
        "in.jsonl",
        "--base-url",
        "https://api.example.com/v1",
        "--model",
        "gpt-4o-mini",
        "--api-key-env",
        "PIPELINE_TEST_KEY",
    )
    assert r.exit_code == 2
    assert "PIPELINE_TEST_KEY is not set" in r.stderr
    assert untouched(default_db())


def test_api_key_is_sent_but_never_stored(
    workdir: Path, db: str, mock_server: Callable[..., MockServer], cli: Callable[..., Any]
) -> None:
    """The key from the named variable authenticates; it is in no file the run writes."""
    secret = "sk-test-DO-NOT-STORE-1234567890"
    server = mock_server(api_key=secret)
    write_jsonl(workdir / "in.jsonl", plain_rows(3))
    r = cli(*run_args(db, server, "--api-key-env", "PIPELINE_TEST_KEY"), env={"PIPELINE_TEST_KEY": secret})
    assert r.exit_code == 0, r.stderr
    assert secret not in r.stdout + r.stderr
    for f in workdir.rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f
    assert secret not in every_row_as_text(db)


def test_budget_cap_stops_dispatch_with_exit_3_and_a_larger_budget_finishes(
    workdir: Path, db: str, mock_server: Callable[..., MockServer], cli: Callable[..., Any]
) -> None:
    """A budget for part of the input: exit 3 under the cap; a larger one finishes, none sent twice."""
    server = mock_server()
    rows = [
        {"custom_id": f"q-{i}", "messages": [{"role": "user", "content": "word " * 40}], "max_tokens": 20}
        for i in range(20)
    ]
    write_jsonl(workdir / "in.jsonl", rows)
    spec = spec_file(workdir / "job.toml", server.base_url)
    # Worst case per request: about (65 * 1.25 + 16) prompt tokens at 0.15 and 20 at 0.60 per million.
    r = cli("run", spec, "--db", db, "--out", "out", "-q", "--budget-usd", "0.0002", "--concurrency", "2")
    assert r.exit_code == 3, r.stderr
    assert "budget cap" in r.stderr and "--budget-usd" in r.stderr
    spent = query(db, "SELECT SUM(cost_picousd) FROM attempt")[0][0]
    assert 0 < spent <= 200_000_000  # picodollars: never over the cap
    done = query(db, "SELECT COUNT(*) FROM request WHERE state = 'succeeded'")[0][0]
    assert 5 <= done < 20
    r = cli("run", spec, "--db", db, "--out", "out", "-q", "--budget-usd", "1")
    assert r.exit_code == 0, r.stderr
    assert server.stats().requests_total == 20
    assert query(db, "SELECT COUNT(*) FROM attempt") == [(20,)]


def test_the_end_of_a_session_consolidates_its_parts_into_the_database_rebuild(
    workdir: Path,
    db: str,
    mock_server: Callable[..., MockServer],
    cli: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run with failures, then a --retry-failed session: each ends with results.parquet made
    from its parts and the earlier results, and the file is the one the database rebuild writes.
    The database is read for results.parquet once per session: when it starts (alone on the run,
    SQLite) or when the run is done (workers, PostgreSQL)."""
    import anyio

    from pipeline import run as run_module
    from pipeline.outputs import write_parquet
    from pipeline.spec import db_url
    from pipeline.store import Store

    rebuilds: list[Path] = []
    rebuild = run_module.write_results

    async def counted(pages: Any, path: Path, **kwargs: Any) -> int:
        rebuilds.append(path)
        return await rebuild(pages, path, **kwargs)

    monkeypatch.setattr(run_module, "write_results", counted)

    async def reference() -> pa.Table:
        store = await Store.open(db_url(db), migrate=False)
        try:
            states = ("succeeded", "failed", "rejected")
            await write_parquet(store.iter_results("t", states=states), workdir / "ref.parquet")
        finally:
            await store.close()
        return pq.read_table(workdir / "ref.parquet")

    write_jsonl(workdir / "in.jsonl", plain_rows(60))
    flaky = mock_server(rate_500=0.7, seed=3)
    no_breaker = "[breaker]\nenabled = false"
    spec_file(workdir / "t.toml", flaky.base_url, extra=no_breaker)
    first = cli("run", "t.toml", "--db", db, "--out", "out", "-q")
    assert first.exit_code == 1, first.stderr  # some ended failed
    failed = query(db, "SELECT COUNT(*) FROM request WHERE state = 'failed'")[0][0]
    assert 0 < failed < 60
    assert results(workdir, "t").equals(anyio.run(reference))
    spec_file(workdir / "t.toml", mock_server().base_url, extra=no_breaker)
    again = cli("run", "t.toml", "--db", db, "--out", "out", "-q", "--retry-failed")
    assert again.exit_code == 0, again.stderr
    table = results(workdir, "t")
    assert table.num_rows == 60 and set(table.column("state").to_pylist()) == {"succeeded"}
    assert table.equals(anyio.run(reference))
    assert len(rebuilds) == 2
    assert not (workdir / "out" / "t" / "t" / "parts").exists()
