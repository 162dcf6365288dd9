"""Statements the recorder runs for every batch, compiled once per database.

``conn.execute(insert(table), rows)`` makes SQLAlchemy rebuild, per row, the parameters of
the compiled statement from a dict and run each through its type's bind processor: for the
recorder's 1,000-row batches of 37-column attempts that cost more CPU than SQLite's own work
(``bench/recorder.py``). Here the statement is compiled once for the database's dialect, rows
come as tuples in a declared column order, and each becomes the driver's parameters directly,
through the very same bind processors (SQLite's datetimes as text, booleans, floats) in the
compiled statement's order. The SQL sent and the values stored are those of the plain
``execute``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import chain, count
from operator import itemgetter
from typing import Any

from sqlalchemy import Table
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement

__all__ = ["Prepared", "Rows"]


class Prepared:
    """One DML statement compiled for ``dialect``. Rows are tuples of the values of ``keys``,
    in that order; :meth:`params` makes them what the driver's ``executemany`` takes.

    With ``table``, ``keys`` must name every column of it (an INSERT of whole rows).
    """

    def __init__(
        self,
        statement: ClauseElement,
        dialect: Dialect,
        keys: Sequence[str],
        *,
        table: Table | None = None,
    ) -> None:
        if table is not None and sorted(keys) != sorted(c.key for c in table.c):
            raise ValueError(f"the row keys do not match the columns of {table.name}")
        if len(set(keys)) != len(keys):
            raise ValueError("a row key appears twice")
        compiled = statement.compile(dialect=dialect, column_keys=list(keys))
        assert isinstance(compiled, SQLCompiler)  # a DML statement
        self.sql = str(compiled)
        self.positional = bool(dialect.positional)
        names = list(compiled.positiontup or ()) if self.positional else list(compiled.binds)
        index = {k: i for i, k in enumerate(keys)}
        # Per parameter of the statement, where its value is in ``row + constants`` (the
        # constants are literals the statement carries, e.g. the 0 of coalesce(col, 0)), and
        # the type's bind processor, applied to the row's values as SQLAlchemy would.
        self._names = names
        constants: list[Any] = []
        order: list[int] = []
        self._processed: list[tuple[int, Callable[[Any], Any]]] = []
        for position, name in enumerate(names):
            bind = compiled.binds[name]
            process = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if name in index:
                order.append(index[name])
                if process is not None:
                    self._processed.append((position, process))
            else:
                value = bind.effective_value
                order.append(len(keys) + len(constants))
                constants.append(value if process is None else process(value))
        self._constants = tuple(constants)
        self._as_is = order == list(range(len(keys)))  # the usual INSERT: the row's own order
        self._pick = itemgetter(*order) if len(order) > 1 else (lambda row: (row[order[0]],))

    def params(self, rows: Sequence[tuple[Any, ...]]) -> list[tuple[Any, ...]] | list[dict[str, Any]]:
        if self._as_is:
            picked: Sequence[tuple[Any, ...]] = rows
        elif self._constants:
            constants, pick = self._constants, self._pick
            picked = [pick(row + constants) for row in rows]
        else:
            picked = [self._pick(row) for row in rows]
        processed = self._processed
        if processed:
            out = []
            for row in picked:
                values = list(row)
                for i, process in processed:
                    values[i] = process(values[i])
                out.append(tuple(values))
        else:
            out = list(picked)
        if self.positional:
            return out
        names = self._names
        return [dict(zip(names, values, strict=True)) for values in out]


class Rows:
    """A statement over many rows at once, for SQLite: ``template`` holds ``{values}`` where a
    ``VALUES`` list of up to ``max_rows`` rows goes (an ``INSERT``, or an ``UPDATE ... FROM``).

    ``executemany`` releases and takes back the GIL once per row (the bindings are Python work
    between two ``sqlite3_step``), so while the event loop is busy SQLite's thread waits for the
    GIL up to a switch interval (5 ms) per row. One statement binds all its rows at once, then
    SQLite works on them with the GIL released. Rows go in chunks of a power of two, so that
    few distinct statements exist, each compiled once and kept in the driver's statement cache;
    a column NULL in every row of a chunk is written as a NULL literal (Python's sqlite3 binds
    a None at several times the cost of a number). The values stored are those the bound
    parameters would give.

    ``shared``: the positions of columns that usually hold one value for a whole batch (the
    run, the endpoint, the model, an HTTP status): where every row of a chunk has the same
    value (of the same type), it is bound once and every row refers to it (``?N``). Binding is
    the driver's work per parameter, done holding the GIL (a text value is copied each time),
    and it was half of SQLite's time on an attempt's row (``bench/recorder.py``).

    ``stamps``: the positions of datetime columns; ``stamp`` turns a chunk's values of one
    into SQLAlchemy's SQLite text.
    """

    def __init__(
        self,
        template: str,
        width: int,
        *,
        max_rows: int,
        shared: Sequence[int] = (),
        stamps: Sequence[int] = (),
        stamp: Callable[[Sequence[Any]], list[Any]] | None = None,
    ) -> None:
        if max_rows < 1 or max_rows & (max_rows - 1):
            raise ValueError("max_rows must be a power of two")
        if stamps and stamp is None:
            raise ValueError("datetime columns need a stamp function")
        self.template = template
        self.width = width
        self.max_rows = max_rows
        if not all(0 <= k < width for k in (*shared, *stamps)):
            raise ValueError("a column position is out of range")
        self._shared = tuple(sorted(set(shared)))
        self._stamps = tuple(stamps)
        self._stamp = stamp
        self._sql: dict[tuple[int, tuple[int, ...], tuple[int, ...]], str] = {}

    def column_chunks(self, columns: Sequence[Sequence[Any]]) -> list[tuple[str, list[Any]]]:
        """(SQL, parameters) per chunk, covering the rows in order, given column by column:
        ``columns[k][i]`` is row i's value of column k (what the recorder builds, see
        ``pipeline/store/batch.py``)."""
        width, candidates, stamp = self.width, self._shared, self._stamp
        if len(columns) != width:
            raise ValueError(f"rows of {width} values expected")
        n = len(columns[0]) if columns else 0
        if any(len(column) != n for column in columns):
            raise ValueError("columns of different lengths")
        out = []
        size, i = self.max_rows, 0
        while i < n:
            while size > n - i:
                size //= 2
            chunk = list(columns) if size == n else [column[i : i + size] for column in columns]
            i += size
            nulls: list[int] = []
            shared: list[int] = []
            kept: list[int] = []
            for k, column in enumerate(chunk):
                first = column[0]
                if first is None:
                    (nulls if column.count(None) == size else kept).append(k)
                elif k in candidates and _one_value(column, size):
                    shared.append(k)
                else:
                    kept.append(k)
            head: list[Any] = [chunk[k][0] for k in shared]  # bound once: ?1 .. ?len(shared)
            for k in self._stamps:
                assert stamp is not None
                if k in shared:
                    head[shared.index(k)] = stamp([chunk[k][0]])[0]
                elif k not in nulls:
                    chunk[k] = stamp(chunk[k])
            params = list(chain.from_iterable(zip(*[chunk[k] for k in kept], strict=True)))
            key = (size, tuple(nulls), tuple(shared))
            sql = self._sql.get(key) or self._compose(key)
            out.append((sql, head + params if head else params))
        return out

    def _compose(self, key: tuple[int, tuple[int, ...], tuple[int, ...]]) -> str:
        size, nulls, shared = key
        assert not set(nulls) & set(shared)  # a column is one of NULL, shared or a row's own
        refs = {k: f"?{j + 1}" for j, k in enumerate(shared)}  # bound once: ?1 .. ?len(shared)

        def row(own: Callable[[], str]) -> str:
            """A row's cells: shared refs, NULL literals, and ``own()`` for each of its values."""
            cells = (refs.get(k) or ("NULL" if k in nulls else own()) for k in range(self.width))
            return "(" + ",".join(cells) + ")"

        plain = row(lambda: "?")
        if shared:
            # The first row numbers its own parameters after the shared ones; the rows after
            # it use plain "?" (SQLite gives each the number after the largest so far: the next
            # in order). Numbering every parameter, as this did first, made SQLite 3.40
            # (Debian's) take time quadratic in their count to compile the statement: 306 ms
            # for 512 rows of 38 columns, against 4 ms so; paid once per connection and shape,
            # and again at each miss of the driver's cache.
            numbers = count(len(shared) + 1)
            values = [row(lambda: f"?{next(numbers)}")] + [plain] * (size - 1)
        else:
            values = [plain] * size
        sql = self.template.format(values=",".join(values))
        if len(self._sql) >= 256:  # shapes come and go with the kinds of outcome; keep a few
            self._sql.clear()
        self._sql[key] = sql
        return sql


def _one_value(column: Sequence[Any], size: int) -> bool:
    """Every value of the column equal, and of one type (1, 1.0 and True are equal in Python,
    not to SQLite in every column)."""
    first = column[0]
    if column.count(first) != size:
        return False
    return first.__class__ is str or len(set(map(type, column))) == 1  # equal to a str: a str
