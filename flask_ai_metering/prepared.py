"""The hot path's statements, compiled once and sent straight to the driver.

A metered call runs the same few statements every time. Through
``Connection.execute`` each one pays SQLAlchemy's per-execution work (the
compiled-cache lookup, an execution context, parameter and result objects):
about as long again as the statement itself on SQLite, and on PostgreSQL
psycopg also rewrote the ``%(name)s`` placeholders of statements over 4 KiB on
every execution. :class:`Prepared` does that work once per dialect and then
calls the DB-API cursor directly, applying the same bind and result processors
SQLAlchemy would, so the values are the ones ``conn.execute`` gives:

* PostgreSQL with psycopg 3: compiled to ``$n`` placeholders and sent through a
  ``RawCursor`` (psycopg prepares a statement it sees again, as before);
* SQLite: compiled to ``?`` placeholders on the connection's ``sqlite3`` cursor;
* any other driver (MySQL, MariaDB): ``conn.execute`` as usual.

A statement whose columns have Python-side defaults that it does not set goes through
``conn.execute`` too, which computes them. Driver errors are raised as SQLAlchemy's
(``IntegrityError``, ``OperationalError``…), so callers catch the same exceptions; a
lost connection is invalidated as SQLAlchemy would. When the engine has cursor-execute
listeners (tracing such as OpenTelemetry's SQLAlchemy instrumentation, or a test
counting statements), the statement goes through ``conn.execute`` so they see it.
"""

from __future__ import annotations

import collections
import functools
import typing as t

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql import psycopg as psycopg_dialect

#: psycopg's dialect with ``$n`` placeholders, which a ``RawCursor`` sends as they are.
_DOLLAR = psycopg_dialect.dialect(paramstyle="numeric_dollar")  # type: ignore[no-untyped-call]


class _Compiled:
    """One statement's text, parameter order and processors for one dialect."""

    def __init__(self, statement: t.Any, dialect: sa.Dialect) -> None:
        self.dialect = dialect
        self.compiled = statement.compile(dialect=dialect)
        #: Columns whose Python-side default (or ``onupdate``) SQLAlchemy computes per execution:
        #: such a statement is run by ``conn.execute``, which fills them in.
        self.needs_defaults = bool(self.compiled.insert_prefetch or self.compiled.update_prefetch)
        self.text: str = self.compiled.string
        self.names: tuple[str, ...] = tuple(self.compiled.positiontup or ())
        binds = self.compiled.binds
        self.processors = [binds[name].type._cached_bind_processor(dialect) for name in self.names]
        columns = self.compiled._result_columns
        self.types = [column[3] for column in columns]
        self.row: t.Any = collections.namedtuple("Row", [column[0] for column in columns], rename=True)  # type: ignore[misc]
        #: The result processors, from the first execution's column type codes (as SQLAlchemy does).
        self.results: list[t.Any] | None = None

    def args(self, params: t.Mapping[str, t.Any]) -> list[t.Any]:
        values = self.compiled.construct_params(params)
        return [
            values[name] if process is None else process(values[name])
            for name, process in zip(self.names, self.processors, strict=True)
        ]

    def rows(self, fetched: list[t.Any], type_codes: t.Callable[[], t.Sequence[t.Any]]) -> list[t.Any]:
        if self.results is None:
            self.results = [
                type_._cached_result_processor(self.dialect, code)
                for type_, code in zip(self.types, type_codes(), strict=True)
            ]
        make, results = self.row._make, self.results
        if not any(results):
            return [make(row) for row in fetched]
        return [
            make([value if process is None else process(value) for value, process in zip(row, results, strict=True)])
            for row in fetched
        ]


class Prepared:
    """A Core statement run on the driver's cursor; rows have names and positions, like SQLAlchemy's."""

    def __init__(self, statement: t.Any) -> None:
        self.statement = statement
        self._compiled: dict[str, _Compiled] = {}

    def execute(self, conn: sa.Connection, params: t.Mapping[str, t.Any]) -> list[t.Any]:
        """The rows the statement returns (none for a statement without ``RETURNING``)."""
        return self._run(conn, params)[0]

    def rowcount(self, conn: sa.Connection, params: t.Mapping[str, t.Any]) -> int:
        """How many rows an ``UPDATE`` or ``DELETE`` matched."""
        return self._run(conn, params)[1]

    def _run(self, conn: sa.Connection, params: t.Mapping[str, t.Any]) -> tuple[list[t.Any], int]:
        driver = conn.dialect.driver
        if driver not in ("psycopg", "pysqlite") or _traced(conn.engine):
            return _through_sqlalchemy(conn, self.statement, params)
        compiled = self._compiled.get(driver)
        if compiled is None:
            compiled = self._compiled[driver] = _Compiled(
                self.statement, _DOLLAR if driver == "psycopg" else conn.dialect
            )
        if compiled.needs_defaults:
            return _through_sqlalchemy(conn, self.statement, params)
        args = compiled.args(params)
        dbapi_connection = conn.connection.driver_connection
        if not conn.in_transaction() and not (driver == "psycopg" and dbapi_connection.autocommit):  # type: ignore[union-attr]
            # What ``conn.execute`` would do (autobegin): without it ``conn.commit()`` would not
            # reach the driver, and the pool would roll our writes back. (psycopg in autocommit,
            # as metering's one-statement phases run, has nothing to commit.)
            conn.begin()
        try:
            if driver == "psycopg":
                import psycopg

                with psycopg.RawCursor(t.cast(psycopg.Connection[t.Any], dbapi_connection)) as cursor:
                    cursor.execute(compiled.text, args)
                    # The result's own column count and types: psycopg's ``description`` builds
                    # a Column object per column on every access.
                    result = cursor.pgresult
                    if result is None or not result.nfields:
                        return [], cursor.rowcount
                    fetched = cursor.fetchall()
                    codes = functools.partial(_type_codes, result)
                    return compiled.rows(fetched, codes), cursor.rowcount
            cursor = dbapi_connection.cursor()  # type: ignore[union-attr]
            try:
                cursor.execute(compiled.text, args)
                description = cursor.description
                if not description:
                    return [], cursor.rowcount
                fetched = cursor.fetchall()
                return compiled.rows(fetched, lambda: [column[1] for column in description]), cursor.rowcount
            finally:
                cursor.close()
        except conn.dialect.loaded_dbapi.Error as error:
            if conn.dialect.is_disconnect(error, dbapi_connection, None):
                conn.invalidate(error)
            raise sa_exc.DBAPIError.instance(
                compiled.text, args, error, conn.dialect.loaded_dbapi.Error, dialect=conn.dialect
            ) from error


class PreparedInsert:
    """An ``INSERT`` of one row that names every column it writes, returning the row's id.

    Every column is bound, so no Python-side default is left for SQLAlchemy to fill in and
    the statement is prepared whole; where the dialect has no ``INSERT … RETURNING``
    (MySQL), ``conn.execute`` reads the id back as usual.
    """

    def __init__(self, table: sa.Table, columns: t.Iterable[str]) -> None:
        self.plain = sa.insert(table)
        values = {name: sa.bindparam(name, type_=table.c[name].type) for name in columns}
        self.returning = Prepared(sa.insert(table).values(values).returning(*table.primary_key.columns))

    def id(self, conn: sa.Connection, values: t.Mapping[str, t.Any]) -> int:
        """Insert ``values`` (every column named) and return the new row's primary key."""
        if conn.dialect.insert_returning:
            return int(self.returning.execute(conn, values)[0][0])
        result = conn.execute(self.plain, values)
        return int(result.inserted_primary_key[0])  # type: ignore[index]


def _through_sqlalchemy(
    conn: sa.Connection, statement: t.Any, params: t.Mapping[str, t.Any]
) -> tuple[list[t.Any], int]:
    result = conn.execute(statement, params)
    if isinstance(result, sa.CursorResult) and not result.returns_rows:
        return [], result.rowcount
    rows = list(result.all())
    return rows, len(rows)


def _type_codes(result: t.Any) -> list[int]:
    return [result.ftype(i) for i in range(result.nfields)]


def _traced(engine: sa.Engine) -> bool:
    dispatch = engine.dispatch
    return bool(dispatch.before_cursor_execute or dispatch.after_cursor_execute)
