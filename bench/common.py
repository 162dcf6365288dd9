"""Helpers shared by the benchmark scripts in this folder, one version of each.

The scripts run as ``python bench/NAME.py``, so this folder is first on ``sys.path`` and they
``import common``. What lives here:

* pinning to cores: :func:`pin_prefix` (``taskset -c CORE`` for a child), :func:`pin_self`
  (this process to core 0) and :data:`NOT_PINNED`;
* the mock server in a subprocess: :func:`mock_server_command` (``python -m pipeline
  mock-server --port 0 ...``), :func:`read_announcement` (the URL of its "mock server listening
  on http://HOST:PORT/v1" line), :func:`stop`, the context manager :func:`mock_server` that does
  all three, and :func:`mock_stats` / :func:`answered` (its ``/mock/stats``);
* measured commands: :func:`spawn` and :func:`reap` (through :data:`LAUNCHER`, for the child's
  peak RSS and CPU times from ``os.wait4``), :class:`ChildOutput` (its stderr line by line and
  its stdout, read in threads) and :func:`env_without_api_keys`;
* reporting: :func:`load_average`, :func:`ideal_rps` and :func:`render` (a plain text table).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any, Final

SERVER_START_S: Final = 20.0  # how long the mock server may take to say where it listens
ANNOUNCEMENT: Final = "mock server listening on "
NOT_PINNED: Final = "not pinned (needs 2+ cores, taskset and sched_setaffinity)"


# --------------------------------------------------------------------------- pinning


def pin_prefix(core: int) -> list[str]:
    """``taskset -c CORE`` when taskset exists and there are 2+ cores, else nothing."""
    taskset = shutil.which("taskset")
    return [taskset, "-c", str(core)] if taskset and (os.cpu_count() or 1) >= 2 else []


def pin_self() -> bool:
    """Pin this process to core 0 (children go elsewhere with :func:`pin_prefix`); False if it can't."""
    if pin_prefix(0) and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {0})
        return True
    return False


# --------------------------------------------------------------------------- the mock server


def mock_server_command(*flags: str) -> list[str]:
    """``python -m pipeline mock-server --port 0 FLAGS``: a free port, announced on stdout."""
    return [sys.executable, "-m", "pipeline", "mock-server", "--port", "0", *flags]


def read_announcement(process: subprocess.Popen[bytes], timeout_s: float = SERVER_START_S) -> str | None:
    """The base URL (…/v1) from the first stdout line, "mock server listening on URL".

    None if the process exits, says something else, or says nothing within ``timeout_s``.
    """
    assert process.stdout is not None
    fd, buffer = process.stdout.fileno(), b""
    deadline = time.monotonic() + timeout_s
    while b"\n" not in buffer:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        readable, _, _ = select.select([fd], [], [], min(left, 0.5))
        if readable:
            chunk = os.read(fd, 4096)
            if not chunk:  # the process exited
                return None
            buffer += chunk
        elif process.poll() is not None:
            return None
    line = buffer.split(b"\n", 1)[0].decode(errors="replace").strip()
    return line.removeprefix(ANNOUNCEMENT) if line.startswith(ANNOUNCEMENT) else None


def stop(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGTERM, then SIGKILL if it is still there after ``timeout_s``; close its stdout."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdout is not None:
        process.stdout.close()


@contextlib.contextmanager
def mock_server(
    command: Sequence[str], *, core: int | None = 1, stop_timeout_s: float = 10.0
) -> Iterator[str]:
    """Run the mock server ``command`` pinned to ``core``; yield its base URL (…/v1); always stop it.

    Raises RuntimeError, with what the server wrote to stderr, if it does not announce itself.
    """
    pin = pin_prefix(core) if core is not None else []
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen([*pin, *command], stdout=subprocess.PIPE, stderr=stderr)
        try:
            base = read_announcement(process)
            if base is None:
                stderr.seek(0)
                raise RuntimeError(f"the mock server did not start: {stderr.read().decode(errors='replace')}")
            yield base
        finally:
            stop(process, stop_timeout_s)


def mock_stats(base_url: str, timeout_s: float = 5.0) -> dict[str, Any]:
    """The mock server's ``/mock/stats`` (``completions``: how many it has answered so far)."""
    url = base_url.removesuffix("/v1") + "/mock/stats"
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        stats: dict[str, Any] = json.loads(response.read())
    return stats


def answered(base_url: str) -> int | None:
    """How many completions the mock server has answered; None if it cannot be asked."""
    try:
        return int(mock_stats(base_url)["completions"])
    except (OSError, ValueError, KeyError):
        return None


# --------------------------------------------------------------------------- measured commands


# A process's ru_maxrss starts at the RSS of the process that spawned it (Linux keeps the old
# memory's high-water mark across exec), so a measured command is started by this tiny launcher
# (python -S, ~8 MB) rather than by the benchmark: it forks the command, tells its pid, waits
# for it and reports its exit status, peak RSS and CPU times from os.wait4.
LAUNCHER: Final = r"""
import os, signal, sys
fd = int(sys.argv[1])
pid = os.fork()
if pid == 0:
    os.close(fd)
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
signal.signal(signal.SIGINT, signal.SIG_IGN)
os.write(fd, b"%d\n" % pid)
_, status, ru = os.wait4(pid, 0)
code = os.waitstatus_to_exitcode(status)
os.write(fd, b"%d %d %r %r\n" % (code, ru.ru_maxrss, ru.ru_utime, ru.ru_stime))
"""


@dataclass
class Child:
    """A measured command, started through :data:`LAUNCHER`."""

    launcher: subprocess.Popen[bytes]
    pid: int
    report: IO[bytes]


def spawn(cmd: list[str], core: int | None, **popen: Any) -> Child:
    """Start ``cmd`` (pinned to ``core``) through the launcher; its stdio is as ``popen`` says."""
    r, w = os.pipe()
    pin = pin_prefix(core) if core is not None else []
    try:
        launcher = subprocess.Popen(
            [*pin, sys.executable, "-S", "-c", LAUNCHER, str(w), *cmd], pass_fds=(w,), **popen
        )
    finally:
        os.close(w)
    report = os.fdopen(r, "rb")
    line = report.readline()
    if not line:
        report.close()
        launcher.wait()
        raise RuntimeError(f"could not start {cmd!r}")
    return Child(launcher, int(line), report)


def reap(child: Child) -> tuple[int, float, float]:
    """Wait for the command: (exit code, peak RSS in MB, user+sys CPU seconds)."""
    line = child.report.readline()
    child.report.close()
    child.launcher.wait()
    if not line:
        raise RuntimeError(f"the launcher of pid {child.pid} died (exit {child.launcher.returncode})")
    code, maxrss_kib, utime, stime = line.split()
    return int(code), int(maxrss_kib) / 1024.0, float(utime) + float(stime)


class ChildOutput:
    """A child's output, read in two daemon threads while it runs.

    Its stderr line by line: each line is kept in :attr:`stderr_lines` and handed to ``on_line``
    as it arrives (to time-stamp log lines); its stdout whole, as :attr:`stdout` after :meth:`join`.
    """

    def __init__(self, process: subprocess.Popen[bytes], on_line: Callable[[str], None]) -> None:
        self.stderr_lines: list[str] = []
        self._process = process
        self._on_line = on_line
        self._stdout: list[bytes] = []
        self._threads = [
            threading.Thread(target=self._read_stderr, daemon=True),
            threading.Thread(target=self._read_stdout, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _read_stderr(self) -> None:
        assert self._process.stderr is not None
        for raw in self._process.stderr:
            line = raw.decode(errors="replace").rstrip()
            self.stderr_lines.append(line)
            self._on_line(line)

    def _read_stdout(self) -> None:
        assert self._process.stdout is not None
        self._stdout.append(self._process.stdout.read())

    def join(self, timeout_s: float = 5.0) -> None:
        """Wait for both readers (the child has exited), at most ``timeout_s`` each."""
        for thread in self._threads:
            thread.join(timeout_s)

    @property
    def stdout(self) -> str:
        return b"".join(self._stdout).decode(errors="replace")

    def tail(self, lines: int = 8) -> list[str]:
        """The last lines of stderr then stdout: what to show when the child failed."""
        return (self.stderr_lines + self.stdout.splitlines())[-lines:]

    def succeeded(self) -> int:
        """N from the "...; N succeeded" summary `pipeline run` prints on stdout; 0 without one."""
        match = re.search(r"; (\d+) succeeded", self.stdout)
        return int(match.group(1)) if match else 0


def env_without_api_keys() -> dict[str, str]:
    """This environment less ``*_API_KEY``: a benchmarked run must not reach a real provider."""
    return {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}


# --------------------------------------------------------------------------- reporting


def load_average(unknown: str = "") -> str:
    """``load average X.XX`` (1 minute: other work competing for the cores), or ``unknown``."""
    if not hasattr(os, "getloadavg"):
        return unknown
    return f"load average {os.getloadavg()[0]:.2f}"


def ideal_rps(concurrency: int, latency_ms: float) -> float | None:
    """The rate a zero-cost client would reach: every slot busy waiting on the server."""
    return concurrency / (latency_ms / 1000.0) if latency_ms else None


def render(header: Sequence[str], rows: Sequence[Sequence[str]], left: set[int]) -> str:
    """A text table: a header, a rule, the rows; columns in ``left`` left-aligned, the rest right."""
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        cells = (
            c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        return "  ".join(cells).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])
