"""Claims on overages that live exactly as long as the claiming process's database session.

A sync claims an overage by taking a lock named after its id, and holds it until
the overage is marked synced (or given back). The lock is not a lease with a
clock: it belongs to a database connection (or, on SQLite, to the process), so
when the process dies, is killed or loses its connection, the server drops the
lock at once and the next sync takes the overage over; and while the claimer
lives, nobody else can, however long its remote call takes.

=============  ==================================================================
PostgreSQL     session advisory lock ``pg_try_advisory_lock(namespace, id)``
               (advisory locks are per database).
MySQL/MariaDB  ``GET_LOCK(name, 0)``, the name made of a digest of the database
               name and the id (lock names are server-wide).
SQLite         a POSIX record lock on byte ``id`` of ``<database>-ai-metering-sync.lock``
               beside the database file, which the kernel drops with the process;
               threads of one process are told apart by a registry in the process.
               An in-memory database, or a system without ``fcntl``, uses only the
               registry (one process can reach the database anyway).
=============  ==================================================================

Every lock is taken with a *try* (never waits): a lock held elsewhere means
"another live sync owns it", which the sync reports and leaves alone.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import typing as t

import sqlalchemy as sa

if t.TYPE_CHECKING:
    from ..transactions import Transactions

log = logging.getLogger("flask_ai_metering")

#: The first key of our PostgreSQL advisory locks ("AIMo" as an int4), so they
#: cannot meet the application's own advisory locks on overage ids.
PG_NAMESPACE = 0x41494D6F


class ClaimLocks:
    """The overage locks one sync run holds, on a connection of its own.

    Use as a context manager; :meth:`close` (or leaving the block) drops them all.
    ``try_acquire`` of an id this object already holds returns True without asking
    again, so a retried transaction can call it twice.
    """

    def __init__(self, store: Transactions) -> None:
        self.store = store
        self.held: set[int] = set()
        self._conn: sa.Connection | None = None
        self._mysql_prefix = ""
        self._file: _FileLocks | None = None
        self._guard = threading.Lock()

    # -- lifecycle ----------------------------------------------------------------

    def __enter__(self) -> ClaimLocks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connection(self) -> sa.Connection:
        if self._conn is None:
            conn = self.store.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            if self.store.is_mysql:
                database = conn.exec_driver_sql("SELECT DATABASE()").scalar() or ""
                self._mysql_prefix = "aim-overage-" + hashlib.sha256(str(database).encode()).hexdigest()[:16] + "-"
            self._conn = conn
        return self._conn

    def close(self) -> None:
        """Release every lock this run still holds."""
        with self._guard:
            ids, self.held = set(self.held), set()
            if self._file is not None:
                for overage_id in ids:
                    self._file.release(overage_id)
            if self._conn is not None:
                conn, self._conn = self._conn, None
                # Closing the session is what drops its locks on the server: throw the
                # connection away rather than return a session holding locks to the pool.
                try:
                    conn.invalidate()
                finally:
                    conn.close()

    # -- locks --------------------------------------------------------------------

    def try_acquire(self, overage_id: int) -> bool:
        """Take the claim on ``overage_id`` unless another live sync holds it."""
        with self._guard:
            if overage_id in self.held:
                return True
            if self.store.is_postgres:
                got = self._connection().execute(
                    sa.text("SELECT pg_try_advisory_lock(:ns, :id)"), {"ns": PG_NAMESPACE, "id": overage_id}
                )
                ok = bool(got.scalar())
            elif self.store.is_mysql:
                conn = self._connection()
                got = conn.execute(sa.text("SELECT GET_LOCK(:name, 0)"), {"name": self._mysql_prefix + str(overage_id)})
                ok = got.scalar() == 1
            else:
                if self._file is None:
                    self._file = _FileLocks.for_engine(self.store.engine)
                ok = self._file.try_acquire(overage_id)
            if ok:
                self.held.add(overage_id)
            return ok

    def release(self, overage_id: int) -> None:
        """Give up the claim on ``overage_id`` (a no-op when not held)."""
        with self._guard:
            if overage_id not in self.held:
                return
            self.held.discard(overage_id)
            try:
                if self.store.is_postgres and self._conn is not None:
                    self._conn.execute(
                        sa.text("SELECT pg_advisory_unlock(:ns, :id)"), {"ns": PG_NAMESPACE, "id": overage_id}
                    )
                elif self.store.is_mysql and self._conn is not None:
                    self._conn.execute(
                        sa.text("SELECT RELEASE_LOCK(:name)"), {"name": self._mysql_prefix + str(overage_id)}
                    )
                elif self._file is not None:
                    self._file.release(overage_id)
            except Exception:
                log.warning("could not release the claim on overage %s; it goes with the connection", overage_id)

    def alive(self) -> bool:
        """True while the session that holds the locks is still connected."""
        with self._guard:
            if self._conn is None:
                return True
            try:
                self._conn.exec_driver_sql("SELECT 1")
            except Exception:
                return False
            return True


class _FileLocks:
    """SQLite: record locks on a file beside the database, plus a registry for this process's threads.

    POSIX record locks belong to the process (two threads never exclude each
    other) and closing *any* descriptor of the file drops them all, so there is one
    descriptor per file per process, opened once and never closed.
    """

    _registry: t.ClassVar[dict[str, _FileLocks]] = {}
    _registry_lock: t.ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.ids: set[int] = set()
        self.lock = threading.Lock()
        self.fd: int | None = None
        self.pid = os.getpid()
        if path is not None:
            try:
                import fcntl  # noqa: F401

                self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            except (ImportError, OSError) as exc:
                log.warning("overage claims are local to this process: cannot lock %s (%s)", path, exc)

    @classmethod
    def for_engine(cls, engine: sa.Engine) -> _FileLocks:
        database = engine.url.database
        path = None
        if database and database != ":memory:" and not database.startswith("file:"):
            path = os.path.abspath(database) + "-ai-metering-sync.lock"
        key = f"{os.getpid()}:{path or id(engine)}"
        with cls._registry_lock:
            found = cls._registry.get(key)
            if found is None:
                found = cls._registry[key] = cls(path)
            return found

    def try_acquire(self, overage_id: int) -> bool:
        with self.lock:
            if overage_id in self.ids:
                return False  # another thread of this process holds it
            if self.fd is not None:
                import fcntl

                try:
                    fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, overage_id)
                except OSError:
                    return False
            self.ids.add(overage_id)
            return True

    def release(self, overage_id: int) -> None:
        with self.lock:
            if overage_id not in self.ids:
                return
            self.ids.discard(overage_id)
            if self.fd is not None:
                import fcntl

                fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, overage_id)
