"""Shared fixtures: an isolated working folder and environment, the mock server, a CLI runner."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from pipeline.cli import main
from pipeline.mock import MockConfig, MockServer


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh current directory and an environment with no API keys in it."""
    monkeypatch.chdir(tmp_path)
    for var in ("OPENAI_API_KEY", "OPENROUTER_API_KEY", "PIPELINE_TEST_KEY"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


@pytest.fixture
def mock_server() -> Iterator[Callable[..., MockServer]]:
    """Start mock servers with the given MockConfig fields; all are stopped afterwards."""
    started: list[MockServer] = []

    def start(**config: Any) -> MockServer:
        server = MockServer(MockConfig(**config)).start()
        started.append(server)
        return server

    yield start
    for s in started:
        s.stop()


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str
    result: Result


@pytest.fixture
def cli() -> Callable[..., CliResult]:
    """Invoke the ``pipeline`` command in-process; returns exit code, stdout and stderr."""

    def invoke(*args: str, env: dict[str, str] | None = None) -> CliResult:
        runner = CliRunner()
        result = runner.invoke(main, [str(a) for a in args], env=env, catch_exceptions=False)
        return CliResult(result.exit_code, result.stdout, result.stderr, result)

    return invoke
