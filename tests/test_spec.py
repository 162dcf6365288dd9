"""Unit tests of the job spec: TOML and flags into frozen, validated value objects."""

from __future__ import annotations

import dataclasses
import json
from decimal import Decimal
from pathlib import Path

import pytest

from pipeline.errors import SpecError
from pipeline.spec import (
    EndpointSpec,
    InputSpec,
    JobSpec,
    LimitsSpec,
    ModelPrice,
    PolicySpec,
    RetrySpec,
    RouteSpec,
    load_spec,
    resolve_api_key,
)

FULL_SPEC = """
job = "demo"
model = "gpt-4o-mini"
fallbacks = ["gpt-4o", { model = "llama-3", endpoint = "local", rpm = 5, concurrency = 2 }]
budget_usd = "12.50"
on_bad_row = "skip"
run_id = "run-1"

[input]
path = "data/in.jsonl"
id_column = "qid"

[endpoints.openai]
base_url = "https://api.openai.com/v1/"
api_key_env = "MY_OPENAI_KEY"
provider = "openai"
headers = { "X-Title" = "demo" }

[endpoints.local]
base_url = "http://localhost:8000/v1"

[limits]
rpm = 100
tpm = 50000
concurrency = 8

[retry]
max_attempts_per_route = 2
backoff_base_s = 0.1

[policy]
content_filter = "fail"

[request]
temperature = 0
max_tokens = 64

[template]
messages = [{ role = "user", content = "Q: {question}" }]
keep_columns = ["qid"]

[prices."gpt-4o-mini"]
input = 0.15
output = "0.60"
cached_input = 0.075
"""

# A minimal valid spec; error cases below change one thing in it.
MINIMAL = """
model = "m"
{top}

[input]
path = "in.jsonl"

[endpoints.default]
base_url = "https://api.example.com/v1"
{tables}
"""


def write_spec(folder: Path, text: str, name: str = "job.toml") -> Path:
    """Write a spec file (and the default input file it points at) into ``folder``."""
    (folder / "in.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    path = folder / name
    path.write_text(text)
    return path


def minimal(top: str = "", tables: str = "") -> str:
    return MINIMAL.format(top=top, tables=tables)


def test_full_spec_loads_into_frozen_value_objects(tmp_path: Path) -> None:
    """Every section of a full TOML spec lands in the right frozen field with the right type."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "in.jsonl").write_text("{}\n")
    path = tmp_path / "demo.toml"
    path.write_text(FULL_SPEC)

    spec = load_spec(path, {})

    assert spec.job == "demo"
    assert spec.source == str(path)
    assert spec.input.path == (tmp_path / "data" / "in.jsonl").resolve()
    assert spec.input.format == "jsonl"
    assert spec.input.id_column == "qid"
    assert spec.endpoints["openai"] == EndpointSpec(
        name="openai",
        base_url="https://api.openai.com/v1",
        api_key_env="MY_OPENAI_KEY",
        provider="openai",
        headers=(("X-Title", "demo"),),
    )
    assert spec.endpoints["local"].base_url == "http://localhost:8000/v1"
    defaults = LimitsSpec(rpm=100, tpm=50000, concurrency=8)
    assert spec.routes == (
        RouteSpec(endpoint="openai", model="gpt-4o-mini", limits=defaults),
        RouteSpec(endpoint="openai", model="gpt-4o", limits=defaults),
        RouteSpec(endpoint="local", model="llama-3", limits=LimitsSpec(rpm=5, tpm=50000, concurrency=2)),
    )
    assert spec.retry == RetrySpec(max_attempts_per_route=2, backoff_base_s=0.1)
    assert spec.policy == PolicySpec(content_filter="fail")
    assert dict(spec.request_defaults) == {"temperature": 0, "max_tokens": 64}
    assert spec.template is not None
    assert spec.template.messages == ({"role": "user", "content": "Q: {question}"},)
    assert spec.template.keep_columns == ("qid",)
    assert spec.prices == {
        "gpt-4o-mini": ModelPrice(
            input=Decimal("0.15"), output=Decimal("0.60"), cached_input=Decimal("0.075")
        )
    }
    assert spec.budget_usd == Decimal("12.50")
    assert isinstance(spec.budget_usd, Decimal)
    assert spec.on_bad_row == "skip"
    assert spec.run_id == "run-1"
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.job = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.routes[0].limits.rpm = 1  # type: ignore[misc]


def test_job_name_defaults_to_the_spec_file_stem(tmp_path: Path) -> None:
    """A spec without ``job`` is named after its file."""
    spec = load_spec(write_spec(tmp_path, minimal(), name="nightly-run.toml"))
    assert spec.job == "nightly-run"
    assert spec.routes == (RouteSpec(endpoint="default", model="m", limits=LimitsSpec()),)


def test_flags_alone_make_a_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no spec file, --input, --base-url and --model are enough; the job is named after the input."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "questions.jsonl").write_text("{}\n")

    spec = load_spec(
        None, {"input": {"path": "questions.jsonl"}, "base_url": "http://localhost:8000/v1", "model": "m"}
    )

    assert spec.source == "<flags>"
    assert spec.job == "questions"
    assert spec.input.path == Path("questions.jsonl")
    assert spec.input.format == "jsonl"
    assert spec.endpoints == {"default": EndpointSpec(name="default", base_url="http://localhost:8000/v1")}
    assert spec.routes == (RouteSpec(endpoint="default", model="m", limits=LimitsSpec()),)
    assert isinstance(spec, JobSpec)


def test_endpoint_flags_go_to_the_only_endpoint(tmp_path: Path) -> None:
    """--base-url / --api-key-env change a spec's only endpoint, whatever its name."""
    text = minimal().replace("[endpoints.default]", "[endpoints.openai]")
    spec = load_spec(
        write_spec(tmp_path, text), {"base_url": "http://127.0.0.1:9/v1", "api_key_env": "OTHER_KEY"}
    )
    assert list(spec.endpoints) == ["openai"]
    assert spec.endpoints["openai"].base_url == "http://127.0.0.1:9/v1"
    assert spec.endpoints["openai"].api_key_env == "OTHER_KEY"
    assert spec.routes[0].endpoint == "openai"


def test_endpoint_flags_go_to_the_default_endpoint_among_several(tmp_path: Path) -> None:
    """With several endpoints, --base-url changes the one named "default" and leaves the others."""
    text = minimal(tables='[endpoints.other]\nbase_url = "https://other.example.com/v1"\n')
    spec = load_spec(write_spec(tmp_path, text), {"base_url": "http://localhost:1/v1"})
    assert spec.endpoints["default"].base_url == "http://localhost:1/v1"
    assert spec.endpoints["other"].base_url == "https://other.example.com/v1"


def test_input_path_in_a_spec_is_relative_to_the_spec_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``input.path`` is resolved from the spec's folder, not from the current directory."""
    (tmp_path / "jobs").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "in.jsonl").write_text("{}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    spec_path = tmp_path / "jobs" / "job.toml"
    spec_path.write_text(minimal().replace('path = "in.jsonl"', 'path = "../data/in.jsonl"'))

    spec = load_spec(spec_path)

    assert spec.input.path.resolve() == (tmp_path / "data" / "in.jsonl").resolve()


def test_flag_overrides_replace_spec_values(tmp_path: Path) -> None:
    """Nested flag overrides (limits.rpm, model) win over the spec file's values."""
    text = minimal(tables="[limits]\nrpm = 10\ntpm = 20\n")
    spec = load_spec(write_spec(tmp_path, text), {"model": "n", "limits": {"rpm": 99}})
    assert spec.routes == (RouteSpec(endpoint="default", model="n", limits=LimitsSpec(rpm=99, tpm=20)),)


@pytest.mark.parametrize(
    ("flag", "in_spec", "env", "expected"),
    [
        pytest.param(None, None, None, "pipeline.db", id="nothing-set"),
        pytest.param(None, None, "", "pipeline.db", id="empty-env-is-unset"),
        pytest.param(None, None, "env.db", "env.db", id="env"),
        pytest.param(None, "spec.db", "env.db", "spec.db", id="spec-beats-env"),
        pytest.param("flag.db", "spec.db", "env.db", "flag.db", id="flag-beats-spec-and-env"),
        pytest.param("flag.db", None, "env.db", "flag.db", id="flag-beats-env"),
        pytest.param(
            None, None, "postgresql+asyncpg://u:pw@h/db", "postgresql+asyncpg://u:pw@h/db", id="url"
        ),
    ],
)
def test_database_precedence_is_flag_then_spec_then_pipeline_db_then_pipeline_db_file(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    flag: str | None,
    in_spec: str | None,
    env: str | None,
    expected: str,
) -> None:
    """--db beats the spec's ``db``, which beats $PIPELINE_DB, which beats pipeline.db."""
    if env is None:
        monkeypatch.delenv("PIPELINE_DB", raising=False)
    else:
        monkeypatch.setenv("PIPELINE_DB", env)
    text = minimal(top=f'db = "{in_spec}"' if in_spec else "")
    spec = load_spec(write_spec(tmp_path, text), {"db": flag} if flag else {})
    assert spec.db == expected


def test_pipeline_db_is_read_when_the_spec_is_loaded_not_at_import(monkeypatch: pytest.MonkeyPatch) -> None:
    """A JobSpec built in code takes $PIPELINE_DB as it is at that moment."""
    monkeypatch.setenv("PIPELINE_DB", "first.db")
    assert JobSpec(job="j", input=InputSpec(Path("in.jsonl")), endpoints={}, routes=()).db == "first.db"
    monkeypatch.delenv("PIPELINE_DB")
    assert JobSpec(job="j", input=InputSpec(Path("in.jsonl")), endpoints={}, routes=()).db == "pipeline.db"


@pytest.mark.parametrize(
    ("text", "field"),
    [
        pytest.param(minimal(top='colour = "red"'), "colour", id="unknown-top-level-field"),
        pytest.param(minimal(tables="[limits]\nburst = 3\n"), "limits.burst", id="unknown-nested-field"),
        pytest.param(minimal(tables="[retry]\nretries = 3\n"), "retry.retries", id="unknown-retry-field"),
        pytest.param(
            minimal().replace('base_url = "https', 'timeout = 3\nbase_url = "https'),
            "endpoints.default.timeout",
            id="unknown-endpoint-field",
        ),
        pytest.param(minimal(tables='[limits]\nrpm = "fast"\n'), "limits.rpm", id="rpm-not-a-number"),
        pytest.param(minimal(tables="[limits]\nrpm = true\n"), "limits.rpm", id="rpm-bool"),
        pytest.param(minimal(tables="[limits]\ntpm = -1\n"), "limits.tpm", id="tpm-negative"),
        pytest.param(
            minimal(tables="[limits]\nconcurrency = 0\n"), "limits.concurrency", id="concurrency-zero"
        ),
        pytest.param(
            minimal(top='fallbacks = [{ model = "f", rpm = "fast" }]'),
            "fallbacks[0].rpm",
            id="route-rpm-not-a-number",
        ),
        pytest.param(minimal(top='budget_usd = "x"'), "budget_usd", id="budget-not-a-number"),
        pytest.param(minimal(top="budget_usd = -1"), "budget_usd", id="budget-negative"),
        pytest.param(
            minimal(tables="[retry]\nmax_attempts_per_route = 0\n"),
            "retry.max_attempts_per_route",
            id="retry-attempts-zero",
        ),
        pytest.param(
            minimal(tables='[policy]\ncontent_filter = "ignore"\n'),
            "policy.content_filter",
            id="policy-unknown-choice",
        ),
        pytest.param(minimal(top='on_bad_row = "maybe"'), "on_bad_row", id="on-bad-row-unknown"),
        pytest.param(minimal().replace('model = "m"', ""), "model", id="missing-model"),
        pytest.param(minimal().replace('[input]\npath = "in.jsonl"', ""), "input", id="missing-input"),
        pytest.param(
            minimal().replace('path = "in.jsonl"', 'format = "jsonl"'), "input.path", id="missing-input-path"
        ),
        pytest.param(minimal().replace("in.jsonl", "nowhere.jsonl"), "input.path", id="input-file-not-found"),
        pytest.param(minimal().replace("in.jsonl", "in.csv"), "input.format", id="unknown-input-suffix"),
        pytest.param(minimal(top='job = "../x"'), "job", id="job-dot-dot"),
        pytest.param(minimal(top='job = "a/b"'), "job", id="job-slash"),
        pytest.param(minimal(top='job = ""'), "job", id="job-empty"),
        pytest.param(minimal(top='job = ".."'), "job", id="job-parent"),
        pytest.param(minimal(top='run_id = "../x"'), "run_id", id="run-id-dot-dot"),
        pytest.param(minimal(top='run_id = "a/b"'), "run_id", id="run-id-slash"),
        pytest.param(minimal(top='run_id = ""'), "run_id", id="run-id-empty"),
        pytest.param(
            minimal(top='fallbacks = [{ model = "f", endpoint = "nowhere" }]'),
            "fallbacks[0].endpoint",
            id="fallback-unknown-endpoint",
        ),
        pytest.param(minimal(top='endpoint = "nowhere"'), "model.endpoint", id="primary-unknown-endpoint"),
        pytest.param(minimal(top='fallbacks = ["f", "m"]'), "fallbacks[1]", id="duplicate-route"),
        pytest.param(minimal(top='fallbacks = "f"'), "fallbacks", id="fallbacks-not-a-list"),
        pytest.param(
            minimal().replace("https://api.example.com/v1", "ftp://api.example.com/v1"),
            "endpoints.default.base_url",
            id="base-url-ftp",
        ),
        pytest.param(
            minimal().replace("https://api.example.com/v1", "api.example.com/v1"),
            "endpoints.default.base_url",
            id="base-url-no-scheme",
        ),
        pytest.param(
            minimal().replace('base_url = "https://api.example.com/v1"', 'api_key_env = "X"'),
            "endpoints.default.base_url",
            id="base-url-missing",
        ),
        pytest.param(
            minimal().replace("[endpoints.default]", "[endpoints.default]\nheaders = { X-Cost = 3 }"),
            "endpoints.default.headers.X-Cost",
            id="header-value-not-a-string",
        ),
        pytest.param(
            minimal().replace(
                "[endpoints.default]", "[endpoints.default]\nheaders = { Authorization = 'Bearer x' }"
            ),
            "endpoints.default.headers.Authorization",
            id="authorization-header",
        ),
        pytest.param(
            minimal().replace(
                "[endpoints.default]", "[endpoints.default]\nheaders = { authorization = 'Bearer x' }"
            ),
            "endpoints.default.headers.authorization",
            id="authorization-header-lowercase",
        ),
        pytest.param(
            minimal(tables='[request]\nmessages = [{ role = "user", content = "hi" }]\n'),
            "request.messages",
            id="request-messages",
        ),
        pytest.param(minimal(tables='[request]\nmodel = "x"\n'), "request.model", id="request-model"),
        pytest.param(minimal(tables="[template]\nmessages = []\n"), "template.messages", id="template-empty"),
        pytest.param(minimal(tables="[prices.m]\ninput = 1\n"), "prices.m.output", id="price-missing-output"),
        pytest.param(
            minimal(tables='[prices.m]\ninput = "cheap"\noutput = 1\n'),
            "prices.m.input",
            id="price-not-a-number",
        ),
    ],
)
def test_invalid_spec_raises_spec_error_naming_file_and_field(tmp_path: Path, text: str, field: str) -> None:
    """Each kind of mistake raises SpecError whose message starts with the file and the field."""
    path = write_spec(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value).startswith(f"{path}: {field}: "), str(info.value)


def test_api_key_in_place_of_its_variable_name_is_rejected_without_echoing_it(tmp_path: Path) -> None:
    """An api_key_env that looks like a key is refused, and the error does not print the key."""
    key = "sk-abc123def456"
    text = minimal().replace("[endpoints.default]", f'[endpoints.default]\napi_key_env = "{key}"')
    path = write_spec(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value).startswith(f"{path}: endpoints.default.api_key_env: ")
    assert key not in str(info.value)


def test_api_key_flag_that_looks_like_a_key_is_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--api-key-env given a key instead of a variable name fails the same way as in a spec."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.jsonl").write_text("{}\n")
    with pytest.raises(SpecError) as info:
        load_spec(
            None,
            {
                "input": {"path": "in.jsonl"},
                "model": "m",
                "base_url": "https://x.example/v1",
                "api_key_env": "sk-a-b",
            },
        )
    assert str(info.value).startswith("<flags>: endpoints.default.api_key_env: ")


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    """A file that is not TOML raises SpecError naming the file."""
    path = write_spec(tmp_path, 'model = "m"\n[input\npath = 1\n')
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value).startswith(f"{path}: not valid TOML")


def test_missing_spec_file_names_the_file(tmp_path: Path) -> None:
    """A spec path that does not exist raises SpecError naming it."""
    path = tmp_path / "absent.toml"
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(path) in str(info.value)
    assert "not found" in str(info.value)


REMOTE = EndpointSpec(name="openai", base_url="https://api.openai.com/v1", api_key_env="MY_KEY")


def test_resolve_api_key_reads_the_named_variable() -> None:
    """The key comes from the endpoint's own environment variable."""
    assert resolve_api_key(REMOTE, {"MY_KEY": "sk-live-123", "OPENAI_API_KEY": "sk-other"}) == "sk-live-123"


@pytest.mark.parametrize(
    "environ",
    [
        pytest.param({}, id="unset"),
        pytest.param({"MY_KEY": ""}, id="empty"),
        pytest.param({"OPENAI_API_KEY": "sk-secret-value-999"}, id="other-variable-set"),
    ],
)
def test_remote_endpoint_without_key_names_the_variable_and_no_key(environ: dict[str, str]) -> None:
    """A remote endpoint with no key raises SpecError naming the variable and holding no key value."""
    with pytest.raises(SpecError) as info:
        resolve_api_key(REMOTE, environ)
    message = str(info.value)
    assert "MY_KEY" in message
    assert "endpoints.openai.api_key_env" in message
    assert "sk-secret-value-999" not in message


@pytest.mark.parametrize(
    "base_url",
    [
        pytest.param("http://localhost:8000/v1", id="localhost"),
        pytest.param("http://127.0.0.1:8000/v1", id="loopback-ip"),
        pytest.param("http://127.0.0.2/v1", id="loopback-range"),
        pytest.param("http://[::1]:8000/v1", id="ipv6-loopback"),
        pytest.param("mock", id="mock"),
    ],
)
def test_local_endpoints_may_have_no_key(base_url: str) -> None:
    """Local and mock endpoints work without a key: resolve_api_key returns None."""
    endpoint = EndpointSpec(name="local", base_url=base_url, api_key_env="MY_KEY")
    assert resolve_api_key(endpoint, {}) is None


def test_redacted_spec_names_the_key_variable_but_never_holds_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spec as stored in the run record carries the variable name, never the key."""
    secret = "sk-live-SECRET-0123456789"
    monkeypatch.setenv("PIPELINE_TEST_KEY", secret)
    text = minimal().replace("[endpoints.default]", '[endpoints.default]\napi_key_env = "PIPELINE_TEST_KEY"')
    spec = load_spec(write_spec(tmp_path, text))
    assert resolve_api_key(spec.endpoints["default"]) == secret

    dumped = json.dumps(spec.redacted())

    assert "PIPELINE_TEST_KEY" in dumped
    assert secret not in dumped


def test_redacted_prices_keep_unset_prices_null(tmp_path: Path) -> None:
    """In the run record, set prices are exact decimal strings and unset optional prices are null."""
    spec = load_spec(write_spec(tmp_path, minimal(tables="[prices.m]\ninput = 0.15\noutput = 0.6\n")))
    assert spec.redacted()["prices"] == {
        "m": {"input": "0.15", "output": "0.6", "cached_input": None, "cache_write": None, "reasoning": None}
    }
