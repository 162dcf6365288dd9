"""Progress display: a live bar on a terminal, plain log lines otherwise.

It only reads :class:`Counters` (kept by the recorder and the workers); it never prices,
limits or writes anything.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Protocol, TextIO

__all__ = ["Counters", "Display", "make_display"]

log = logging.getLogger("pipeline.progress")


@dataclass
class Counters:
    total: int = 0  # requests to send in this session
    succeeded: int = 0
    failed: int = 0
    in_flight: int = 0
    tokens: int = 0
    cost_picousd: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def done(self) -> int:
        return self.succeeded + self.failed

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        cost = Decimal(self.cost_picousd) / Decimal(10**12)
        return (
            f"{self.done}/{self.total} done ({self.succeeded} ok, {self.failed} failed), "
            f"{self.in_flight} in flight, {self.rate:.1f} req/s, {self.tokens} tokens, ${cost:.6f}"
        )


class Display(Protocol):
    interval: float

    def update(self, c: Counters) -> None: ...

    def close(self, c: Counters) -> None: ...


class LogDisplay:
    """One log line every ``interval`` seconds (for files, CI and pipes)."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval

    def update(self, c: Counters) -> None:
        log.info("progress: %s", c.line())

    def close(self, c: Counters) -> None:
        log.info("progress: %s", c.line())


class RichDisplay:
    """A live progress bar (rich) on a terminal."""

    interval = 0.5

    def __init__(self, stream: TextIO) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]requests"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[detail]}"),
            console=Console(file=stream),
            transient=False,
        )
        self._task: Any = None

    def _detail(self, c: Counters) -> str:
        cost = Decimal(c.cost_picousd) / Decimal(10**12)
        return (
            f"ok {c.succeeded} · failed {c.failed} · in flight {c.in_flight} · "
            f"{c.rate:.1f}/s · {c.tokens} tok · ${cost:.4f}"
        )

    def update(self, c: Counters) -> None:
        if self._task is None:
            self._progress.start()
            self._task = self._progress.add_task("run", total=c.total, detail="")
        self._progress.update(self._task, completed=c.done, total=c.total, detail=self._detail(c))

    def close(self, c: Counters) -> None:
        self.update(c)
        self._progress.stop()


def make_display(stream: TextIO | None = None, *, quiet: bool = False) -> Display | None:
    if quiet:
        return None
    s = stream or sys.stderr
    if s.isatty():
        return RichDisplay(s)
    return LogDisplay()
