"""One metering writer at a time on a SQLite database, queued without sleeping.

SQLite admits one writer at a time. A connection that finds the write lock taken
waits in SQLite's busy handler, which sleeps 1, 2, 5, 10, 15, 20, 25… ms between
tries however soon the lock is free: two gunicorn workers metering one database
spent most of their time asleep there (the HTTP bench's metered SQLite route ran
at half the speed it has with this lock).

So metering's write transactions queue first on a lock that wakes the next
writer the moment the one before it lets go: a re-entrant thread lock for the
threads of one process, then an exclusive ``flock`` on a file beside the
database (``<database>.metering-lock``) for the processes sharing it. The kernel
drops a dead process's ``flock``, so a crash never leaves the lock held. Writes
outside metering (the app's own ``db.session``) take no part and still meet
SQLite's busy handler; so does every writer where ``flock`` does not exist
(Windows) or the lock file cannot be created (a read-only directory: logged once).
An in-memory database has one process and needs only the thread lock.
"""

from __future__ import annotations

import logging
import os
import threading
import typing as t
import weakref

import sqlalchemy as sa

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("flask_ai_metering")

#: Beside the database file: ``app.sqlite`` → ``app.sqlite.metering-lock``.
SUFFIX = ".metering-lock"


class WriterLock:
    """A re-entrant lock shared by the threads of this process and, by ``flock``, by other processes."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._threads = threading.RLock()
        #: How deep the owning thread has entered (only that thread reads or writes it).
        self._depth = 0
        self._fd: int | None = None
        #: The process that opened ``_fd``: a forked child (gunicorn's workers) opens its own,
        #: since an inherited descriptor would share the parent's lock instead of waiting for it.
        self._pid = 0
        #: This process holds the file lock (set and read by the owning thread only).
        self._locked = False

    def __enter__(self) -> WriterLock:
        self._threads.acquire()
        if self._depth == 0 and self.path is not None:
            try:
                self._locked = self._flock()
            except BaseException:
                self._threads.release()
                raise
        self._depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        try:
            if self._depth == 0 and self._locked:
                self._locked = False
                fcntl.flock(t.cast(int, self._fd), fcntl.LOCK_UN)
        finally:
            self._threads.release()

    def _flock(self) -> bool:
        """Take the file lock; False (and the thread lock alone from now on) where it cannot be had."""
        fd = self._descriptor()
        if fd is None:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as error:  # e.g. ENOLCK on a file system without flock
            log.warning("cannot lock %s (%s): writers of other processes wait in SQLite", self.path, error)
            self.path = None
            return False
        return True

    def _descriptor(self) -> int | None:
        if self._fd is not None and self._pid == os.getpid():
            return self._fd
        assert self.path is not None
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        except OSError as error:
            log.warning("no metering lock file %s (%s): writers of other processes wait in SQLite", self.path, error)
            self.path = None
            return None
        self._pid = os.getpid()
        return self._fd


_LOCKS: weakref.WeakKeyDictionary[sa.Engine, WriterLock] = weakref.WeakKeyDictionary()
#: One lock per database file in this process, whichever engines reach it: a ``flock`` taken
#: through a second descriptor of the same file would wait for the first, even in one thread.
_BY_PATH: dict[str, WriterLock] = {}
_GUARD = threading.Lock()


def writer_lock(engine: sa.Engine) -> WriterLock:
    """The lock metering's write transactions on the SQLite ``engine`` hold."""
    lock = _LOCKS.get(engine)
    if lock is not None:
        return lock
    path = _lock_path(engine)
    with _GUARD:
        lock = _LOCKS.get(engine)
        if lock is None:
            lock = WriterLock(path) if path is None else _BY_PATH.setdefault(path, WriterLock(path))
            _LOCKS[engine] = lock
    return lock


def _lock_path(engine: sa.Engine) -> str | None:
    """The lock file beside the main database's file; None for an in-memory database or no ``flock``."""
    if fcntl is None:  # pragma: no cover - Windows
        return None
    with engine.connect() as conn:
        files = {row[1]: row[2] for row in conn.exec_driver_sql("PRAGMA database_list")}
        conn.rollback()
    path = t.cast(str | None, files.get("main"))
    return f"{path}{SUFFIX}" if path else None
