"""The job spec: a TOML file (and/or command-line flags) turned into frozen value objects.

Everything is validated here, once, before anything is sent. Errors name the file and the
field (``jobs/x.toml: limits.rpm: expected a whole number >= 0, got 'fast'``). Flags are
applied as overrides on the raw TOML mapping before validation, so a job can run with no
spec file at all and the same checks apply.

Paths in a spec file (``input.path``) are relative to the spec file; ``db`` and ``out`` are
relative to the directory the command runs in, like the paths given as flags.

The database: ``--db`` beats the spec's ``db``, which beats ``$PIPELINE_DB``, then pipeline.db.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pipeline.errors import SpecError

__all__ = [
    "BreakerSpec",
    "EndpointSpec",
    "InputSpec",
    "JobSpec",
    "LimitsSpec",
    "MockSpec",
    "ModelPrice",
    "PolicySpec",
    "RetrySpec",
    "RouteSpec",
    "TemplateSpec",
    "default_db",
    "is_safe_name",
    "load_spec",
]

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MOCK_URL = "mock"
DEFAULT_ENDPOINT = "default"
DEFAULT_KEY_ENV = "OPENAI_API_KEY"
DB_ENV = "PIPELINE_DB"
DEFAULT_DB = "pipeline.db"


def default_db() -> str:
    """The database when neither ``--db`` nor the spec names one: ``$PIPELINE_DB``, else pipeline.db."""
    return os.environ.get(DB_ENV) or DEFAULT_DB


def is_safe_name(name: str) -> bool:
    """A run id or job name usable as one path component on every OS."""
    return bool(SAFE_NAME.match(name)) and name not in {".", ".."}


@dataclass(frozen=True)
class EndpointSpec:
    """An OpenAI-compatible server. The key itself is never stored, only its variable's name."""

    name: str
    base_url: str
    api_key_env: str = DEFAULT_KEY_ENV
    provider: str | None = None  # price catalogue provider id (openai, openrouter, ...)
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def is_mock(self) -> bool:
        return self.base_url == MOCK_URL

    @property
    def is_local(self) -> bool:
        host = urlparse(self.base_url).hostname or ""
        return self.is_mock or host in {"localhost", "127.0.0.1", "::1"} or host.startswith("127.")


@dataclass(frozen=True)
class LimitsSpec:
    """Per-route limits; 0 means no limit of that kind."""

    rpm: int = 0
    tpm: int = 0
    concurrency: int = 64


@dataclass(frozen=True)
class RouteSpec:
    """One step of the fallback chain: a model on an endpoint, with its own limits."""

    endpoint: str
    model: str
    limits: LimitsSpec
    stream: bool = False  # send with stream: true and assemble the answer from the SSE chunks

    @property
    def key(self) -> str:
        return f"{self.endpoint}/{self.model}"


@dataclass(frozen=True)
class RetrySpec:
    """Retry timing. One retry layer only: the HTTP client itself never retries."""

    max_attempts_per_route: int = 4
    max_attempts_per_request: int = 10
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    max_retry_after_s: float = 300.0
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 600.0
    deadline_s: float = 1800.0
    stream_idle_timeout_s: float = 60.0  # streamed: no byte for this long fails the attempt (0 = none)


@dataclass(frozen=True)
class BreakerSpec:
    """Per-route circuit breaker: open when recent attempts mostly fail transiently."""

    enabled: bool = True
    failure_rate: float = 0.5
    min_requests: int = 20
    window_s: float = 30.0
    cooldown_s: float = 15.0


@dataclass(frozen=True)
class PolicySpec:
    """Choices in the failure classification table that users may change."""

    content_filter: str = "fallback"  # fallback | fail | accept
    invalid_answer_retries: int = 2  # structured answers invalid for their schema, retried
    reasoning_exhausted: str = "fail"  # fail | grow (retry with max_tokens x max_tokens_growth)
    max_tokens_growth: float = 2.0
    max_tokens_cap: int = 65_536


@dataclass(frozen=True)
class TemplateSpec:
    """Messages with ``{column}`` placeholders filled from each data record."""

    messages: tuple[Mapping[str, Any], ...]
    keep_columns: tuple[str, ...] | None = None  # None = keep every input column in outputs


@dataclass(frozen=True)
class InputSpec:
    path: Path
    format: str = "auto"  # auto | jsonl | parquet
    id_column: str | None = None  # the column that becomes custom_id
    messages_column: str | None = None  # a column holding ready-made messages
    body_column: str | None = None  # a column holding a whole request body (object or JSON text)


@dataclass(frozen=True)
class ModelPrice:
    """Prices in USD per million tokens; overrides or extends the price catalogue."""

    input: Decimal
    output: Decimal
    cached_input: Decimal | None = None
    cache_write: Decimal | None = None
    reasoning: Decimal | None = None


@dataclass(frozen=True)
class MockSpec:
    """Options for the in-process mock server used by endpoints whose base_url is "mock"."""

    latency_ms: float = 0.0
    rate_429: float = 0.0
    rate_500: float = 0.0
    seed: int = 0
    models: tuple[str, ...] | None = None  # None: the models of the job's fallback chain


@dataclass(frozen=True)
class JobSpec:
    job: str
    input: InputSpec
    endpoints: Mapping[str, EndpointSpec]
    routes: tuple[RouteSpec, ...]  # primary first, then fallbacks in order
    retry: RetrySpec = RetrySpec()
    policy: PolicySpec = PolicySpec()
    breaker: BreakerSpec = BreakerSpec()
    request_defaults: Mapping[str, Any] = field(default_factory=dict)
    template: TemplateSpec | None = None
    prices: Mapping[str, ModelPrice] = field(default_factory=dict)
    budget_usd: Decimal | None = None
    db: str = field(default_factory=default_db)
    out: Path = Path("out")
    run_id: str | None = None
    new_run: bool = False
    on_bad_row: str = "stop"
    mock: MockSpec | None = None
    stream: bool = False  # the default of every route that does not set its own
    recover_stored: bool = False  # send with store + metadata; look in-flight answers up on resume
    grace_s: float = 30.0  # on the first Ctrl-C / SIGTERM, how long in-flight requests may finish
    source: str = "<flags>"  # the spec file, for messages

    @property
    def db_url(self) -> str:
        return db_url(self.db)

    def redacted(self) -> dict[str, Any]:
        """The spec as plain data for the run record. Holds key variable names, never keys."""
        return {
            "job": self.job,
            "input": {
                "path": str(self.input.path),
                "format": self.input.format,
                "id_column": self.input.id_column,
                "messages_column": self.input.messages_column,
                "body_column": self.input.body_column,
            },
            "endpoints": {
                n: {
                    "base_url": e.base_url,
                    "api_key_env": e.api_key_env,
                    "provider": e.provider,
                    "headers": [h for h, _ in e.headers],
                }
                for n, e in self.endpoints.items()
            },
            "routes": [
                {"endpoint": r.endpoint, "model": r.model, **r.limits.__dict__, "stream": r.stream}
                for r in self.routes
            ],
            "stream": self.stream,
            "retry": dict(self.retry.__dict__),
            "policy": dict(self.policy.__dict__),
            "breaker": dict(self.breaker.__dict__),
            "request": dict(self.request_defaults),
            "template": None
            if self.template is None
            else {
                "messages": [dict(m) for m in self.template.messages],
                "keep_columns": self.template.keep_columns,
            },
            "prices": {
                m: {k: None if v is None else str(v) for k, v in p.__dict__.items()}
                for m, p in self.prices.items()
            },
            "budget_usd": None if self.budget_usd is None else str(self.budget_usd),
            "on_bad_row": self.on_bad_row,
            "recovery": {"stored_completions": self.recover_stored},
            "grace_s": self.grace_s,
            "out": str(self.out),
            "mock": None
            if self.mock is None
            else {**self.mock.__dict__, "models": self.mock.models and list(self.mock.models)},
        }


def db_display(db: str) -> str:
    """The database as it may be shown (logs, messages): a URL's password hidden."""
    if "://" not in db:
        return db
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(db).render_as_string(hide_password=True)
    except ArgumentError:
        return db.split("@")[-1]


def db_url(db: str) -> str:
    """A database flag is a path to a SQLite file or a SQLAlchemy URL."""
    if "://" in db:
        return db
    return f"sqlite+aiosqlite:///{db}"


# ----------------------------------------------------------------------------- parsing


_TOP_KEYS = {
    "job",
    "input",
    "endpoints",
    "model",
    "endpoint",
    "fallbacks",
    "limits",
    "retry",
    "policy",
    "request",
    "template",
    "prices",
    "budget_usd",
    "db",
    "out",
    "run_id",
    "new_run",
    "on_bad_row",
    "mock",
    "recovery",
    "grace_s",
    "stream",
    "breaker",
}


class _Reader:
    """Typed access to a raw mapping with error messages that name the file and field."""

    def __init__(self, source: str, *, need_input: bool = True) -> None:
        self.source = source
        self.need_input = need_input  # False for workers: requests come from the database

    def fail(self, where: str, message: str) -> SpecError:
        return SpecError(f"{self.source}: {where}" if where else self.source, message)

    def table(self, raw: Any, where: str, allowed: set[str]) -> dict[str, Any]:
        if not isinstance(raw, dict):
            raise self.fail(where, f"expected a table, got {_show(raw)}")
        unknown = sorted(set(raw) - allowed)
        if unknown:
            prefix = f"{where}." if where else ""
            raise self.fail(
                f"{prefix}{unknown[0]}",
                f"unknown field (allowed: {', '.join(sorted(allowed))})",
            )
        return raw

    def string(self, raw: Any, where: str) -> str:
        if not isinstance(raw, str) or not raw.strip():
            raise self.fail(where, f"expected a non-empty string, got {_show(raw)}")
        return raw

    def integer(self, raw: Any, where: str, minimum: int = 0) -> int:
        if isinstance(raw, bool) or not isinstance(raw, int) or raw < minimum:
            raise self.fail(where, f"expected a whole number >= {minimum}, got {_show(raw)}")
        return raw

    def number(self, raw: Any, where: str, minimum: float = 0.0) -> float:
        if isinstance(raw, bool) or not isinstance(raw, int | float) or raw < minimum:
            raise self.fail(where, f"expected a number >= {minimum:g}, got {_show(raw)}")
        return float(raw)

    def decimal(self, raw: Any, where: str) -> Decimal:
        if isinstance(raw, bool) or not isinstance(raw, int | float | str):
            raise self.fail(where, f"expected a number, got {_show(raw)}")
        try:
            value = Decimal(str(raw))
        except InvalidOperation:
            raise self.fail(where, f"expected a number, got {_show(raw)}") from None
        if not value.is_finite() or value < 0:
            raise self.fail(where, f"expected a number >= 0, got {_show(raw)}")
        return value

    def boolean(self, raw: Any, where: str) -> bool:
        if not isinstance(raw, bool):
            raise self.fail(where, f"expected true or false, got {_show(raw)}")
        return raw

    def choice(self, raw: Any, where: str, options: tuple[str, ...]) -> str:
        if raw not in options:
            raise self.fail(where, f"expected one of {', '.join(options)}, got {_show(raw)}")
        return str(raw)

    def name(self, raw: Any, where: str) -> str:
        value = self.string(raw, where)
        if not is_safe_name(value):
            raise self.fail(
                where,
                f"{value!r} is not a safe file name "
                "(letters, digits, '.', '_', '-'; starting with a letter or digit; at most 128)",
            )
        return value


def _show(raw: Any) -> str:
    text = repr(raw)
    return text if len(text) <= 60 else text[:57] + "..."


def load_spec(
    path: str | Path | None, overrides: Mapping[str, Any] | None = None, *, need_input: bool = True
) -> JobSpec:
    """Read a spec file (or none), apply flag overrides, validate, return the frozen spec.

    ``overrides`` uses the spec's own keys (``model``, ``fallbacks``, ``limits.rpm`` as a
    nested dict...), as built by the command line, plus ``base_url`` and ``api_key_env``
    for the default endpoint.
    """
    raw: dict[str, Any] = {}
    base_dir = Path.cwd()
    source = "<flags>"
    if path is not None:
        spec_path = Path(path)
        source = str(path)
        if not spec_path.is_file():
            raise SpecError(source, "spec file not found")
        try:
            raw = tomllib.loads(spec_path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise SpecError(source, f"not valid TOML: {exc}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise SpecError(source, f"cannot read: {exc}") from None
        base_dir = spec_path.resolve().parent
        if "input" in raw and isinstance(raw["input"], dict) and "path" in raw["input"]:
            raw["input"]["path"] = str(base_dir / str(raw["input"]["path"]))
    ov = dict(overrides or {})
    endpoint_ov = {k: ov.pop(k) for k in ("base_url", "api_key_env") if ov.get(k) is not None}
    for key, value in ov.items():
        _merge(raw, key, value)
    if endpoint_ov:
        # --base-url / --api-key-env: the "default" endpoint, or the spec's only one.
        eps = raw.setdefault("endpoints", {})
        if isinstance(eps, dict):
            name = DEFAULT_ENDPOINT if DEFAULT_ENDPOINT in eps or len(eps) != 1 else next(iter(eps))
            ep = eps.setdefault(name, {})
            if isinstance(ep, dict):
                ep.update(endpoint_ov)
    return _build(raw, _Reader(source, need_input=need_input), Path(path).stem if path else None)


def spec_from_record(record: Mapping[str, Any], *, db: str, out: Path) -> JobSpec:
    """The spec a run was started with, rebuilt from its record (:meth:`JobSpec.redacted`),
    for a worker that has no spec file. Keys come from this machine's environment, as always;
    endpoint header values are not recorded, so an endpoint with headers needs the spec file."""
    rec = dict(record)
    for name, ep in rec.get("endpoints", {}).items():
        if ep.get("headers"):
            raise SpecError(
                f"endpoints.{name}.headers",
                "header values are not stored with the run; pass the job's spec file to the worker",
            )
    routes = [
        {k: v for k, v in r.items() if k in {"endpoint", "model", "rpm", "tpm", "concurrency", "stream"}}
        for r in rec.get("routes", [])
    ]
    inp = {k: v for k, v in rec.get("input", {}).items() if v is not None}
    raw: dict[str, Any] = {
        "job": rec["job"],
        "input": inp,
        "endpoints": {
            n: {k: v for k, v in e.items() if k in {"base_url", "api_key_env", "provider"} and v is not None}
            for n, e in rec.get("endpoints", {}).items()
        },
        "model": routes[0] if routes else None,
        "fallbacks": routes[1:],
        "stream": rec.get("stream", False),
        "retry": rec.get("retry", {}),
        "policy": rec.get("policy", {}),
        "breaker": rec.get("breaker", {}),
        "request": rec.get("request", {}),
        "prices": {
            m: {k: v for k, v in p.items() if v is not None} for m, p in rec.get("prices", {}).items()
        },
        "on_bad_row": rec.get("on_bad_row", "stop"),
        "recovery": rec.get("recovery", {}),
        "grace_s": rec.get("grace_s", 30.0),
        "db": db,
        "out": str(out),
    }
    if rec.get("template"):
        t = rec["template"]
        raw["template"] = {
            k: v
            for k, v in {"messages": t["messages"], "keep_columns": t.get("keep_columns")}.items()
            if v is not None
        }
    if rec.get("budget_usd") is not None:
        raw["budget_usd"] = rec["budget_usd"]
    if rec.get("mock") is not None:
        raw["mock"] = {k: v for k, v in rec["mock"].items() if v is not None}
    if raw["model"] is None:
        raise SpecError("routes", "the run's record names no model")
    return _build(raw, _Reader(f"run record of {rec['job']}", need_input=False), None)


def _merge(raw: dict[str, Any], key: str, value: Any) -> None:
    if isinstance(value, dict) and isinstance(raw.get(key), dict):
        for k, v in value.items():
            _merge(raw[key], k, v)
    else:
        raw[key] = value


def _build(raw: dict[str, Any], r: _Reader, default_job: str | None) -> JobSpec:
    r.table(raw, "", _TOP_KEYS)

    inp = _input(raw.get("input"), r)
    job_raw = raw.get("job", default_job or inp.path.stem)
    job = r.name(job_raw, "job")

    endpoints = _endpoints(raw.get("endpoints"), r)
    default_limits = _limits(raw.get("limits", {}), "limits", r, LimitsSpec())
    stream = r.boolean(raw.get("stream", False), "stream")
    routes = _routes(raw, endpoints, default_limits, r, stream)

    retry = _retry(raw.get("retry", {}), r)
    breaker = _breaker(raw.get("breaker", {}), r)
    policy = _policy(raw.get("policy", {}), r)
    request = raw.get("request", {})
    if not isinstance(request, dict):
        raise r.fail("request", f"expected a table of request fields, got {_show(request)}")
    for forbidden in ("messages", "model"):
        if forbidden in request:
            raise r.fail(
                f"request.{forbidden}",
                "set the model with 'model' and messages with 'template' or the input rows",
            )
    template = _template(raw.get("template"), r)
    prices = _prices(raw.get("prices", {}), r)
    budget = raw.get("budget_usd")
    mock = _mock(raw.get("mock"), r) if "mock" in raw else None
    if mock is None and any(e.is_mock for e in endpoints.values()):
        mock = MockSpec()
    run_id = raw.get("run_id")
    recovery = r.table(raw.get("recovery", {}), "recovery", {"stored_completions"})
    return JobSpec(
        job=job,
        input=inp,
        endpoints=endpoints,
        routes=routes,
        retry=retry,
        policy=policy,
        breaker=breaker,
        request_defaults=request,
        template=template,
        prices=prices,
        budget_usd=None if budget is None else r.decimal(budget, "budget_usd"),
        db=r.string(raw["db"], "db") if "db" in raw else default_db(),
        out=Path(r.string(raw.get("out", "out"), "out")),
        run_id=None if run_id is None else r.name(run_id, "run_id"),
        new_run=r.boolean(raw.get("new_run", False), "new_run"),
        on_bad_row=r.choice(raw.get("on_bad_row", "stop"), "on_bad_row", ("stop", "skip")),
        mock=mock,
        stream=stream,
        recover_stored=r.boolean(recovery.get("stored_completions", False), "recovery.stored_completions"),
        grace_s=r.number(raw.get("grace_s", 30.0), "grace_s"),
        source=r.source,
    )


def _input(raw: Any, r: _Reader) -> InputSpec:
    if raw is None:
        raise r.fail("input", "no input given (set input.path in the spec or pass --input FILE)")
    t = r.table(raw, "input", {"path", "format", "id_column", "messages_column", "body_column"})
    if "path" not in t:
        raise r.fail("input.path", "missing (the JSONL or Parquet file to read)")
    path = Path(r.string(t["path"], "input.path"))
    fmt = r.choice(t.get("format", "auto"), "input.format", ("auto", "jsonl", "parquet"))
    if fmt == "auto":
        suffix = path.suffix.lower()
        if suffix in {".parquet", ".pq"}:
            fmt = "parquet"
        elif suffix in {".jsonl", ".json", ".ndjson"}:
            fmt = "jsonl"
        else:
            raise r.fail("input.format", f"cannot tell the format of {path.name!r}; set jsonl or parquet")
    if r.need_input and not path.is_file():
        raise r.fail("input.path", f"input file not found: {path}")
    cols = {
        k: None if t.get(k) is None else r.string(t[k], f"input.{k}")
        for k in ("id_column", "messages_column", "body_column")
    }
    if cols["messages_column"] and cols["body_column"]:
        raise r.fail("input.body_column", "set messages_column or body_column, not both")
    return InputSpec(path=path, format=fmt, **cols)


def _endpoints(raw: Any, r: _Reader) -> dict[str, EndpointSpec]:
    if raw is None:
        raise r.fail("endpoints", "no endpoint given (set [endpoints.NAME] or pass --base-url URL)")
    t = r.table(raw, "endpoints", set(raw) if isinstance(raw, dict) else set())
    if not t:
        raise r.fail("endpoints", "at least one endpoint is needed")
    out: dict[str, EndpointSpec] = {}
    for name, ep in t.items():
        where = f"endpoints.{name}"
        r.name(name, where)
        e = r.table(ep, where, {"base_url", "api_key_env", "provider", "headers"})
        if "base_url" not in e:
            raise r.fail(f"{where}.base_url", "missing (e.g. https://api.openai.com/v1, or 'mock')")
        url = r.string(e["base_url"], f"{where}.base_url").rstrip("/")
        if url != MOCK_URL:
            parsed = urlparse(url)
            if parsed.scheme not in {"http", "https"} or not parsed.hostname:
                raise r.fail(f"{where}.base_url", f"expected an http(s) URL or 'mock', got {url!r}")
        key_env = r.string(e.get("api_key_env", DEFAULT_KEY_ENV), f"{where}.api_key_env")
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key_env):
            raise r.fail(
                f"{where}.api_key_env",
                "expected the NAME of an environment variable holding the key, not the key itself",
            )
        headers_raw = e.get("headers", {})
        headers = r.table(
            headers_raw,
            f"{where}.headers",
            set(headers_raw) if isinstance(headers_raw, dict) else set(),
        )
        for hk, hv in headers.items():
            r.string(hv, f"{where}.headers.{hk}")
            if hk.lower() == "authorization":
                raise r.fail(f"{where}.headers.{hk}", "keys come from api_key_env, never the spec")
        provider = e.get("provider")
        out[name] = EndpointSpec(
            name=name,
            base_url=url,
            api_key_env=key_env,
            provider=None if provider is None else r.string(provider, f"{where}.provider"),
            headers=tuple(sorted(headers.items())),
        )
    return out


def _limits(raw: Any, where: str, r: _Reader, base: LimitsSpec) -> LimitsSpec:
    t = r.table(raw, where, {"rpm", "tpm", "concurrency"})
    return LimitsSpec(
        rpm=r.integer(t.get("rpm", base.rpm), f"{where}.rpm"),
        tpm=r.integer(t.get("tpm", base.tpm), f"{where}.tpm"),
        concurrency=r.integer(t.get("concurrency", base.concurrency), f"{where}.concurrency", 1),
    )


def _routes(
    raw: dict[str, Any],
    endpoints: dict[str, EndpointSpec],
    limits: LimitsSpec,
    r: _Reader,
    stream: bool = False,
) -> tuple[RouteSpec, ...]:
    default_ep = DEFAULT_ENDPOINT if DEFAULT_ENDPOINT in endpoints else next(iter(endpoints))
    if "model" not in raw:
        raise r.fail("model", "no model given (set model in the spec or pass --model NAME)")
    primary = raw["model"]
    if isinstance(primary, str):
        primary = {"model": primary}
        if "endpoint" in raw:
            primary["endpoint"] = raw["endpoint"]
    entries = [("model", primary)]
    fallbacks = raw.get("fallbacks", [])
    if not isinstance(fallbacks, list):
        raise r.fail("fallbacks", f"expected a list of models, got {_show(fallbacks)}")
    entries += [(f"fallbacks[{i}]", fb) for i, fb in enumerate(fallbacks)]
    routes: list[RouteSpec] = []
    for where, entry in entries:
        e = {"model": entry} if isinstance(entry, str) else entry
        t = r.table(e, where, {"model", "endpoint", "rpm", "tpm", "concurrency", "stream"})
        model = r.string(t.get("model"), f"{where}.model")
        ep = r.string(t.get("endpoint", default_ep), f"{where}.endpoint")
        if ep not in endpoints:
            raise r.fail(f"{where}.endpoint", f"no endpoint named {ep!r} (have: {', '.join(endpoints)})")
        lim = {k: t[k] for k in ("rpm", "tpm", "concurrency") if k in t}
        route = RouteSpec(
            endpoint=ep,
            model=model,
            limits=_limits(lim, where, r, limits),
            stream=r.boolean(t.get("stream", stream), f"{where}.stream"),
        )
        if any(x.key == route.key for x in routes):
            raise r.fail(where, f"route {route.key} appears twice in the fallback chain")
        routes.append(route)
    return tuple(routes)


def _retry(raw: Any, r: _Reader) -> RetrySpec:
    d = RetrySpec()
    names = set(d.__dict__)
    t = r.table(raw, "retry", names)
    values: dict[str, Any] = {}
    for k in names:
        v = t.get(k, getattr(d, k))
        if isinstance(getattr(d, k), int):
            values[k] = r.integer(v, f"retry.{k}", 1)
        else:
            values[k] = r.number(v, f"retry.{k}")
    return RetrySpec(**values)


def _policy(raw: Any, r: _Reader) -> PolicySpec:
    d = PolicySpec()
    t = r.table(raw, "policy", set(d.__dict__))
    growth = r.number(t.get("max_tokens_growth", d.max_tokens_growth), "policy.max_tokens_growth")
    if growth <= 1:
        raise r.fail("policy.max_tokens_growth", f"expected a factor above 1, got {growth:g}")
    return PolicySpec(
        content_filter=r.choice(
            t.get("content_filter", d.content_filter), "policy.content_filter", ("fallback", "fail", "accept")
        ),
        invalid_answer_retries=r.integer(
            t.get("invalid_answer_retries", d.invalid_answer_retries), "policy.invalid_answer_retries"
        ),
        reasoning_exhausted=r.choice(
            t.get("reasoning_exhausted", d.reasoning_exhausted),
            "policy.reasoning_exhausted",
            ("fail", "grow"),
        ),
        max_tokens_growth=growth,
        max_tokens_cap=r.integer(t.get("max_tokens_cap", d.max_tokens_cap), "policy.max_tokens_cap", 1),
    )


def _breaker(raw: Any, r: _Reader) -> BreakerSpec:
    d = BreakerSpec()
    t = r.table(raw, "breaker", set(d.__dict__))
    rate = r.number(t.get("failure_rate", d.failure_rate), "breaker.failure_rate")
    if not 0 < rate <= 1:
        raise r.fail("breaker.failure_rate", f"expected a share in (0, 1], got {rate:g}")
    return BreakerSpec(
        enabled=r.boolean(t.get("enabled", d.enabled), "breaker.enabled"),
        failure_rate=rate,
        min_requests=r.integer(t.get("min_requests", d.min_requests), "breaker.min_requests", 1),
        window_s=r.number(t.get("window_s", d.window_s), "breaker.window_s"),
        cooldown_s=r.number(t.get("cooldown_s", d.cooldown_s), "breaker.cooldown_s"),
    )


def _template(raw: Any, r: _Reader) -> TemplateSpec | None:
    if raw is None:
        return None
    t = r.table(raw, "template", {"messages", "keep_columns"})
    msgs = t.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise r.fail("template.messages", "expected a non-empty list of {role, content} tables")
    for i, m in enumerate(msgs):
        where = f"template.messages[{i}]"
        if not isinstance(m, dict) or "role" not in m:
            raise r.fail(where, "expected a table with a role")
        r.string(m["role"], f"{where}.role")
        if "content" in m and not isinstance(m["content"], str | list):
            raise r.fail(f"{where}.content", "expected a string or a list of content parts")
    keep = t.get("keep_columns")
    if keep is not None and (not isinstance(keep, list) or not all(isinstance(c, str) for c in keep)):
        raise r.fail("template.keep_columns", "expected a list of column names")
    return TemplateSpec(messages=tuple(msgs), keep_columns=None if keep is None else tuple(keep))


def _prices(raw: Any, r: _Reader) -> dict[str, ModelPrice]:
    t = r.table(raw, "prices", set(raw) if isinstance(raw, dict) else set())
    out: dict[str, ModelPrice] = {}
    for model, p in t.items():
        where = f"prices.{model}"
        pt = r.table(p, where, {"input", "output", "cached_input", "cache_write", "reasoning"})
        for need in ("input", "output"):
            if need not in pt:
                raise r.fail(f"{where}.{need}", "missing (USD per million tokens)")
        opt = {
            k: r.decimal(pt[k], f"{where}.{k}")
            for k in ("cached_input", "cache_write", "reasoning")
            if k in pt
        }
        out[model] = ModelPrice(
            input=r.decimal(pt["input"], f"{where}.input"),
            output=r.decimal(pt["output"], f"{where}.output"),
            **opt,
        )
    return out


def _mock(raw: Any, r: _Reader) -> MockSpec:
    t = r.table(raw, "mock", {"latency_ms", "rate_429", "rate_500", "seed", "models"})
    models = t.get("models")
    if models is not None and (not isinstance(models, list) or not all(isinstance(m, str) for m in models)):
        raise r.fail("mock.models", "expected a list of model names")
    rates = {k: r.number(t.get(k, 0.0), f"mock.{k}") for k in ("rate_429", "rate_500")}
    for k, v in rates.items():
        if v > 1:
            raise r.fail(f"mock.{k}", f"expected a share between 0 and 1, got {v:g}")
    return MockSpec(
        latency_ms=r.number(t.get("latency_ms", 0.0), "mock.latency_ms"),
        seed=r.integer(t.get("seed", 0), "mock.seed"),
        models=None if models is None else tuple(models),
        **rates,
    )


def resolve_api_key(endpoint: EndpointSpec, environ: Mapping[str, str] | None = None) -> str | None:
    """The endpoint's key from its environment variable. Remote endpoints must have one."""
    env = os.environ if environ is None else environ
    key = env.get(endpoint.api_key_env)
    if key:
        return key
    if endpoint.is_local:
        return None
    raise SpecError(
        f"endpoints.{endpoint.name}.api_key_env",
        f"environment variable {endpoint.api_key_env} is not set; "
        f"export it with the API key for {endpoint.base_url}",
    )
