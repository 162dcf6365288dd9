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
from operator import itemgetter
from typing import Any

from sqlalchemy import Table
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement

__all__ = ["Prepared"]


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
