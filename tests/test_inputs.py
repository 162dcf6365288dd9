"""Unit tests of the input readers: the three row shapes in JSONL and Parquet, and their errors."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import InputError
from pipeline.inputs import Row, RowSource, body_hash
from pipeline.spec import InputSpec, TemplateSpec
from pipeline.tokens import estimate_prompt_tokens

USER = [{"role": "user", "content": "What is 2+2?"}]
TEMPLATE = TemplateSpec(
    messages=(
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Q: {question}"},
    )
)
MODELS = frozenset({"m", "n"})


def write_jsonl_lines(path: Path, lines: list[str]) -> Path:
    """Write raw lines (not necessarily valid JSON) as a JSONL file."""
    path.write_text("".join(line + "\n" for line in lines))
    return path


def write_rows(
    folder: Path, fmt: str, rows: list[dict[str, Any]], schema: pa.Schema | None = None
) -> InputSpec:
    """Write ``rows`` as JSONL or Parquet and return the InputSpec to read them."""
    if fmt == "jsonl":
        path = folder / "in.jsonl"
        path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    else:
        path = folder / "in.parquet"
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return InputSpec(path=path, format=fmt)


def source(spec: InputSpec, **kw: Any) -> RowSource:
    kw.setdefault("models", MODELS)
    return RowSource(spec, **kw)


FORMATS = [pytest.param("jsonl", id="jsonl"), pytest.param("parquet", id="parquet")]


@pytest.mark.parametrize("fmt", FORMATS)
def test_batch_api_line_becomes_a_row_without_model(tmp_path: Path, fmt: str) -> None:
    """A Batch API line yields its body (model removed) under its custom_id."""
    line = {
        "custom_id": "b-1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "m", "messages": USER, "max_tokens": 5},
    }
    (row,) = source(write_rows(tmp_path, fmt, [line])).rows()
    assert row == Row(
        seq=0,
        custom_id="b-1",
        body={"messages": USER, "max_tokens": 5},
        body_hash=body_hash({"messages": USER, "max_tokens": 5}),
        record=None,
    )


@pytest.mark.parametrize("fmt", FORMATS)
def test_plain_request_becomes_a_row(tmp_path: Path, fmt: str) -> None:
    """A plain request keeps its custom_id and every other field goes into the body."""
    rows = [{"custom_id": "p-1", "messages": USER, "temperature": 0.5}]
    (row,) = source(write_rows(tmp_path, fmt, rows)).rows()
    assert row.custom_id == "p-1"
    assert row.body == {"messages": USER, "temperature": 0.5}
    assert row.record is None


@pytest.mark.parametrize("fmt", FORMATS)
def test_record_with_template_fills_messages_and_keeps_the_record(tmp_path: Path, fmt: str) -> None:
    """A data record is rendered through the template; the id column gives the id; the record is kept."""
    spec = write_rows(tmp_path, fmt, [{"qid": 7, "question": "2+2?"}, {"qid": 8, "question": "3+3?"}])
    spec = InputSpec(path=spec.path, format=fmt, id_column="qid")
    rows = list(source(spec, template=TEMPLATE).rows())
    assert [r.custom_id for r in rows] == ["7", "8"]
    assert rows[0].body == {
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Q: 2+2?"},
        ]
    }
    assert rows[1].record == {"qid": 8, "question": "3+3?"}


def test_parquet_messages_drop_null_struct_fields(tmp_path: Path) -> None:
    """A Parquet list<struct> of messages loses the null fields that the struct type forces in."""
    message = pa.struct([("role", pa.string()), ("content", pa.string()), ("name", pa.string())])
    table = pa.table(
        {
            "custom_id": ["a"],
            "messages": pa.array(
                [
                    [
                        {"role": "system", "content": "Be kind.", "name": None},
                        {"role": "user", "content": "Hi", "name": "alice"},
                    ]
                ],
                type=pa.list_(message),
            ),
        }
    )
    path = tmp_path / "in.parquet"
    pq.write_table(table, path)
    (row,) = source(InputSpec(path=path, format="parquet")).rows()
    assert row.body == {
        "messages": [
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": "Hi", "name": "alice"},
        ]
    }


def test_parquet_null_in_an_optional_request_column_means_absent(tmp_path: Path) -> None:
    """A Parquet row whose optional column (max_tokens) is null reads as a row without that field."""
    rows = [
        {"custom_id": "a", "messages": USER, "max_tokens": 5},
        {"custom_id": "b", "messages": USER, "max_tokens": None},
    ]
    spec = write_rows(tmp_path, "parquet", rows)
    got = list(source(spec).rows())
    assert [r.body for r in got] == [{"messages": USER, "max_tokens": 5}, {"messages": USER}]


def test_derived_ids_are_stable_and_differ_by_position(tmp_path: Path) -> None:
    """Rows without custom_id get ids that are the same on every read and differ between equal rows."""
    spec = write_rows(tmp_path, "jsonl", [{"messages": USER}, {"messages": USER}])
    first = [r.custom_id for r in source(spec).rows()]
    second = [r.custom_id for r in source(spec).rows()]
    assert first == second
    assert first[0] != first[1]
    assert all(i.startswith("row-") for i in first)


def test_defaults_merge_under_the_rows_own_fields(tmp_path: Path) -> None:
    """Spec request defaults fill missing fields; a field the row sets wins."""
    rows = [
        {"custom_id": "a", "messages": USER, "max_tokens": 5},
        {"custom_id": "b", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": USER}},
    ]
    got = list(
        source(write_rows(tmp_path, "jsonl", rows), defaults={"max_tokens": 100, "temperature": 0}).rows()
    )
    assert got[0].body == {"messages": USER, "max_tokens": 5, "temperature": 0}
    assert got[1].body == {"messages": USER, "max_tokens": 100, "temperature": 0}
    assert got[0].body_hash == body_hash(got[0].body)


def test_row_model_that_is_a_route_is_accepted_and_removed(tmp_path: Path) -> None:
    """A row naming one of the job's models is fine; the body sent on never holds a model."""
    (row,) = source(write_rows(tmp_path, "jsonl", [{"model": "n", "messages": USER}])).rows()
    assert "model" not in row.body


@pytest.mark.parametrize(
    ("line", "field", "fragment"),
    [
        pytest.param('{"messages": [', None, "malformed JSON", id="malformed-json"),
        pytest.param("[1, 2]", None, "expected a JSON object", id="not-an-object"),
        pytest.param('{"custom_id": "x"}', "messages", "missing", id="missing-messages"),
        pytest.param('{"messages": "hi"}', "messages", "list", id="messages-not-a-list"),
        pytest.param('{"messages": []}', "messages", "non-empty", id="messages-empty"),
        pytest.param('{"messages": ["hi"]}', "messages[0]", "object", id="message-not-an-object"),
        pytest.param(
            '{"messages": [{"role": "robot", "content": "x"}]}',
            "messages[0].role",
            "robot",
            id="unknown-role",
        ),
        pytest.param('{"messages": [{"content": "x"}]}', "messages[0].role", "None", id="missing-role"),
        pytest.param(
            '{"messages": [{"role": "user", "content": 5}]}', "messages[0].content", "int", id="content-int"
        ),
        pytest.param(
            '{"messages": [{"role": "user"}]}', "messages[0].content", "missing", id="content-missing"
        ),
        pytest.param(
            '{"messages": [{"role": "user", "content": "x"}], "max_tokens": "10"}',
            "max_tokens",
            "expected int, got str",
            id="max-tokens-string",
        ),
        pytest.param(
            '{"messages": [{"role": "user", "content": "x"}], "temperature": true}',
            "temperature",
            "got bool",
            id="temperature-bool",
        ),
        pytest.param(
            '{"messages": [{"role": "user", "content": "x"}], "n": true}', "n", "got bool", id="n-bool"
        ),
        pytest.param(
            '{"messages": [{"role": "user", "content": "x"}], "tools": {}}',
            "tools",
            "got dict",
            id="tools-dict",
        ),
        pytest.param(
            '{"custom_id": "b", "method": "GET", "url": "/v1/chat/completions", "body": {"messages": []}}',
            "method",
            "GET",
            id="batch-get",
        ),
        pytest.param(
            '{"custom_id": "b", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}}',
            "url",
            "/v1/embeddings",
            id="batch-embeddings-url",
        ),
        pytest.param(
            '{"url": "/v1/chat/completions", "body": "x"}', "body", "object", id="batch-body-string"
        ),
        pytest.param(
            '{"url": "/v1/chat/completions", "body": {"max_tokens": 1}}',
            "body.messages",
            "missing",
            id="batch-no-messages",
        ),
        pytest.param(
            '{"custom_id": 5, "messages": [{"role": "user", "content": "x"}]}',
            "custom_id",
            "string",
            id="custom-id-int",
        ),
        pytest.param(
            '{"custom_id": "", "messages": [{"role": "user", "content": "x"}]}',
            "custom_id",
            "string",
            id="custom-id-empty",
        ),
        pytest.param(
            '{"custom_id": "' + "x" * 257 + '", "messages": [{"role": "user", "content": "x"}]}',
            "custom_id",
            "256",
            id="custom-id-too-long",
        ),
        pytest.param(
            '{"model": "gpt-5", "messages": [{"role": "user", "content": "x"}]}',
            "model",
            "gpt-5",
            id="unknown-model",
        ),
    ],
)
def test_bad_jsonl_row_names_file_line_and_field(
    tmp_path: Path, line: str, field: str | None, fragment: str
) -> None:
    """A bad row raises InputError naming the file, its 1-based line (blank lines count) and the field."""
    path = write_jsonl_lines(
        tmp_path / "in.jsonl", ['{"messages": [{"role": "user", "content": "ok"}]}', "", line]
    )
    with pytest.raises(InputError) as info:
        list(source(InputSpec(path=path, format="jsonl")).rows())
    err = info.value
    assert err.path == str(path)
    assert err.position == "line 3"
    assert err.field == field
    prefix = f"{path}: line 3: " + (f"field {field!r}: " if field else "")
    assert str(err).startswith(prefix), str(err)
    assert fragment in str(err)


def test_bad_parquet_row_names_file_row_and_field(tmp_path: Path) -> None:
    """In Parquet the position is "row N" (1-based)."""
    rows = [
        {"custom_id": "a", "messages": [{"role": "user", "content": "ok"}]},
        {"custom_id": "b", "messages": [{"role": "robot", "content": "no"}]},
    ]
    spec = write_rows(tmp_path, "parquet", rows)
    with pytest.raises(InputError) as info:
        list(source(spec).rows())
    assert str(info.value).startswith(f"{spec.path}: row 2: field 'messages[0].role': ")


def test_template_missing_column_names_the_column(tmp_path: Path) -> None:
    """A template placeholder with no such column raises InputError naming the column."""
    spec = write_rows(tmp_path, "jsonl", [{"prompt": "x"}])
    with pytest.raises(InputError) as info:
        list(source(spec, template=TEMPLATE).rows())
    assert info.value.field == "question"
    assert str(info.value).startswith(f"{spec.path}: line 1: field 'question': ")


def test_template_id_column_missing_names_the_id_column(tmp_path: Path) -> None:
    """A record without the configured id column raises InputError naming that column."""
    path = write_rows(tmp_path, "jsonl", [{"question": "x"}]).path
    with pytest.raises(InputError) as info:
        list(source(InputSpec(path=path, format="jsonl", id_column="qid"), template=TEMPLATE).rows())
    assert info.value.field == "qid"


def test_checked_rows_reports_errors_and_goes_on(tmp_path: Path) -> None:
    """checked_rows yields each bad row's error in place and keeps reading past malformed JSON."""
    path = write_jsonl_lines(
        tmp_path / "in.jsonl",
        [
            '{"custom_id": "a", "messages": [{"role": "user", "content": "1"}]}',
            "{not json",
            "",
            '{"custom_id": "c", "messages": [{"role": "robot", "content": "3"}]}',
            '{"custom_id": "d", "messages": [{"role": "user", "content": "4"}]}',
        ],
    )
    got = list(source(InputSpec(path=path, format="jsonl")).checked_rows())
    assert [(seq, pos) for seq, pos, _, _ in got] == [
        (0, "line 1"),
        (1, "line 2"),
        (2, "line 4"),
        (3, "line 5"),
    ]
    results = [r for *_, r in got]
    assert isinstance(results[0], Row) and results[0].custom_id == "a"
    assert isinstance(results[1], InputError) and "malformed JSON" in str(results[1])
    assert isinstance(results[2], InputError) and results[2].field == "messages[0].role"
    assert isinstance(results[3], Row) and results[3].custom_id == "d"


@pytest.mark.parametrize(
    ("text", "record", "expected"),
    [
        pytest.param("{{literal}} {q}", {"q": "v"}, "{literal} v", id="brace-escapes"),
        pytest.param("{{{q}}}", {"q": "v"}, "{v}", id="escape-around-placeholder"),
        pytest.param("{n}", {"n": 3}, "3", id="int"),
        pytest.param("{x}", {"x": 1.5}, "1.5", id="float"),
        pytest.param("{b}", {"b": True}, "true", id="bool"),
        pytest.param("{tags}", {"tags": ["a", "b"]}, '["a","b"]', id="list"),
        pytest.param("{meta}", {"meta": {"k": 1}}, '{"k":1}', id="dict"),
        pytest.param("[{none}]", {"none": None}, "[]", id="none-is-empty"),
        pytest.param("{first name}", {"first name": "Ann"}, "Ann", id="column-with-space"),
        pytest.param("{a} and {a}", {"a": "x"}, "x and x", id="repeated"),
        pytest.param("no placeholders {}", {}, "no placeholders {}", id="empty-braces-kept"),
    ],
)
def test_template_placeholders_render(
    tmp_path: Path, text: str, record: dict[str, Any], expected: str
) -> None:
    """Placeholders take the column's text; non-strings are JSON; None is empty; {{ and }} escape."""
    template = TemplateSpec(messages=({"role": "user", "content": text},))
    spec = write_rows(tmp_path, "jsonl", [record])
    (row,) = source(spec, template=template).rows()
    assert row.body["messages"] == [{"role": "user", "content": expected}]


def test_template_fills_text_content_parts(tmp_path: Path) -> None:
    """Placeholders inside text parts of a list content are filled; other parts are kept as they are."""
    template = TemplateSpec(
        messages=(
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Describe {what}"},
                    {"type": "image_url", "image_url": {"url": "https://x/{what}.png"}},
                ],
            },
        )
    )
    (row,) = source(write_rows(tmp_path, "jsonl", [{"what": "cat"}]), template=template).rows()
    assert row.body["messages"][0]["content"] == [
        {"type": "text", "text": "Describe cat"},
        {"type": "image_url", "image_url": {"url": "https://x/{what}.png"}},
    ]


def test_template_fills_parquet_decimal_column(tmp_path: Path) -> None:
    """A Parquet decimal column used in a template renders as its number, not a crash."""
    table = pa.table({"q": ["cost?"], "price": pa.array([Decimal("1.50")], type=pa.decimal128(5, 2))})
    path = tmp_path / "in.parquet"
    pq.write_table(table, path)
    template = TemplateSpec(messages=({"role": "user", "content": "{q} {price}"},))
    (row,) = source(InputSpec(path=path, format="parquet"), template=template).rows()
    assert row.body["messages"] == [{"role": "user", "content": "cost? 1.50"}]


def test_prompt_token_estimate_grows_with_content() -> None:
    """More text, more messages or tools give a larger estimate."""
    short = {"messages": [{"role": "user", "content": "a" * 40}]}
    long = {"messages": [{"role": "user", "content": "a" * 4000}]}
    two = {"messages": [{"role": "user", "content": "a" * 40}] * 2}
    tools = {**short, "tools": [{"type": "function", "function": {"name": "f" * 200}}]}
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}
    assert estimate_prompt_tokens(short) < estimate_prompt_tokens(two) < estimate_prompt_tokens(long)
    assert estimate_prompt_tokens(short) < estimate_prompt_tokens(tools)
    assert estimate_prompt_tokens(image) > estimate_prompt_tokens(short)
    # cl100k_base (offline): "Hello world, this is a test." is 8 tokens; + 3 per message + 3 priming.
    hello = {"messages": [{"role": "user", "content": "Hello world, this is a test."}]}
    assert estimate_prompt_tokens(hello) == 8 + 3 + 3


def test_body_hash_ignores_key_order_but_not_content() -> None:
    """Equal bodies hash alike whatever their key order, at every depth; different bodies do not."""
    a = {"messages": [{"role": "user", "content": "x"}], "temperature": 0, "metadata": {"a": 1, "b": 2}}
    b = {"metadata": {"b": 2, "a": 1}, "temperature": 0, "messages": [{"content": "x", "role": "user"}]}
    c = {**a, "temperature": 1}
    assert body_hash(a) == body_hash(b)
    assert body_hash(a) != body_hash(c)
