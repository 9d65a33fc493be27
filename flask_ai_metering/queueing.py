"""Queued recording: the usage row is written by a Celery task, off the request path.

With ``AI_METERING_QUEUE_RECORDING`` the commit stays synchronous (quota is
exact), but the ledger row waits in the reservation's ``payload`` (an outbox)
and a task writes it. Nothing is lost on the way:

* the task is ``acks_late`` and ``reject_on_worker_lost``: a worker killed
  mid-task leaves the message unacknowledged and the broker hands it to the
  next worker (on Redis once ``visibility_timeout`` has passed);
* writing is idempotent (:func:`flask_ai_metering.metering.outbox.write_outbox`: a row
  lock, a unique ``reservation_id``, the payload cleared in the same
  transaction), so a redelivered or duplicated task writes nothing twice;
* the request does not wait for the broker: a per-process thread publishes,
  and a publish that fails is written by that thread instead;
  :func:`flush_outbox` writes whatever is still pending (run it from cron
  through ``flask ai-metering expire-reservations``), e.g. after a process died.

Wiring, in the web app and in the worker, from the same app factory::

    # worker.py  --  run:  celery -A worker:celery worker
    from myapp import create_app
    from flask_ai_metering.queueing import make_celery

    app = create_app()
    celery = make_celery(app)

``make_celery`` reuses the app's own Celery app when it follows Flask's
documented pattern (``app.extensions["celery"]``), and otherwise builds one from
``app.config["CELERY"]``, Flask's documented key (e.g.
``CELERY={"broker_url": "redis://localhost:6379/0"}``). The web process needs
no set-up: the first queued commit builds the Celery app the same way.
"""

from __future__ import annotations

import datetime as dt
import logging
import queue
import threading
import typing as t
import weakref

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from .metering.outbox import write_outbox
from .models import Reservation
from .models import table
from .models import utcnow

if t.TYPE_CHECKING:
    from celery import Celery
    from flask import Flask

    from .runtime import Runtime

#: The Celery task name (route it with ``task_routes`` to a queue of its own).
TASK_NAME = "flask_ai_metering.write_usage"

#: Settings of a Celery app built by :func:`make_celery`; ``app.config["CELERY"]`` wins.
CELERY_DEFAULTS: dict[str, t.Any] = {
    "task_ignore_result": True,
    "task_acks_late": True,
    "task_reject_on_worker_lost": True,
    "worker_prefetch_multiplier": 1,
    # Writing is idempotent, so a short redelivery delay only costs a no-op duplicate.
    "broker_transport_options": {"visibility_timeout": 300},
}

# A publish that cannot reach the broker quickly is written by the publisher thread.
_PUBLISH_RETRY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.05, "interval_max": 0.1}

reservations = table(Reservation)

_apps: weakref.WeakKeyDictionary[Flask, Celery] = weakref.WeakKeyDictionary()
_flask_of: weakref.WeakKeyDictionary[Celery, Flask] = weakref.WeakKeyDictionary()
_lock = threading.Lock()
log = logging.getLogger("flask_ai_metering")


def make_celery(app: Flask, celery: Celery | None = None) -> Celery:
    """Register the usage-writing task for ``app`` on a Celery app, and return that Celery app.

    :param celery: the Celery app to use; default ``app.extensions["celery"]``,
        else a new one configured from :data:`CELERY_DEFAULTS` and ``app.config["CELERY"]``.
    """
    from celery import Celery

    celery = celery or app.extensions.get("celery")
    if celery is None:
        celery = Celery(app.import_name)
        celery.config_from_object({**CELERY_DEFAULTS, **app.config.get("CELERY", {})})
    celery.task(
        name=TASK_NAME,
        bind=True,
        shared=False,
        acks_late=True,
        reject_on_worker_lost=True,
        ignore_result=True,
        autoretry_for=(sa_exc.DBAPIError,),
        retry_backoff=True,
        retry_backoff_max=60,
        max_retries=20,
    )(_write_usage)
    with _lock:
        _apps[app] = celery
        _flask_of[celery] = app
    return celery


def _write_usage(task: t.Any, reservation_id: int) -> int | None:
    """The task body: write one reservation's queued usage row (a no-op when already written)."""
    app = _flask_of[task.app]
    with app.app_context():
        return write_outbox(app.extensions["ai_metering"].runtime().store, reservation_id)


def celery_for(app: Flask) -> Celery:
    """The Celery app queued usage of ``app`` goes through (built on first use)."""
    with _lock:
        celery = _apps.get(app)
    return celery if celery is not None else make_celery(app)


class _Publisher:
    """One daemon thread per process that hands queued rows to the broker.

    The request only drops a reservation id on an in-memory queue: a broker round
    trip costs more than the INSERT it saves. The row is already durable in the
    outbox, so nothing is lost if this process dies before publishing (cron's
    ``expire-reservations`` flushes it), and a publish the broker refuses is
    written right here, off the request path.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Runtime, int]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start = threading.Lock()
        #: Submitted ids not yet handed on: drain() waits for this, not for an empty queue.
        self._pending = 0
        self._idle = threading.Condition()

    def submit(self, rt: Runtime, reservation_id: int) -> None:
        if self._thread is None or not self._thread.is_alive():
            with self._start:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._run, name="ai-metering-publisher", daemon=True)
                    self._thread.start()
        with self._idle:
            self._pending += 1
        self._queue.put((rt, reservation_id))

    def _run(self) -> None:
        while True:
            rt, reservation_id = self._queue.get()
            try:
                self._hand_on(rt, reservation_id)
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()

    def _hand_on(self, rt: Runtime, reservation_id: int) -> None:
        try:
            celery_for(rt.app).send_task(
                TASK_NAME, args=(reservation_id,), ignore_result=True, retry=True, retry_policy=_PUBLISH_RETRY
            )
        except Exception:
            log.warning("could not queue usage of reservation %s; writing it now", reservation_id, exc_info=True)
            try:
                write_outbox(rt.store, reservation_id)
            except Exception:
                log.exception("usage of reservation %s stays in the outbox until the next flush", reservation_id)

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until every submitted id was handed on (for tests and clean shut-downs)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)


_publisher = _Publisher()


def enqueue_usage(rt: Runtime, reservation_id: int) -> None:
    """Queue the task that writes ``reservation_id``'s usage row, without waiting for the broker."""
    _publisher.submit(rt, reservation_id)


def drain(timeout: float = 10.0) -> bool:
    """Wait until this process has handed every queued row to the broker (or written it)."""
    return _publisher.drain(timeout)


def flush_outbox(rt: Runtime, *, older_than: dt.timedelta = dt.timedelta(0)) -> int:
    """Write every committed usage row still waiting in the outbox; return how many were written.

    The safety net for tasks that were never published or gave up: safe beside a
    running worker, since each write is idempotent. ``older_than`` leaves recent
    rows to the queue.
    """
    # Any settled reservation with a payload: a late commit that lost to the sweeper
    # leaves its row on an ``expired`` reservation, and that row must land too.
    conditions = [reservations.c.status != "pending", reservations.c.payload.is_not(None)]
    if older_than:
        conditions.append(reservations.c.settled_at <= utcnow() - older_than)
    pending = sa.and_(*conditions)
    written = 0
    last_id = 0
    while True:
        with rt.store.engine.connect() as conn:
            ids = list(
                conn.execute(
                    sa.select(reservations.c.id)
                    .where(pending, reservations.c.id > last_id)
                    .order_by(reservations.c.id)
                    .limit(rt.settings.batch_size)
                ).scalars()
            )
        for reservation_id in ids:
            try:
                written += write_outbox(rt.store, reservation_id) is not None
            except Exception:
                # One row that cannot be written must not hold back the rows after it.
                log.exception("could not write the queued usage of reservation %s", reservation_id)
        if len(ids) < rt.settings.batch_size:
            return written
        last_id = ids[-1]
