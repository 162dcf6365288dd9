"""Is an answer usable? Structured outputs validated, reasoning that ate the answer detected.

Pure functions on a parsed completion and the request body; the worker raises what they
return through the classification table (``invalid_output``, ``reasoning_exhausted``).

* ``response_format: {"type": "json_schema", "json_schema": {"schema": ...}}``: every choice's
  content must be JSON valid against the schema (JSON Schema 2020-12, as OpenAI's structured
  outputs use); ``{"type": "json_object"}``: it must be a JSON object. The parsed value is
  kept (for ``n > 1``, a list with one value per choice).
* A refusal (``message.refusal``) is an answer of its own kind: recorded as such, never
  validated or retried.
* ``finish_reason: "length"`` with no content and no tool call means the output budget went
  on reasoning before any answer: reported as such, not as an empty answer.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import orjson

from pipeline.errors import InvalidResponse
from pipeline.records import Completion

__all__ = ["check_answer", "output_limit"]


def output_limit(body: Mapping[str, Any]) -> tuple[str, int] | None:
    """The body's output cap field and value (max_completion_tokens wins), if set."""
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return key, value
    return None


@functools.lru_cache(maxsize=64)
def _validator(schema_json: bytes) -> Any:
    import jsonschema

    schema = orjson.loads(schema_json)
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema)


def _fail(message: str, code: str, completion: Completion) -> InvalidResponse:
    err = InvalidResponse(message, code=code, provider_request_id=completion.provider_request_id)
    err.completion = completion
    return err


def check_answer(body: Mapping[str, Any], completion: Completion) -> str | None:
    """The parsed structured answer (JSON text), or None if the request asked for none.

    Raises InvalidResponse with code ``reasoning_exhausted`` or ``invalid_output``.
    """
    first = completion.first
    if first.finish_reason == "length" and not first.content and not first.tool_calls and not first.refusal:
        cap = output_limit(body)
        used = completion.usage.reasoning if completion.usage else 0
        raise _fail(
            f"no answer: reasoning used up the output budget ({cap[0]}={cap[1]}, "
            f"{used} reasoning tokens) before any content"
            if cap
            else f"no answer: the output budget ran out ({used} reasoning tokens) before any content",
            "reasoning_exhausted",
            completion,
        )
    fmt = body.get("response_format")
    if fmt is None or not isinstance(fmt, Mapping) or fmt.get("type") not in ("json_schema", "json_object"):
        return None
    schema = None
    if fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
    values: list[Any] = []
    for choice in completion.choices:
        if choice.refusal is not None or choice.content is None:
            values.append(None)
            continue
        try:
            value = orjson.loads(choice.content)
        except orjson.JSONDecodeError as exc:
            raise _fail(
                f"choice {choice.index}: the answer is not JSON: {exc}", "invalid_output", completion
            ) from None
        if schema is None:
            if not isinstance(value, dict):
                raise _fail(f"choice {choice.index}: expected a JSON object", "invalid_output", completion)
        else:
            import jsonschema

            error = jsonschema.exceptions.best_match(
                _validator(orjson.dumps(schema, option=orjson.OPT_SORT_KEYS)).iter_errors(value)
            )
            if error is not None:
                where = "/".join(str(p) for p in error.absolute_path) or "(root)"
                raise _fail(
                    f"choice {choice.index}: the answer does not match the schema at {where}: "
                    f"{error.message}",
                    "invalid_output",
                    completion,
                )
        values.append(value)
    if all(v is None for v in values):
        return None
    return orjson.dumps(values[0] if len(values) == 1 else values).decode()
