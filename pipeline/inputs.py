"""Input readers: JSONL and Parquet, streamed, in the three row shapes.

1. OpenAI Batch API line: ``{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body": {...}}``
2. Plain request: ``{"custom_id"?, "messages": [...], ...any chat-completion parameters}``
3. Data record + template: the spec's messages template with ``{column}`` placeholders,
   filled from the row's columns; the record is kept for the labelled output.

Every row becomes a :class:`Row` with its request id, the request body (spec defaults
merged in, the row's own fields win) and the body's hash. Nothing here loads the whole
file: JSONL is read line by line, Parquet by record batches.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from pipeline.errors import InputError
from pipeline.spec import InputSpec, TemplateSpec

__all__ = ["Row", "RowSource", "body_hash", "file_sha256"]

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
CHAT_URLS = ("/v1/chat/completions", "/chat/completions")
MAX_ID_LEN = 256

# The types of the request fields we can check cheaply; anything else passes through untouched.
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "max_tokens": (int,),
    "max_completion_tokens": (int,),
    "n": (int,),
    "seed": (int,),
    "top_logprobs": (int,),
    "temperature": (int, float),
    "top_p": (int, float),
    "presence_penalty": (int, float),
    "frequency_penalty": (int, float),
    "stream": (bool,),
    "logprobs": (bool,),
    "store": (bool,),
    "parallel_tool_calls": (bool,),
    "stop": (str, list, type(None)),
    "tools": (list,),
    "response_format": (dict,),
    "metadata": (dict,),
    "logit_bias": (dict,),
    "stream_options": (dict, type(None)),
    "modalities": (list,),
    "user": (str,),
}
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_ .-]*)\}")


@dataclass(frozen=True, slots=True)
class Row:
    """One request, ready to plan and send."""

    seq: int  # 0-based position in the input
    custom_id: str
    body: dict[str, Any]  # without "model": the route sets it
    body_hash: str
    record: dict[str, Any] | None  # the data record, for template rows


def body_hash(body: Mapping[str, Any]) -> str:
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class RowSource:
    """Streams the rows of one input file, validated and normalised."""

    def __init__(
        self,
        spec: InputSpec,
        *,
        template: TemplateSpec | None = None,
        defaults: Mapping[str, Any] | None = None,
        models: frozenset[str] = frozenset(),
    ) -> None:
        self.spec = spec
        self.template = template
        self.defaults = dict(defaults or {})
        self.models = models
        self.path = str(spec.path)

    # -- reading raw rows ---------------------------------------------------------------

    def raw_rows(self) -> Iterator[tuple[int, str, Any]]:
        """(seq, "line N" / "row N", parsed object) for each row; blank JSONL lines skipped.

        A line that is not JSON comes as an :class:`InputError` in place of the object, so a
        reader that skips bad rows can go on past it.
        """
        if self.spec.format == "parquet":
            yield from self._parquet_rows()
        else:
            yield from self._jsonl_rows()

    def _jsonl_rows(self) -> Iterator[tuple[int, str, Any]]:
        seq = 0
        try:
            f = self.spec.path.open("rb")
        except OSError as exc:
            raise InputError(self.path, "open", None, str(exc.strerror or exc)) from None
        with f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                obj: Any
                try:
                    obj = orjson.loads(line)
                except orjson.JSONDecodeError as exc:
                    obj = InputError(self.path, f"line {lineno}", None, f"malformed JSON: {exc}")
                yield seq, f"line {lineno}", obj
                seq += 1

    def _parquet_rows(self) -> Iterator[tuple[int, str, Any]]:
        import pyarrow.parquet as pq

        try:
            # No read-ahead of whole row groups: memory stays flat on inputs larger than RAM.
            pf = pq.ParquetFile(self.spec.path, pre_buffer=False, buffer_size=1 << 20)
        except Exception as exc:  # pyarrow raises ArrowInvalid, OSError...: all mean "not Parquet"
            raise InputError(self.path, "file", None, f"not a readable Parquet file: {exc}") from None
        seq = 0
        for batch in pf.iter_batches(batch_size=2048):
            for obj in batch.to_pylist():
                yield seq, f"row {seq + 1}", obj
                seq += 1

    # -- normalising -------------------------------------------------------------------

    def rows(self) -> Iterator[Row]:
        """Every row as a :class:`Row`; raises :class:`InputError` at the first bad one."""
        for seq, pos, obj in self.raw_rows():
            yield self.to_row(seq, pos, obj)

    def checked_rows(self) -> Iterator[tuple[int, str, Any, Row | InputError]]:
        """(seq, "line N", raw object, Row or the row's error): bad rows do not stop the reader."""
        for seq, pos, obj in self.raw_rows():
            try:
                yield seq, pos, obj, self.to_row(seq, pos, obj)
            except InputError as exc:
                yield seq, pos, obj, exc

    def to_row(self, seq: int, pos: str, obj: Any) -> Row:
        if isinstance(obj, InputError):
            raise obj
        if not isinstance(obj, dict):
            raise InputError(self.path, pos, None, f"expected a JSON object, got {type(obj).__name__}")
        record: dict[str, Any] | None = None
        custom_id = obj.get("custom_id")
        id_col, msg_col, body_col = self.spec.id_column, self.spec.messages_column, self.spec.body_column
        if id_col is not None:
            if id_col not in obj:
                raise InputError(self.path, pos, id_col, "missing (the id column)")
            custom_id = obj[id_col]
            if isinstance(custom_id, int) and not isinstance(custom_id, bool):
                custom_id = str(custom_id)
        if msg_col is not None or body_col is not None:
            col = msg_col or body_col
            assert col is not None
            if col not in obj:
                raise InputError(self.path, pos, col, "missing (the spec maps it)")
            value = _json_cell(obj[col], self.path, pos, col)
            record = {k: v for k, v in obj.items() if k != col}
            if msg_col is not None:
                body = {"messages": _drop_nulls(value)}
            elif isinstance(value, dict):
                body = {k: v for k, v in value.items() if v is not None or self.spec.format != "parquet"}
                if "messages" in body:
                    body["messages"] = _drop_nulls(body["messages"])
            else:
                raise InputError(
                    self.path, pos, col, f"expected a request object, got {type(value).__name__}"
                )
        elif "body" in obj and ("url" in obj or "method" in obj):
            body = self._batch_body(obj, pos)
        elif "messages" in obj:
            body = {k: v for k, v in obj.items() if k != "custom_id"}
            if self.spec.format == "parquet":
                # A Parquet column holds every field for every row: null means "not set".
                body = {k: v for k, v in body.items() if v is not None}
                body["messages"] = _drop_nulls(body.get("messages"))
        elif self.template is not None:
            record = obj
            body = {"messages": self._fill(obj, pos)}
        else:
            raise InputError(
                self.path,
                pos,
                "messages",
                "missing (each row needs messages, a Batch API body, or a template in the spec)",
            )
        body = {**self.defaults, **body}
        self._check_body(body, pos)
        model = body.pop("model", None)
        if model is not None and model not in self.models:
            raise InputError(
                self.path,
                pos,
                "model",
                f"unknown model {model!r}: this job sends to {', '.join(sorted(self.models))} "
                "(drop the field, or add the model with --model / --fallback)",
            )
        h = body_hash(body)
        if custom_id is None:
            custom_id = f"row-{seq:08d}-{h[:12]}"
        elif not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_ID_LEN:
            raise InputError(
                self.path,
                pos,
                "custom_id",
                f"expected a non-empty string of at most {MAX_ID_LEN} characters",
            )
        return Row(seq=seq, custom_id=custom_id, body=body, body_hash=h, record=record)

    def _batch_body(self, obj: dict[str, Any], pos: str) -> dict[str, Any]:
        method = obj.get("method", "POST")
        if method != "POST":
            raise InputError(self.path, pos, "method", f"expected POST, got {method!r}")
        url = obj.get("url", "/v1/chat/completions")
        if url not in CHAT_URLS:
            raise InputError(self.path, pos, "url", f"expected /v1/chat/completions, got {url!r}")
        body = obj["body"]
        if not isinstance(body, dict):
            raise InputError(self.path, pos, "body", f"expected an object, got {type(body).__name__}")
        if self.spec.format == "parquet":
            body = {k: v for k, v in body.items() if v is not None}
            if "messages" in body:
                body["messages"] = _drop_nulls(body["messages"])
        if "messages" not in body:
            raise InputError(self.path, pos, "body.messages", "missing")
        return dict(body)

    def _check_body(self, body: dict[str, Any], pos: str) -> None:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise InputError(self.path, pos, "messages", "expected a non-empty list of messages")
        for i, m in enumerate(msgs):
            where = f"messages[{i}]"
            if not isinstance(m, dict):
                raise InputError(self.path, pos, where, f"expected an object, got {type(m).__name__}")
            role = m.get("role")
            if role not in ROLES:
                raise InputError(
                    self.path,
                    pos,
                    f"{where}.role",
                    f"expected one of {', '.join(sorted(ROLES))}, got {role!r}",
                )
            content = m.get("content")
            if content is None:
                if role != "assistant":
                    raise InputError(self.path, pos, f"{where}.content", "missing")
            elif not isinstance(content, str | list):
                raise InputError(
                    self.path,
                    pos,
                    f"{where}.content",
                    f"expected a string or a list of parts, got {type(content).__name__}",
                )
        for key, types in _FIELD_TYPES.items():
            if key in body:
                v = body[key]
                bad = not isinstance(v, types) or (isinstance(v, bool) and bool not in types)
                if bad:
                    names = " or ".join(t.__name__.replace("NoneType", "null") for t in types)
                    raise InputError(self.path, pos, key, f"expected {names}, got {type(v).__name__}")

    def _fill(self, record: Mapping[str, Any], pos: str) -> list[dict[str, Any]]:
        assert self.template is not None
        out: list[dict[str, Any]] = []
        for m in self.template.messages:
            msg = dict(m)
            content = msg.get("content")
            if isinstance(content, str):
                msg["content"] = self._fill_text(content, record, pos)
            elif isinstance(content, list):
                parts = []
                for part in content:
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        part = {**part, "text": self._fill_text(part["text"], record, pos)}
                    parts.append(part)
                msg["content"] = parts
            out.append(msg)
        return out

    def _fill_text(self, text: str, record: Mapping[str, Any], pos: str) -> str:
        def sub(m: re.Match[str]) -> str:
            tok = m.group(0)
            if tok == "{{":
                return "{"
            if tok == "}}":
                return "}"
            col = m.group(1)
            if col not in record:
                raise InputError(self.path, pos, col, "missing (the template uses this column)")
            value = record[col]
            if value is None:
                return ""
            if isinstance(value, str):
                return value
            if isinstance(value, Decimal):
                return str(value)
            if isinstance(value, bytes):
                return value.decode("utf-8", "replace")
            return orjson.dumps(value, default=str).decode()

        return _PLACEHOLDER.sub(sub, text)


def _json_cell(value: Any, path: str, pos: str, col: str) -> Any:
    """A mapped column's value: already structured (Parquet) or JSON text (JSONL, CSV-ish)."""
    if isinstance(value, str | bytes):
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            raise InputError(path, pos, col, f"not valid JSON: {exc}") from None
    return value


def _drop_nulls(messages: Any) -> Any:
    """Parquet structs hold every field of every message; drop the absent (null) ones."""
    if not isinstance(messages, list):
        return messages
    return [
        {k: v for k, v in m.items() if v is not None or k == "content"} if isinstance(m, dict) else m
        for m in messages
    ]
