"""Answer checks: structured outputs validated against their schema, refusals kept as such,
reasoning that used up the output budget reported."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from pipeline.answers import check_answer, output_limit
from pipeline.errors import InvalidResponse
from pipeline.records import Choice, Completion, Usage

SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["label"],
    "properties": {"label": {"type": "string", "enum": ["positive", "negative"]}},
}
JSON_SCHEMA_BODY = {
    "messages": [{"role": "user", "content": "x"}],
    "max_tokens": 50,
    "response_format": {
        "type": "json_schema",
        "json_schema": {"name": "l", "strict": True, "schema": SCHEMA},
    },
}


def completion(
    *contents: str | None, finish: str = "stop", refusal: str | None = None, reasoning: int = 0
) -> Completion:
    choices = tuple(
        Choice(index=i, finish_reason=finish, content=c, refusal=refusal if c is None else None)
        for i, c in enumerate(contents)
    )
    usage = Usage(prompt=10, completion=50, total=60, reasoning=reasoning)
    return Completion("chatcmpl-1", "m", None, None, 0, choices, usage, b"{}")


def test_a_valid_structured_answer_is_returned_parsed() -> None:
    """Content that matches the schema comes back as compact JSON text."""
    assert check_answer(JSON_SCHEMA_BODY, completion('{"label": "positive"}')) == '{"label":"positive"}'


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param("positive", "is not JSON", id="not-json"),
        pytest.param('{"label": "maybe"}', "at label: 'maybe' is not one of", id="enum"),
        pytest.param('{"label": "positive", "extra": 1}', "Additional properties", id="extra-field"),
        pytest.param("{}", "'label' is a required property", id="missing-field"),
    ],
)
def test_an_answer_that_breaks_the_schema_is_an_invalid_output(content: str, message: str) -> None:
    """Invalid answers raise invalid_output, naming where the schema is broken, with the completion kept."""
    c = completion(content)
    with pytest.raises(InvalidResponse) as info:
        check_answer(JSON_SCHEMA_BODY, c)
    assert info.value.code == "invalid_output" and message in info.value.message
    assert info.value.completion is c


def test_json_object_mode_needs_an_object() -> None:
    """response_format json_object: a JSON object passes, a JSON list does not."""
    body: dict[str, Any] = {"response_format": {"type": "json_object"}}
    assert check_answer(body, completion('{"a": 1}')) == '{"a":1}'
    with pytest.raises(InvalidResponse):
        check_answer(body, completion("[1, 2]"))


def test_every_choice_is_validated_and_all_are_kept_for_n_above_1() -> None:
    """With n = 2 each choice is checked; the parsed value is the list of both."""
    parsed = check_answer(JSON_SCHEMA_BODY, completion('{"label": "positive"}', '{"label": "negative"}'))
    assert orjson.loads(parsed or "") == [{"label": "positive"}, {"label": "negative"}]
    with pytest.raises(InvalidResponse, match="choice 1"):
        check_answer(JSON_SCHEMA_BODY, completion('{"label": "positive"}', "nope"))


def test_a_refusal_is_not_validated_and_gives_no_parsed_answer() -> None:
    """message.refusal is an answer of its own kind: no error, nothing parsed."""
    assert check_answer(JSON_SCHEMA_BODY, completion(None, refusal="I can't help with that.")) is None


def test_reasoning_that_used_up_max_tokens_is_reported_as_such() -> None:
    """finish_reason length with no content: reasoning_exhausted, naming the budget and reasoning tokens."""
    with pytest.raises(InvalidResponse) as info:
        check_answer(JSON_SCHEMA_BODY, completion("", finish="length", reasoning=50))
    assert info.value.code == "reasoning_exhausted"
    assert "max_tokens=50" in info.value.message and "50 reasoning tokens" in info.value.message


def test_a_length_stop_with_some_content_is_an_answer() -> None:
    """A truncated but non-empty plain answer is kept (finish_reason says it was cut)."""
    assert check_answer({"messages": []}, completion("partial text", finish="length")) is None


def test_output_limit_prefers_max_completion_tokens() -> None:
    """max_completion_tokens wins over the older max_tokens."""
    assert output_limit({"max_tokens": 10, "max_completion_tokens": 20}) == ("max_completion_tokens", 20)
    assert output_limit({"max_tokens": 10}) == ("max_tokens", 10)
    assert output_limit({}) is None
