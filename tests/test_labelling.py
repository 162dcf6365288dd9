"""Labelling runs: a Parquet table + a template + a JSON schema in, the same table with
validated labels out; invalid answers retried; refusals, exhausted reasoning, n > 1, bad rows."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from helpers import default_db, dict_rows, query, write_jsonl

from pipeline.mock import MockServer, ModelFaults

SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["label", "confidence"],
    "properties": {
        "label": {"type": "string", "enum": ["spam", "ham"]},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
    },
}
TOPICS = ["refund request", "meeting notes", "win a prize", "invoice attached", "lunch plans"]


def write_table(path: Path, n: int) -> list[dict[str, Any]]:
    rows = [
        {"msg_id": f"m{i:03d}", "text": f"Email {i} about {TOPICS[i % 5]}", "chars": 20 + i} for i in range(n)
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return rows


def label_spec(workdir: Path, base_url: str, *, extra: str = "", request: str = "") -> Path:
    fmt = orjson.dumps(
        {"type": "json_schema", "json_schema": {"name": "spam", "strict": True, "schema": SCHEMA}}
    )
    spec = workdir / "label.toml"
    spec.write_text(
        f"""
job = "label"
model = "mock-small"

[input]
path = "emails.parquet"
id_column = "msg_id"

[template]
messages = [{{ role = "user", content = "Is this spam? {{text}}" }}]

[request]
max_tokens = 60
response_format = {_toml_inline(orjson.loads(fmt))}
{request}

[endpoints.default]
base_url = "{base_url}"

[retry]
backoff_base_s = 0.01
backoff_max_s = 0.02
{extra}
""",
        encoding="utf-8",
    )
    return spec


def _toml_inline(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f'"{k}" = {_toml_inline(v)}' for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_inline(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return orjson.dumps(value).decode()
    return str(value)


def run(cli: Callable[..., Any], spec: Path, *extra: str) -> Any:
    return cli("run", spec, "--out", "out", "-q", *extra)


def attempts() -> dict[str, list[dict[str, Any]]]:
    rows = dict_rows(
        default_db(),
        "SELECT a.*, c.validation_error, c.parsed FROM attempt a LEFT JOIN completion c USING "
        "(run_id, custom_id, attempt_no) ORDER BY a.custom_id, a.attempt_no",
    )
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(r["custom_id"], []).append(r)
    return out


def test_labelled_table_comes_back_in_order_with_valid_labels_and_invalid_answers_retried(
    workdir: Path, mock_server: Callable[..., MockServer], cli: Callable[..., Any]
) -> None:
    """Every input row, in order, with its columns and a schema-valid parsed label; the rows whose
    first answer broke the schema were asked again, and both attempts are recorded."""
    server = mock_server(
        model_faults={"mock-small": ModelFaults("schema_violation", first=1, match="refund")}
    )
    rows = write_table(workdir / "emails.parquet", 25)
    r = run(cli, label_spec(workdir, server.base_url))
    assert r.exit_code == 0, r.stderr
    table = pq.read_table(workdir / "out" / "label" / "label" / "results.parquet")
    assert table.column_names[:3] == ["msg_id", "text", "chars"]
    assert table.select(["msg_id", "text", "chars"]).to_pylist() == rows
    assert table.column("chars").type == pa.int64()
    for parsed in table.column("parsed").to_pylist():
        jsonschema.validate(orjson.loads(parsed), SCHEMA)
    by_request = attempts()
    faulty = {row["msg_id"] for row in rows if "refund" in row["text"]}
    assert len(faulty) == 5
    for cid, tries in by_request.items():
        if cid in faulty:
            first, second = tries
            assert (first["outcome"], first["error_class"]) == ("retry", "invalid_output")
            assert "does not match the schema" in first["validation_error"] and first["parsed"] is None
            assert first["cost_picousd"] is None and first["total_tokens"] > 0  # billed, kept
            assert second["outcome"] == "success" and second["parsed"] is not None
        else:
            assert [t["outcome"] for t in tries] == ["success"]
    assert dict(
        zip(table.column("msg_id").to_pylist(), table.column("attempts").to_pylist(), strict=True)
    ) == {cid: len(t) for cid, t in by_request.items()}


def test_answers_that_never_match_the_schema_fail_after_the_configured_retries(
    workdir: Path, mock_server: Callable[..., MockServer], cli: Callable[..., Any]
) -> None:
    """invalid_answer_retries = 1: two attempts, then the request is failed with the validation error."""
    server = mock_server(model_faults={"mock-small": ModelFaults("schema_violation", match="prize")})
    write_table(workdir / "emails.parquet", 10)
    r = run(cli, label_spec(workdir, server.base_url, extra="\n[policy]\ninvalid_answer_retries = 1\n"))
    assert r.exit_code == 1
    failed = query(default_db(), "SELECT custom_id, attempts, error FROM request WHERE state = 'failed'")
    assert [(cid, n) for cid, n, _ in failed] == [("m002", 2), ("m007", 2)]
    assert all("does not match the schema" in err and "mock_unexpected" in err for _, _, err in failed)
    assert query(default_db(), "SELECT COUNT(*) FROM request WHERE state = 'succeeded'") == [(8,)]


def test_a_refusal_is_recorded_as_a_refusal_not_retried(
    workdir: Path, mock_server: Callable[..., MockServer], cli: Callable[..., Any]
) -> None:
    """message.refusal: one attempt, the refusal kept, no parsed label, not an error."""
    server = mock_server(model_faults={"mock-small": ModelFaults("refusal", match="prize")})
    write_table(workdir / "emails.parquet", 5)
    assert run(cli, label_spec(workdir, server.base_url)).exit_code == 0
    table = pq.read_table(workdir / "out" / "label" / "label" / "results.parquet").to_pylist()
    refused = [t for t in table if t["refusal"]]
    assert [t["msg_id"] for t in refused] == ["m002"]
    assert refused[0]["content"] is None and refused[0]["parsed"] is None and refused[0]["attempts"] == 1
    assert server.stats().requests_total == 5


def test_reasoning_that_ate_max_tokens_is_reported_and_can_be_retried_with_more(
    workdir: Path, mock_server: Callable[..., MockServer], cli: Callable[..., Any]
) -> None:
    """A model that reasons 100 tokens under max_tokens = 60: by default each request fails with
    a clear reason; with reasoning_exhausted = "grow" it is retried with max_tokens doubled."""
    server = mock_server(reasoning_tokens=100)
    write_table(workdir / "emails.parquet", 4)
    assert run(cli, label_spec(workdir, server.base_url)).exit_code == 1
    errors = query(default_db(), "SELECT state, error FROM request")
    assert len(errors) == 4 and all(state == "failed" for state, _ in errors)
    assert all(
        "reasoning used up the output budget (max_tokens=60, 60 reasoning tokens)" in e for _, e in errors
    )
    spec = label_spec(workdir, server.base_url, extra='\n[policy]\nreasoning_exhausted = "grow"\n')
    assert run(cli, spec, "--new-run", "--run-id", "grow").exit_code == 0
    for cid, tries in attempts().items():
        grown = [t for t in tries if t["run_id"] == "grow"]
        assert [(t["outcome"], t["error_class"]) for t in grown] == [
            ("retry", "reasoning_exhausted"),
            ("success", None),
        ], cid
        assert grown[1]["reasoning_tokens"] == 100


def test_n_above_1_keeps_every_choice(
    workdir: Path, mock_server: Callable[..., MockServer], cli: Callable[..., Any]
) -> None:
    """n = 3: all three choices are validated and kept, the parsed value holds all three."""
    server = mock_server()
    write_table(workdir / "emails.parquet", 3)
    assert run(cli, label_spec(workdir, server.base_url, request="n = 3")).exit_code == 0
    table = pq.read_table(workdir / "out" / "label" / "label" / "results.parquet").to_pylist()
    for t in table:
        assert len(orjson.loads(t["choices"])) == 3
        assert len(orjson.loads(t["parsed"])) == 3


def test_skip_mode_rejects_bad_rows_with_their_reason_and_sends_the_rest(
    workdir: Path, db: str, mock_server: Callable[..., MockServer], cli: Callable[..., Any]
) -> None:
    """--on-bad-row skip: bad rows are recorded rejected with the reason, good ones answered, exit 1."""
    server = mock_server()
    good = {"custom_id": "ok", "messages": [{"role": "user", "content": "hi"}]}
    write_jsonl(workdir / "in.jsonl", [good, {"custom_id": "bad"}, {**good, "custom_id": "ok2"}])
    (workdir / "in.jsonl").write_text((workdir / "in.jsonl").read_text() + "{not json\n")
    r = cli(
        "run", "--input", "in.jsonl", "--base-url", server.base_url, "--model", "mock-small",
        "--db", db, "--out", "out", "-q", "--on-bad-row", "skip",
    )  # fmt: skip
    assert r.exit_code == 1, r.stderr
    states = query(db, "SELECT seq, state, error FROM request ORDER BY seq")
    assert [(s, st) for s, st, _ in states] == [
        (0, "succeeded"),
        (1, "rejected"),
        (2, "succeeded"),
        (3, "rejected"),
    ]
    assert "line 2: field 'messages': missing" in states[1][2]
    assert "line 4" in states[3][2] and "malformed JSON" in states[3][2]
    assert server.stats().requests_total == 2
