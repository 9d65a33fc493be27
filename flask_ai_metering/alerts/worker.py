"""The background deliverer: one daemon thread per app per process (``AI_METERING_ALERT_DELIVERY="thread"``).

It starts on the first :func:`wake` (after a commit that wrote an alert), delivers
what is due, then sleeps until the next retry is due (polling at least every
:data:`POLL_SECONDS`, so a claim left by a dead deliverer is taken over) and
stops once nothing undelivered with attempts left remains; the next :func:`wake`
starts it again. So an idle app runs no thread, and a thread never outlives the
work that started it by more than a poll.

It shares nothing with other deliverers but the database: each row is claimed by a
guarded UPDATE before it is sent (:mod:`.delivery`), so this thread, the threads of
other processes and a cron'd ``flask ai-metering deliver-alerts`` never send one
alert at the same time. Daemonic, so it never keeps the interpreter alive; alerts it
had not sent stay in the outbox for the next deliverer.

Fork-safe: a forked child (gunicorn's workers after ``--preload``) inherits no
thread, so the registry is cleared in the child and each child starts its own.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import typing as t

from ..models import utcnow
from .delivery import deliver_due
from .delivery import next_due

if t.TYPE_CHECKING:
    from flask import Flask

    from ..runtime import Runtime

log = logging.getLogger("flask_ai_metering")

#: The longest the thread sleeps while alerts wait (for retries, or a dead deliverer's claim).
POLL_SECONDS = 5.0
#: Database errors in a row after which the thread stops (the next wake, or the CLI, resumes).
MAX_ERRORS = 5

_lock = threading.Lock()
_workers: dict[Flask, _Worker] = {}


class _Worker:
    """One app's deliverer thread in this process."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.pid = os.getpid()
        self.wakeup = threading.Event()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="ai-metering-alerts", daemon=True)

    def alive(self) -> bool:
        return self.pid == os.getpid() and self.thread.is_alive()

    def _run(self) -> None:
        errors = 0
        while not self.stopping:
            # Cleared before looking, so a wake during the pass makes the next one run.
            self.wakeup.clear()
            try:
                deliver_due(self.rt)
                due = next_due(self.rt)
                errors = 0
            except Exception:
                errors += 1
                log.exception("alert delivery failed (%d in a row)", errors)
                if errors >= MAX_ERRORS:
                    log.warning("alert delivery thread stops; the next alert or `deliver-alerts` resumes it")
                    self._leave()
                    return
                due = utcnow() + dt.timedelta(seconds=POLL_SECONDS * errors)
            if due is None and self._leave_if_idle():
                return
            wait = POLL_SECONDS if due is None else (due - utcnow()).total_seconds()
            self.wakeup.wait(min(max(wait, 0.05), POLL_SECONDS))
        self._leave()

    def _leave_if_idle(self) -> bool:
        # Under the registry lock, so a wake either sets the event before this check
        # (and the loop goes on) or finds this worker gone and starts another.
        with _lock:
            if self.wakeup.is_set() and not self.stopping:
                return False
            self._leave_locked()
            return True

    def _leave(self) -> None:
        with _lock:
            self._leave_locked()

    def _leave_locked(self) -> None:
        if _workers.get(self.rt.app) is self:
            del _workers[self.rt.app]


def wake(rt: Runtime) -> None:
    """Have this process's deliverer thread for ``rt``'s app send due alerts now (starting it if needed).

    Call it after the transaction that wrote an alert (:func:`.outbox.write_alert`
    returned True) has committed. Does nothing unless a webhook URL is set and
    ``AI_METERING_ALERT_DELIVERY`` is ``"thread"``; cheap enough for a request.
    """
    settings = rt.settings
    if not settings.alert_webhook_url or settings.alert_delivery != "thread":
        return
    with _lock:
        worker = _workers.get(rt.app)
        if worker is not None and worker.alive() and not worker.stopping:
            worker.wakeup.set()
            return
        worker = _Worker(rt)
        _workers[rt.app] = worker
        worker.thread.start()


def running(app: Flask) -> bool:
    """True while this process runs a deliverer thread for ``app``."""
    with _lock:
        worker = _workers.get(app)
    return worker is not None and worker.alive()


def stop(app: Flask | None = None, *, timeout: float = 30.0) -> bool:
    """Stop the deliverer thread of ``app`` (None: of every app) and wait for it; True when all ended.

    For tests and orderly shut-downs. A POST in flight finishes first (within the
    webhook timeout); what is left stays in the outbox. A later :func:`wake` starts
    a new thread.
    """
    with _lock:
        chosen = [w for a, w in _workers.items() if app is None or a is app]
        for worker in chosen:
            worker.stopping = True
            worker.wakeup.set()
            del _workers[worker.rt.app]
    for worker in chosen:
        if worker.alive() and worker.thread is not threading.current_thread():
            worker.thread.join(timeout)
    return not any(worker.alive() for worker in chosen)


def _forget_after_fork() -> None:
    """In a forked child: the parent's threads do not exist here, nor may its lock be held."""
    global _lock
    _lock = threading.Lock()
    _workers.clear()


if hasattr(os, "register_at_fork"):  # pragma: no branch - absent only on Windows
    os.register_at_fork(after_in_child=_forget_after_fork)
