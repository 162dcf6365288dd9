"""Which database a command uses: --db, then the spec's ``db``, then $PIPELINE_DB, then
pipeline.db; and --help names the variable without ever printing its value."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from helpers import default_db, plain_rows, query, untouched, write_jsonl

from pipeline.mock import MockServer


def run_args(server: MockServer, job: str, *more: str) -> list[str]:
    args = ["run", "--input", "in.jsonl", "--base-url", server.base_url, "--model", "mock-small"]
    return [*args, "--job", job, "--out", "out", "-q", *more]


def runs(db: str) -> list[tuple[Any, ...]]:
    return query(db, "SELECT run_id FROM run ORDER BY run_id")


def test_every_command_uses_pipeline_db_when_no_db_is_given(
    workdir: Path,
    new_db: Callable[[str], str],
    mock_server: Callable[..., MockServer],
    cli: Callable[..., Any],
) -> None:
    """run, status, report, export and db upgrade without --db all use $PIPELINE_DB."""
    chosen = new_db("chosen.db")
    env = {"PIPELINE_DB": chosen}
    server = mock_server()
    write_jsonl(workdir / "in.jsonl", plain_rows(4))
    r = cli(*run_args(server, "a"), env=env)
    assert r.exit_code == 0, r.stderr
    assert runs(chosen) == [("a",)]
    assert untouched(default_db())  # the database the test would use without the variable

    status = cli("status", "--json", env=env)
    assert status.exit_code == 0, status.stderr
    assert orjson.loads(status.stdout)["counts"]["succeeded"] == 4
    report = cli("report", "--by", "run", "--format", "json", env=env)
    assert [line["run_id"] for line in orjson.loads(report.stdout)] == ["a"]
    assert cli("export", "a", "-o", "a.jsonl", env=env).exit_code == 0
    assert len((workdir / "a.jsonl").read_bytes().splitlines()) == 4
    upgrade = cli("db", "upgrade", env=env)
    assert upgrade.exit_code == 0 and "is at revision 0008" in upgrade.stdout
    assert untouched(default_db())


def test_db_flag_beats_the_spec_which_beats_pipeline_db(
    workdir: Path,
    new_db: Callable[[str], str],
    mock_server: Callable[..., MockServer],
    cli: Callable[..., Any],
) -> None:
    """With $PIPELINE_DB set: --db wins over it and over the spec; the spec's db wins over it."""
    from_env, from_spec, from_flag = new_db("env.db"), new_db("spec.db"), new_db("flag.db")
    env = {"PIPELINE_DB": from_env}
    server = mock_server()
    write_jsonl(workdir / "in.jsonl", plain_rows(2))
    spec = workdir / "job.toml"
    spec.write_text(
        f'job = "s"\nmodel = "mock-small"\ndb = "{from_spec}"\n[input]\npath = "in.jsonl"\n'
        f'[endpoints.default]\nbase_url = "{server.base_url}"\n'
    )
    assert cli(*run_args(server, "e"), env=env).exit_code == 0
    assert cli("run", spec, "--out", "out", "-q", env=env).exit_code == 0
    assert cli("run", spec, "--db", from_flag, "--run-id", "f", "--out", "out", "-q", env=env).exit_code == 0
    assert cli(*run_args(server, "g", "--db", from_flag), env=env).exit_code == 0
    assert (runs(from_env), runs(from_spec), runs(from_flag)) == ([("e",)], [("s",)], [("f",), ("g",)])

    assert orjson.loads(cli("status", "--json", env=env).stdout)["run_id"] == "e"
    status = cli("status", "g", "--db", from_flag, "--json", env=env)
    assert orjson.loads(status.stdout)["run_id"] == "g"


@pytest.mark.parametrize(
    "command",
    [["run"], ["status"], ["report"], ["export"], ["estimate"], ["db", "upgrade"]],
    ids=lambda c: "-".join(c),
)
def test_help_names_pipeline_db_and_never_prints_its_value(
    cli: Callable[..., Any], command: list[str]
) -> None:
    """The default shown is "$PIPELINE_DB, else pipeline.db", never the URL (it may hold a password)."""
    r = cli(*command, "--help", env={"PIPELINE_DB": "postgresql+asyncpg://batch:s3cret-pw@db.internal/p"})
    assert r.exit_code == 0
    assert "$PIPELINE_DB, else pipeline.db" in " ".join(r.stdout.split())
    assert "s3cret-pw" not in r.stdout and "db.internal" not in r.stdout
