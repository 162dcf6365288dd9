"""The garbage collector tuned for the send loop: a run allocates fast and keeps little.

A run allocates a few hundred short-lived objects per request (the request, its attempt, the
parsed answer, the row for the database) that reference counting frees; the cyclic collector
finds almost nothing in them, yet with Python's default thresholds it ran about every ten
requests and scanned the whole heap (SQLAlchemy, pyarrow, the imports: ~90 ms a time) every
few thousand: ~14% of a run's CPU, measured (``bench/README.md``). While the workers run,
:func:`fewer_collections` moves what exists before the run out of the collector's sight
(``gc.freeze``) and lets the young generation grow before it is scanned. Cycles are still
collected, just less often; everything is as it was afterwards.

At exit, the interpreter scans the whole heap again, several times, as it tears the modules
down: ~0.3 s of a command's wall time (measured), spent after its work is done and its files
are closed. :func:`no_collection_at_exit` hides what exists from those scans.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["fewer_collections", "no_collection_at_exit"]

THRESHOLDS = (20_000, 20, 20)  # allocations before a young collection; young ones per middle; middle per old


@contextmanager
def fewer_collections() -> Iterator[None]:
    before = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
    try:
        yield
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


def no_collection_at_exit() -> None:
    """Call when a command is done (files written and closed, connections closed) and about
    to exit: the interpreter's final collections skip every object that exists now."""
    gc.freeze()
