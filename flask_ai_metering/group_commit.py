"""Group commit: the commits that queue on one counter are written together.

On PostgreSQL each metered call's commit updates its counter row, and a row lock
is held until the transaction's WAL flush: on one hot counter the commits run one
flush at a time, whatever the number of callers. PostgreSQL's own group commit
cannot share a flush between transactions that wait on the same row, so this does
it one level up, within a process. The first commit on a counter is written at
once, alone; commits that arrive while it is being written wait, and the first of
them then writes them all in one statement (:func:`~flask_ai_metering.postgres.commit_many`)
and one flush. There is no timer: a commit that finds nobody writing never waits.

Each caller still returns only once its own row is durable, and gets its own
usage id. If the shared statement is refused (an integrity or data error: nothing
was written), each commit is written alone so each caller gets its own answer; any
other error (the outcome is unknown, as for a single commit) is raised to every
caller of the group.
"""

from __future__ import annotations

import functools
import threading
import typing as t

from sqlalchemy import exc as sa_exc

from . import postgres

if t.TYPE_CHECKING:
    from .quota import CounterState
    from .storage import Store

Outcome = tuple[int, "CounterState"]


class _Commit:
    __slots__ = ("true_up", "values", "ready", "outcome", "error", "group")

    def __init__(self, true_up: postgres.TrueUp, values: dict[str, t.Any]) -> None:
        self.true_up = true_up
        self.values = values
        self.ready = threading.Event()
        self.outcome: Outcome | None = None
        self.error: BaseException | None = None
        #: Set when this commit is handed the next group to write (its own included).
        self.group: list[_Commit] | None = None

    def result(self) -> Outcome:
        if self.error is not None:
            raise self.error
        assert self.outcome is not None
        return self.outcome


class GroupCommit:
    """Per-process group commit of PostgreSQL's one-statement commits, by counter."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: Counter id → the commits waiting for the write in progress on it.
        self._waiting: dict[int, list[_Commit]] = {}

    def commit(self, store: Store, true_up: postgres.TrueUp, values: dict[str, t.Any]) -> Outcome:
        """Write one call's commit, with whichever commits on its counter queue behind another."""
        mine = _Commit(true_up, values)
        counter = true_up.counter_id
        with self._lock:
            queue = self._waiting.get(counter)
            if queue is None:
                self._waiting[counter] = []
            else:
                queue.append(mine)
        if queue is not None:
            mine.ready.wait()
            if mine.group is None:
                return mine.result()
        try:
            self._write(store, mine.group or [mine])
        finally:
            self._hand_on(counter)
        return mine.result()

    def _hand_on(self, counter: int) -> None:
        """Give the commits that queued meanwhile to the first of them to write, or close the queue."""
        with self._lock:
            queue = self._waiting.pop(counter)
            if queue:
                self._waiting[counter] = []
                queue[0].group = queue
                queue[0].ready.set()

    @staticmethod
    def _write(store: Store, group: list[_Commit]) -> None:
        try:
            if len(group) == 1:
                group[0].outcome = store.run(_alone(group[0]), autocommit=True)
                return
            items = [(c.true_up, c.values) for c in group]
            try:
                usage_ids, state = store.run(lambda conn: postgres.commit_many(conn, items), autocommit=True)
            except (sa_exc.IntegrityError, sa_exc.DataError):
                # Refused whole, nothing written: write each alone, so each gets its own answer.
                for each in group:
                    try:
                        each.outcome = store.run(_alone(each), autocommit=True)
                    except Exception as error:
                        each.error = error
                return
            for each in group:
                each.outcome = (usage_ids[each.true_up.reservation_id], state)
        except BaseException as error:
            for each in group:
                if each.outcome is None and each.error is None:
                    each.error = error
            raise
        finally:
            for each in group[1:]:
                each.ready.set()


def _alone(commit: _Commit) -> t.Callable[[t.Any], Outcome]:
    """The work of writing ``commit`` in a statement of its own."""
    return functools.partial(postgres.commit, true_up=commit.true_up, values=commit.values)
