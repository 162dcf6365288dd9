"""Deterministic fake instances of JSON Schemas, for the mock provider's structured outputs.

:func:`fake_instance` returns a value that validates against the given schema for the subset
of JSON Schema that structured outputs and tool parameters use in practice:

* ``type`` (one name, or a list such as ``["string", "null"]``: the first non-null one wins),
  and the type implied by ``properties`` / ``items`` when ``type`` is absent;
* objects: ``properties`` (all of them while shallow, only ``required`` ones deeper than
  :data:`MAX_DEPTH`), ``required``, ``minProperties`` through extra ``additionalProperties``;
* ``enum`` (one member picked by the seed), ``const``;
* strings: ``minLength`` / ``maxLength`` and the formats ``date-time``, ``date``, ``time``,
  ``email``, ``uuid``, ``uri`` / ``url``, ``ipv4``, ``hostname`` (``pattern`` is not honoured);
* integers and numbers: ``minimum`` / ``maximum``, their ``exclusive`` forms, ``multipleOf``;
* booleans and null;
* arrays: ``items``, ``prefixItems``, ``minItems`` / ``maxItems``, ``uniqueItems`` (best effort);
* ``anyOf`` / ``oneOf`` (the first branch), ``allOf`` (branches merged), local ``$ref``
  (``#/$defs/...``, ``#/definitions/...`` or any JSON pointer into the root schema).

The same ``(schema, seed)`` always gives the same value.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from typing import Any

__all__ = ["MAX_DEPTH", "fake_instance"]

MAX_DEPTH = 6
"""Below this nesting depth optional properties are left out and arrays get their minimum."""

_WORDS = (
    "alpha", "bravo", "cedar", "delta", "ember", "fjord", "grove", "harbor",
    "indigo", "juniper", "kestrel", "lumen", "meadow", "nimbus", "orchid", "prairie",
)  # fmt: skip

_TYPE_ORDER = ("object", "array", "string", "integer", "number", "boolean", "null")


def fake_instance(schema: Mapping[str, Any] | bool, seed: int) -> Any:
    """Return a value valid against ``schema``, chosen deterministically from ``seed``."""
    return _Faker(schema, seed).make(schema, 0)


class _Faker:
    """One generation run: the root schema (for ``$ref``) and a seeded random source."""

    def __init__(self, root: Mapping[str, Any] | bool, seed: int) -> None:
        self.root = root
        self.rng = random.Random(seed)

    def make(self, schema: object, depth: int) -> Any:
        if schema is True or schema is False:
            return "mock" if schema else None
        if not isinstance(schema, Mapping):  # not a schema at all: anything goes
            return "mock"
        schema = self._flatten(schema)
        if "const" in schema:
            return schema["const"]
        enum = schema.get("enum")
        if isinstance(enum, list) and enum:
            return enum[self.rng.randrange(len(enum))]
        return self._by_type(schema, _pick_type(schema), depth)

    def _flatten(self, schema: Mapping[str, Any]) -> Mapping[str, Any]:
        """Resolve ``$ref``, ``allOf`` and ``anyOf``/``oneOf`` into one plain schema."""
        for _ in range(64):  # bounded: a $ref cycle without content cannot loop forever
            if "$ref" in schema:
                rest = {k: v for k, v in schema.items() if k != "$ref"}
                schema = _merge(self._resolve(str(schema["$ref"])), rest)
            elif "allOf" in schema:
                rest = {k: v for k, v in schema.items() if k != "allOf"}
                for part in schema["allOf"]:
                    rest = _merge(rest, part if isinstance(part, Mapping) else {})
                schema = rest
            elif (branch := _first_branch(schema)) is not None:
                rest = {k: v for k, v in schema.items() if k not in ("anyOf", "oneOf")}
                schema = _merge(rest, branch)
            else:
                return schema
        return schema

    def _resolve(self, ref: str) -> Mapping[str, Any]:
        if not ref.startswith("#"):
            return {}
        node: Any = self.root
        for raw in ref[1:].split("/"):
            if not raw:
                continue
            key = raw.replace("~1", "/").replace("~0", "~")
            if isinstance(node, Mapping) and key in node:
                node = node[key]
            elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
                node = node[int(key)]
            else:
                return {}
        return node if isinstance(node, Mapping) else {}

    def _by_type(self, schema: Mapping[str, Any], kind: str, depth: int) -> Any:
        if kind == "object":
            return self._object(schema, depth)
        if kind == "array":
            return self._array(schema, depth)
        if kind == "integer":
            return self._integer(schema)
        if kind == "number":
            return self._number(schema)
        if kind == "boolean":
            return self.rng.random() < 0.5
        if kind == "null":
            return None
        return self._string(schema)

    def _object(self, schema: Mapping[str, Any], depth: int) -> dict[str, Any]:
        props = schema.get("properties")
        props = props if isinstance(props, Mapping) else {}
        required = [r for r in schema.get("required", ()) if isinstance(r, str)]
        names = list(props) if depth < MAX_DEPTH else [n for n in props if n in required]
        out: dict[str, Any] = {n: self.make(props[n], depth + 1) for n in names}
        for name in required:  # required but not described: anything goes
            if name not in out:
                out[name] = self._extra_value(schema, depth)
        wanted = int(schema.get("minProperties", 0))
        index = 0
        while len(out) < wanted:
            out.setdefault(f"extra_{index}", self._extra_value(schema, depth))
            index += 1
        return out

    def _extra_value(self, schema: Mapping[str, Any], depth: int) -> Any:
        extra = schema.get("additionalProperties", True)
        if isinstance(extra, Mapping):
            return self.make(extra, depth + 1)
        return _WORDS[self.rng.randrange(len(_WORDS))]

    def _array(self, schema: Mapping[str, Any], depth: int) -> list[Any]:
        low = int(schema.get("minItems", 0))
        high = schema.get("maxItems")
        prefix = schema.get("prefixItems")
        prefix = prefix if isinstance(prefix, list) else []
        count = max(low, 0) if depth >= MAX_DEPTH else max(low, len(prefix), 1 + self.rng.randrange(2))
        if isinstance(high, int):
            count = min(count, high)
        items = schema.get("items", {})
        item_schema: Mapping[str, Any] | bool = items if isinstance(items, Mapping | bool) else {}
        out: list[Any] = []
        unique = bool(schema.get("uniqueItems"))
        for i in range(count):
            sub = prefix[i] if i < len(prefix) else item_schema
            out.append(self._item(sub, depth, out if unique else None))
        return out

    def _item(self, sub: Mapping[str, Any] | bool, depth: int, seen: list[Any] | None) -> Any:
        value = self.make(sub, depth + 1)
        if seen is None:
            return value
        for _ in range(16):
            if value not in seen:
                break
            value = self.make(sub, depth + 1)
        return value

    def _integer(self, schema: Mapping[str, Any]) -> int:
        low, high = _bounds(schema, integer=True)
        step = schema.get("multipleOf")
        if isinstance(step, int | float) and step > 0:
            first = math.ceil(low / step)
            last = math.floor(high / step)
            if first <= last:
                return int(self.rng.randint(first, min(last, first + 100)) * step)
        return self.rng.randint(int(low), int(high))

    def _number(self, schema: Mapping[str, Any]) -> float:
        low, high = _bounds(schema, integer=False)
        step = schema.get("multipleOf")
        if isinstance(step, int | float) and step > 0:
            first = math.ceil(low / step)
            last = math.floor(high / step)
            if first <= last:
                return float(self.rng.randint(first, min(last, first + 100)) * step)
        value = round(self.rng.uniform(low, high), 2)
        return value if low <= value <= high else (low + high) / 2

    def _string(self, schema: Mapping[str, Any]) -> str:
        text = _formatted(str(schema.get("format", "")), self.rng)
        if text is None:
            text = f"{_WORDS[self.rng.randrange(len(_WORDS))]}-{self.rng.randrange(1000):03d}"
        low = int(schema.get("minLength", 0))
        high = schema.get("maxLength")
        if len(text) < low:
            text += "x" * (low - len(text))
        if isinstance(high, int) and len(text) > high:
            text = text[:high]
        return text


def _pick_type(schema: Mapping[str, Any]) -> str:
    kind = schema.get("type")
    if isinstance(kind, str):
        return kind
    if isinstance(kind, list) and kind:
        real = [k for k in kind if k != "null" and k in _TYPE_ORDER]
        return str(real[0]) if real else str(kind[0])
    if "properties" in schema or "required" in schema or "additionalProperties" in schema:
        return "object"
    if "items" in schema or "prefixItems" in schema or "minItems" in schema:
        return "array"
    if any(k in schema for k in ("minimum", "maximum", "multipleOf")):
        return "number"
    return "string"


def _first_branch(schema: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for key in ("anyOf", "oneOf"):
        branches = schema.get(key)
        if isinstance(branches, list) and branches:
            first = branches[0]
            return first if isinstance(first, Mapping) else {}
    return None


def _merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Shallow-merge two schemas, uniting ``properties`` and ``required``."""
    out = dict(base)
    for key, value in extra.items():
        if key == "properties" and isinstance(out.get(key), Mapping):
            out[key] = {**out[key], **value}
        elif key == "required" and isinstance(out.get(key), list):
            out[key] = [*out[key], *(v for v in value if v not in out[key])]
        else:
            out[key] = value
    return out


def _bounds(schema: Mapping[str, Any], *, integer: bool) -> tuple[float, float]:
    """Inclusive bounds from (exclusive) minimum/maximum, defaulting to a small range."""
    gap = 1 if integer else 0.01
    low = schema.get("minimum")
    high = schema.get("maximum")
    ex_low = schema.get("exclusiveMinimum")
    ex_high = schema.get("exclusiveMaximum")
    lo = float(low) if isinstance(low, int | float) else None
    hi = float(high) if isinstance(high, int | float) else None
    if isinstance(ex_low, int | float) and not isinstance(ex_low, bool):
        lo = max(lo, ex_low + gap) if lo is not None else ex_low + gap
    if isinstance(ex_high, int | float) and not isinstance(ex_high, bool):
        hi = min(hi, ex_high - gap) if hi is not None else ex_high - gap
    if lo is None:
        lo = min(0.0, hi - 100) if hi is not None else 0.0
    if hi is None:
        hi = lo + 100
    if integer:
        lo, hi = float(math.ceil(lo)), float(math.floor(hi))
    return lo, max(lo, hi)


def _formatted(fmt: str, rng: random.Random) -> str | None:
    n = rng.randrange(10_000)
    table = {
        "date-time": f"2024-{1 + n % 12:02d}-{1 + n % 28:02d}T{n % 24:02d}:{n % 60:02d}:00Z",
        "date": f"2024-{1 + n % 12:02d}-{1 + n % 28:02d}",
        "time": f"{n % 24:02d}:{n % 60:02d}:00Z",
        "email": f"user{n}@example.com",
        "uuid": f"{rng.getrandbits(32):08x}-0000-4000-8000-{rng.getrandbits(48):012x}",
        "uri": f"https://example.com/item/{n}",
        "url": f"https://example.com/item/{n}",
        "ipv4": f"10.0.{n % 256}.{n // 256 % 256}",
        "hostname": f"host{n}.example.com",
    }
    return table.get(fmt)
