"""SQLite's metering writers queue across processes on a ``flock`` beside the database."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import textwrap
import threading

import pytest
import sqlalchemy as sa

from flask_ai_metering.writer_lock import SUFFIX
from flask_ai_metering.writer_lock import WriterLock
from flask_ai_metering.writer_lock import writer_lock

from .conftest import add_plan

TEAM = ("Team", "locks")

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")


def _holder(path: str) -> subprocess.Popen[str]:
    """Another process that holds the lock file until its stdin closes."""
    code = textwrap.dedent(
        f"""
        import fcntl, os, sys
        fd = os.open({path!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("held", flush=True)
        sys.stdin.read()
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_metered_write_waits_for_another_process_holding_the_lock(make_app):
    app, db, meter = make_app()
    with app.app_context():
        add_plan(db, slug="basic", token_limit=10_000)
        meter.subscribe(TEAM, "basic")
        path = db.engine.url.database + SUFFIX
        assert writer_lock(db.engine).path == path
        holder = _holder(path)
        done = threading.Event()

        def call() -> None:
            with app.app_context():
                meter.call(lambda: None, billable=TEAM, provider="manual", max_tokens=10, usage={"output_tokens": 5})
            done.set()

        worker = threading.Thread(target=call)
        worker.start()
        try:
            # The other process holds the lock: the call's hold cannot start.
            assert not done.wait(0.5)
        finally:
            assert holder.stdin is not None
            holder.stdin.close()
            holder.wait(10)
            assert holder.stdout is not None
            holder.stdout.close()
        assert done.wait(10), "the call did not proceed once the other process let go"
        worker.join()
        assert meter.check(TEAM).remaining_tokens == 10_000 - 5


def test_engines_on_one_file_share_the_lock_and_nest(tmp_path):
    url = f"sqlite:///{tmp_path / 'one.sqlite'}"
    first, second = sa.create_engine(url), sa.create_engine(url)
    lock = writer_lock(first)
    assert writer_lock(second) is lock
    with lock, writer_lock(second):  # one thread, nested, through two engines: no self-deadlock
        pass
    first.dispose()
    second.dispose()


def test_an_in_memory_database_has_no_lock_file():
    engine = sa.create_engine("sqlite://")
    assert writer_lock(engine).path is None
    with writer_lock(engine):
        pass
    engine.dispose()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_worker_waits_for_its_parent(tmp_path):
    """A worker forked with the lock file open (gunicorn's ``--preload``) opens its own, so it really waits.

    An inherited descriptor shares the parent's ``flock``: the child would get in at once.
    """
    lock = WriterLock(str(tmp_path / "db.sqlite") + SUFFIX)
    with lock:
        pass  # the descriptor is open in this process now
    go_read, go_write = os.pipe()
    in_read, in_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.read(go_read, 1)
            with lock:
                os.write(in_write, b"x")
        finally:
            os._exit(0)
    try:
        with lock:
            os.write(go_write, b"x")
            # The child must not get in while the parent holds it.
            assert select.select([in_read], [], [], 0.5)[0] == []
        assert select.select([in_read], [], [], 10)[0] == [in_read]
    finally:
        os.waitpid(pid, 0)
        for fd in (go_read, go_write, in_read, in_write):
            os.close(fd)


def test_a_file_system_without_flock_falls_back_to_the_thread_lock(tmp_path, monkeypatch, caplog):
    """``flock`` refused (ENOLCK on some network file systems): metering goes on, said once in the log."""
    import errno

    from flask_ai_metering import writer_lock as module

    def refuse(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(module.fcntl, "flock", refuse)
    lock = WriterLock(str(tmp_path / "db.sqlite") + SUFFIX)
    with caplog.at_level("WARNING", logger="flask_ai_metering"):
        with lock:
            pass
        with lock:
            pass
    assert lock.path is None
    assert len([r for r in caplog.records if "cannot lock" in r.message]) == 1
