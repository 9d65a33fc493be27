"""Short metering transactions on the application's engine.

Metering never touches the app's ``db.session``: it takes connections from the
app's engine (which carries ``SQLALCHEMY_ENGINE_OPTIONS``) and commits its own
short transactions, so the app's pending objects are never flushed, committed or
rolled back by us. Transactions that write start with ``BEGIN IMMEDIATE`` on
SQLite (pysqlite runs SELECTs outside a transaction and a deferred upgrade
ignores ``busy_timeout``), and retry on deadlocks and serialization failures.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
import typing as t

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from .prepared import Prepared
from .writer_lock import writer_lock

T = t.TypeVar("T")

log = logging.getLogger("flask_ai_metering")

#: Attempts of one transaction before a retryable error is raised to the caller.
MAX_ATTEMPTS = 12

# PostgreSQL SQLSTATEs and MySQL/MariaDB error numbers that mean "try again".
_PG_RETRY = {"40001", "40P01", "55P03"}
_MYSQL_RETRY = {1205, 1213, 1020}


def is_retryable(error: BaseException) -> bool:
    """True for deadlocks, lock timeouts, serialization failures and SQLite busy."""
    if not isinstance(error, sa_exc.DBAPIError):
        return False
    orig = error.orig
    sqlstate = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if sqlstate in _PG_RETRY:
        return True
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], int) and args[0] in _MYSQL_RETRY:
        return True
    message = str(orig).lower()
    return "database is locked" in message or "database is busy" in message


def is_duplicate(error: BaseException) -> bool:
    """True when an INSERT hit a unique constraint."""
    return isinstance(error, sa_exc.IntegrityError) and _looks_unique(error)


def _looks_unique(error: sa_exc.IntegrityError) -> bool:
    orig = error.orig
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate == "23505":
        return True
    args = getattr(orig, "args", ())
    if args and args[0] == 1062:
        return True
    return "unique" in str(orig).lower()


_BEGIN_IMMEDIATE = Prepared(sa.text("BEGIN IMMEDIATE"))


class Transactions:
    """Metering's own short transactions on the app's engine, with their discipline.

    Built per call from the app's engine, so a stream wrapper or worker thread
    that runs outside the app context still has what it needs.
    """

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self.is_sqlite = self.dialect == "sqlite"
        self.is_mysql = self.dialect in ("mysql", "mariadb")
        self.is_postgres = self.dialect == "postgresql"

    @contextlib.contextmanager
    def begin(self, write: bool = True, autocommit: bool = False) -> t.Iterator[sa.Connection]:
        """One transaction: committed on success, rolled back on any exception.

        With ``autocommit`` each statement commits on its own: only for work that
        is a single statement per effect (the PostgreSQL one-statement phases), where
        BEGIN and COMMIT would be two wasted round trips.

        On SQLite metering's writers, in this process and in others, write one at a
        time (see :mod:`.writer_lock`): they queue on a lock instead of in SQLite's busy handler.
        """
        if self.is_sqlite and write and not autocommit:
            with writer_lock(self.engine):
                yield from self._transaction(write, autocommit)
        else:
            yield from self._transaction(write, autocommit)

    def _transaction(self, write: bool, autocommit: bool) -> t.Iterator[sa.Connection]:
        with self.engine.connect() as conn:
            if autocommit:
                yield from self._autocommitting(conn)
                return
            if self.is_sqlite and write:
                raw = conn.connection.dbapi_connection
                if raw is not None and not getattr(raw, "in_transaction", False):
                    _BEGIN_IMMEDIATE.execute(conn, {})
            elif self.is_mysql:
                # Quota transactions read only rows they lock; READ COMMITTED avoids
                # gap locks and stale snapshots under REPEATABLE READ.
                conn = conn.execution_options(isolation_level="READ COMMITTED")
            try:
                yield conn
            except BaseException:
                conn.rollback()
                raise
            else:
                conn.commit()

    @contextlib.contextmanager
    def reading(self) -> t.Iterator[sa.Connection]:
        """A connection for read-only statements that each stand alone (a limit check).

        On PostgreSQL the statements run in autocommit (the driver's switch, as in
        :meth:`_autocommitting`): no BEGIN, and no ROLLBACK when the connection goes
        back to the pool. A ROLLBACK makes psycopg drop every statement it has
        prepared on the connection, so a read in a transaction would cost every
        later phase its prepared statement. Elsewhere a plain connection.
        """
        with self.engine.connect() as conn:
            if self.is_postgres:
                yield from self._autocommitting(conn)
            else:
                yield conn

    def _autocommitting(self, conn: sa.Connection) -> t.Iterator[sa.Connection]:
        """``conn`` with each statement committing on its own.

        On psycopg the driver's own ``autocommit`` switch is flipped for the block
        and flipped back before the connection returns to the pool: a property
        change, no round trip. SQLAlchemy's ``isolation_level="AUTOCOMMIT"`` does
        the same plus its bookkeeping of connection characteristics, which cost
        more Python time than the statement's round trip.
        """
        driver = conn.connection.driver_connection
        if driver is None or not self.is_postgres or not hasattr(driver, "autocommit"):
            yield conn.execution_options(isolation_level="AUTOCOMMIT")
            return
        driver.autocommit = True
        try:
            yield conn
        finally:
            if not driver.closed:
                driver.autocommit = False

    def run(self, work: t.Callable[[sa.Connection], T], *, write: bool = True, autocommit: bool = False) -> T:
        """Run ``work`` in a transaction, retrying it whole on a retryable error."""
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                with self.begin(write, autocommit) as conn:
                    return work(conn)
            except sa_exc.DBAPIError as error:
                if attempt == MAX_ATTEMPTS or not is_retryable(error):
                    raise
                log.debug("retrying metering transaction after %s", type(error.orig).__name__)
                time.sleep(min(0.002 * 2**attempt, 0.2) * random.uniform(0.5, 1.5))
        raise AssertionError("unreachable")

    def insert_ignore(self, conn: sa.Connection, table: sa.Table, values: dict[str, t.Any]) -> int:
        """Insert a row unless it collides with a unique key; return how many rows were inserted.

        ``ON CONFLICT DO NOTHING`` on PostgreSQL and SQLite, ``INSERT IGNORE`` on
        MySQL/MariaDB (never ``ON DUPLICATE KEY UPDATE id=id``, whose affected-row
        count is 1 for a duplicate under SQLAlchemy's CLIENT_FOUND_ROWS). Callers
        validate values first: ``INSERT IGNORE`` would also clamp bad values.
        """
        if self.is_postgres:
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            stmt: sa.Insert = pg_insert(table).values(values).on_conflict_do_nothing()
        elif self.is_sqlite:
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            stmt = sqlite_insert(table).values(values).on_conflict_do_nothing()
        elif self.is_mysql:
            stmt = sa.insert(table).values(values).prefix_with("IGNORE")
        else:  # pragma: no cover - other dialects: plain INSERT, duplicate caught
            try:
                with conn.begin_nested():
                    return conn.execute(sa.insert(table).values(values)).rowcount
            except sa_exc.IntegrityError as error:
                if is_duplicate(error):
                    return 0
                raise
        if self.engine.dialect.insert_returning and not self.is_mysql:
            # psycopg reports rowcount -1 for some INSERTs: count the rows RETURNING gives.
            return len(conn.execute(stmt.returning(*table.primary_key.columns)).all())
        return conn.execute(stmt).rowcount
