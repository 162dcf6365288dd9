"""The bill: usage and cost per attempt, exact to the picodollar, computed beside reported,
billed failures counted, `report` totals equal to the sum of the attempts, `estimate`."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from helpers import as_datetime, dict_rows, plain_rows, query, write_jsonl

from pipeline.mock import MockServer
from pipeline.tokens import estimate_prompt_tokens

PICO = Decimal(10) ** 12


def bill_spec(path: Path, base_url: str, prices: str) -> Path:
    path.write_text(
        f"""
job = "bill"
model = "mock-small"

[input]
path = "in.jsonl"

[endpoints.default]
base_url = "{base_url}"

[retry]
backoff_base_s = 0.01
backoff_max_s = 0.02

{prices}
""",
        encoding="utf-8",
    )
    return path


def attempt_rows(db: str) -> list[dict[str, Any]]:
    return dict_rows(db, "SELECT * FROM attempt ORDER BY custom_id, attempt_no")


def test_computed_cost_is_exact_with_cached_and_reasoning_tokens_and_reported_cost_kept(
    workdir: Path, db: str, mock_server: Callable[..., MockServer], cli: Callable[..., Any]
) -> None:
    """Cached tokens at the cache rate, reasoning inside completion tokens, provider cost stored beside."""
    server = mock_server(cached_tokens=8, reasoning_tokens=5, report_cost=True)
    write_jsonl(workdir / "in.jsonl", plain_rows(5))
    prices = "[prices.mock-small]\ninput = 0.15\ncached_input = 0.075\noutput = 0.60\n"
    spec = bill_spec(workdir / "job.toml", server.base_url, prices)
    r = cli("run", spec, "--db", db, "--out", "out", "-q")
    assert r.exit_code == 0, r.stderr
    rows = attempt_rows(db)
    assert len(rows) == 5
    # the provider's usage object as received: in the completion's raw body
    raws = dict_rows(db, "SELECT seq, attempt_no, raw FROM completion")
    usages = {(c["seq"], c["attempt_no"]): orjson.loads(c["raw"])["usage"] for c in raws}
    for a in rows:
        usage = usages[a["seq"], a["attempt_no"]]
        assert a["cached_tokens"] == usage["prompt_tokens_details"]["cached_tokens"] == 8
        assert a["reasoning_tokens"] == usage["completion_tokens_details"]["reasoning_tokens"] == 5
        fresh = a["prompt_tokens"] - 8
        # By hand, USD per million tokens: fresh prompt at 0.15, cached at 0.075, completion
        # (reasoning included, counted once) at 0.60.
        expected = (
            fresh * Decimal("0.15") + 8 * Decimal("0.075") + a["completion_tokens"] * Decimal("0.60")
        ) / 10**6
        assert Decimal(a["cost_picousd"]) / PICO == expected
        assert a["cost_source"] == "spec"
        assert Decimal(a["reported_cost_picousd"]) / PICO == Decimal(str(usage["cost"]))


def test_a_separate_reasoning_price_applies_to_reasoning_tokens_only(
    workdir: Path, db: str, mock_server: Callable[..., MockServer], cli: Callable[..., Any]
) -> None:
    """With a reasoning price, reasoning tokens are priced at it and the rest of the completion at output."""
    server = mock_server(reasoning_tokens=7)
    write_jsonl(workdir / "in.jsonl", plain_rows(3))
    prices = "[prices.mock-small]\ninput = 1\noutput = 2\nreasoning = 3\n"
    spec = bill_spec(workdir / "job.toml", server.base_url, prices)
    assert cli("run", spec, "--db", db, "--out", "out", "-q").exit_code == 0
    for a in attempt_rows(db):
        expected = (a["prompt_tokens"] * 1 + (a["completion_tokens"] - 7) * 2 + 7 * 3) * 10**6
        assert a["cost_picousd"] == expected


def test_billed_failures_count_and_report_totals_equal_the_sum_of_attempts(
    workdir: Path, db: str, mock_server: Callable[..., MockServer], cli: Callable[..., Any]
) -> None:
    """finish_reason "error" answers are retried but billed; `report` adds them in."""
    server = mock_server(finish_error_first=1, report_cost=True)
    write_jsonl(workdir / "in.jsonl", plain_rows(4))
    prices = "[prices.mock-small]\ninput = 0.15\noutput = 0.60\n"
    spec = bill_spec(workdir / "job.toml", server.base_url, prices)
    assert cli("run", spec, "--db", db, "--out", "out", "-q").exit_code == 0
    rows = attempt_rows(db)
    assert [(a["attempt_no"], a["outcome"], a["error_class"]) for a in rows[:2]] == [
        (1, "retry", "finish_error"),
        (2, "success", None),
    ]
    failed = [a for a in rows if a["outcome"] != "success"]
    assert len(failed) == 4 and all(a["cost_picousd"] > 0 for a in failed)
    r = cli("report", "--db", db, "--by", "model", "--format", "json")
    assert r.exit_code == 0, r.stderr
    (line,) = orjson.loads(r.stdout)
    assert (line["requests"], line["attempts"], line["failed_attempts"], line["billed_failures"]) == (
        4,
        8,
        4,
        4,
    )
    total = sum(a["cost_picousd"] for a in rows)
    assert Decimal(line["cost_usd"]) == Decimal(total) / PICO
    reported = sum(a["reported_cost_picousd"] for a in rows)
    assert Decimal(line["reported_cost_usd"]) == Decimal(reported) / PICO
    assert Decimal(line["difference_usd"]) == Decimal(reported - total) / PICO
    assert line["prompt_tokens"] == sum(a["prompt_tokens"] for a in rows)
    per_request = dict(query(db, "SELECT custom_id, cost_picousd FROM request"))
    for cid, cost in per_request.items():
        assert cost == sum(a["cost_picousd"] for a in rows if a["custom_id"] == cid)
    status = orjson.loads(cli("status", "--db", db, "--json").stdout)
    assert Decimal(status["cost_usd"]) == Decimal(total) / PICO


def test_report_by_day_and_since_a_day_count_the_attempts_of_those_days(
    workdir: Path, db: str, mock_server: Callable[..., MockServer], cli: Callable[..., Any]
) -> None:
    """`report --by day` groups attempts by the UTC day they started; `--since DAY` keeps the
    attempts from that day on; a --since that is not a day is one line, exit 2."""
    server = mock_server(fail_first=1, fail_status=500)
    write_jsonl(workdir / "in.jsonl", plain_rows(3))
    prices = "[prices.mock-small]\ninput = 0.15\noutput = 0.60\n"
    spec = bill_spec(workdir / "job.toml", server.base_url, prices)
    assert cli("run", spec, "--db", db, "--out", "out", "-q").exit_code == 0
    first, last = (
        as_datetime(t).date() for t in query(db, "SELECT MIN(started_at), MAX(started_at) FROM attempt")[0]
    )
    days = sorted({first.isoformat(), last.isoformat()})  # two if the run crossed midnight

    def report(*more: str) -> list[dict[str, Any]]:
        r = cli("report", "--db", db, "--by", "day", "--format", "json", *more)
        assert r.exit_code == 0, r.stderr
        return list(orjson.loads(r.stdout))

    by_day = report()
    assert [line["day"] for line in by_day] == days
    assert sum(line["attempts"] for line in by_day) == 6
    assert sum(line["failed_attempts"] for line in by_day) == 3
    total = sum(
        a["cost_picousd"] for a in attempt_rows(db) if a["cost_picousd"] is not None
    )  # 500s: unbilled
    assert total > 0 and sum(Decimal(line["cost_usd"]) for line in by_day) == Decimal(total) / PICO
    assert report("--since", (first - timedelta(days=1)).isoformat()) == by_day
    assert report("--since", first.isoformat()) == by_day
    assert report("--since", (last + timedelta(days=1)).isoformat()) == []
    bad = cli("report", "--db", db, "--since", "last week")
    assert bad.exit_code == 2 and "--since" in bad.stderr and "Traceback" not in bad.stderr


def test_audit_views_agree_with_the_attempts(
    workdir: Path, db: str, mock_server: Callable[..., MockServer], cli: Callable[..., Any]
) -> None:
    """The SQL views (what sqlite3 / psql users query) hold the same counts and money as the rows."""
    server = mock_server(fail_first=1, fail_status=500)
    write_jsonl(workdir / "in.jsonl", plain_rows(4))
    prices = "[prices.mock-small]\ninput = 0.15\noutput = 0.60\n"
    assert (
        cli("run", bill_spec(workdir / "job.toml", server.base_url, prices), "--db", db, "-q").exit_code == 0
    )
    rows = attempt_rows(db)
    total = sum(a["cost_picousd"] for a in rows if a["cost_picousd"] is not None)
    assert total > 0 and len(rows) == 8

    (by_run,) = dict_rows(db, "SELECT * FROM cost_by_run")
    assert (by_run["run_id"], by_run["attempts"], by_run["requests"]) == ("bill", 8, 4)
    assert by_run["cost_picousd"] == total
    assert float(by_run["cost_usd"]) == pytest.approx(total / 1e12, rel=1e-12)  # a float, for reading
    days = dict_rows(db, "SELECT * FROM cost_by_model_day")
    assert sum(d["attempts"] for d in days) == 8 and sum(d["succeeded"] for d in days) == 4
    assert sum(d["cost_picousd"] for d in days) == total
    (route,) = dict_rows(db, "SELECT * FROM failure_rate_by_route")
    assert (route["model"], route["attempts"], route["failures"], route["failure_rate"]) == (
        "mock-small",
        8,
        4,
        0.5,
    )
    results = dict_rows(db, "SELECT * FROM request_result ORDER BY seq")
    assert [(r["custom_id"], r["state"], r["attempts"]) for r in results] == [
        (f"q-{i}", "succeeded", 2) for i in range(4)
    ]
    assert len(dict_rows(db, "SELECT * FROM attempt_bill")) == 8


def test_unknown_price_gives_null_cost_and_one_warning(
    workdir: Path, db: str, mock_server: Callable[..., MockServer], cli: Callable[..., Any]
) -> None:
    """A model with no price: NULL cost with the reason, one warning for the run, never 0."""
    server = mock_server()
    write_jsonl(workdir / "in.jsonl", plain_rows(6))
    spec = bill_spec(workdir / "job.toml", server.base_url, "")
    r = cli("run", spec, "--db", db, "--out", "out", "-q")
    assert r.exit_code == 0, r.stderr
    assert r.stderr.count("no price known for model 'mock-small'") == 1
    rows = attempt_rows(db)
    assert all(a["cost_picousd"] is None and "no price known" in a["cost_note"] for a in rows)
    line = orjson.loads(cli("report", "--db", db, "--format", "json").stdout)[0]
    assert line["cost_usd"] is None and line["unpriced_attempts"] == 6


def test_estimate_counts_rows_tokens_and_prices_each_route(workdir: Path, cli: Callable[..., Any]) -> None:
    """`estimate` streams the input and prices prompt and output allowance per route, with no key."""
    rows = [
        {"custom_id": f"e{i}", "messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 100}
        for i in range(50)
    ]
    write_jsonl(workdir / "in.jsonl", rows)
    r = cli(
        "estimate", "--input", "in.jsonl", "--base-url", "https://api.openai.com/v1",
        "--model", "gpt-4o-mini", "--fallback", "unpriced-model", "--json",
    )  # fmt: skip
    assert r.exit_code == 0, r.stderr
    info = orjson.loads(r.stdout)
    assert info["rows"] == 50
    per_row = estimate_prompt_tokens(rows[0])
    assert info["prompt_tokens"] == 50 * per_row
    assert info["max_output_tokens"] == 50 * 100
    primary, fallback = info["routes"]
    # gpt-4o-mini: 0.15 input and 0.60 output USD per million tokens.
    prompt = Decimal(50 * per_row)
    assert (
        Decimal(primary["worst_case_cost_usd"]) == (prompt * Decimal("0.15") + 5000 * Decimal("0.60")) / 10**6
    )
    assert Decimal(primary["input_cost_usd"]) == prompt * Decimal("0.15") / 10**6
    assert fallback["worst_case_cost_usd"] is None
