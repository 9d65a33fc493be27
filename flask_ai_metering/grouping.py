"""Writes that queue on one row are made together: one statement and one WAL flush for several calls.

On PostgreSQL a metered call's hold and its commit each update the billable's
counter row, and a row lock is held until the transaction's WAL flush: on one
hot counter the writes run one flush at a time, whatever the number of callers.
PostgreSQL's own group commit cannot share a flush between transactions waiting
on the same row, so this does it one level up, within a process. The first write
on a key is made at once, alone; writes arriving meanwhile wait, and the first of
them then makes them all together. There is no timer: a write that finds nobody
writing never waits.

Each caller still returns only once its own part is durable, with its own result.
"""

from __future__ import annotations

import threading
import typing as t

Item = t.TypeVar("Item")
Result = t.TypeVar("Result")

#: Makes a group's writes: one result (or the exception for that item) per item, in order.
Writer = t.Callable[[list[Item]], list[Result | BaseException]]


class _Waiting(t.Generic[Item, Result]):
    __slots__ = ("item", "ready", "result", "error", "group")

    def __init__(self, item: Item) -> None:
        self.item = item
        self.ready = threading.Event()
        self.result: Result | None = None
        self.error: BaseException | None = None
        #: Set when this one is handed the next group to write (itself included).
        self.group: list[_Waiting[Item, Result]] | None = None

    def outcome(self) -> Result:
        if self.error is not None:
            raise self.error
        return t.cast(Result, self.result)


class Grouped(t.Generic[Item, Result]):
    """Per-process grouping of writes by key (a counter row)."""

    def __init__(self, write: Writer[Item, Result]) -> None:
        self._write = write
        self._lock = threading.Lock()
        #: Key → the items waiting for the write in progress on it.
        self._waiting: dict[t.Hashable, list[_Waiting[Item, Result]]] = {}

    def submit(self, key: t.Hashable, item: Item) -> Result:
        """Write ``item`` alone, or with whichever items of ``key`` queue behind another write."""
        mine: _Waiting[Item, Result] = _Waiting(item)
        with self._lock:
            queue = self._waiting.get(key)
            if queue is None:
                self._waiting[key] = []
            else:
                queue.append(mine)
        if queue is not None:
            mine.ready.wait()
            if mine.group is None:
                return mine.outcome()
        try:
            self._make(mine.group or [mine])
        finally:
            self._hand_on(key)
        return mine.outcome()

    def _hand_on(self, key: t.Hashable) -> None:
        """Give the items that queued meanwhile to the first of them to write, or close the queue."""
        with self._lock:
            queue = self._waiting.pop(key)
            if queue:
                self._waiting[key] = []
                queue[0].group = queue
                queue[0].ready.set()

    def _make(self, group: list[_Waiting[Item, Result]]) -> None:
        try:
            for each, outcome in zip(group, self._write([w.item for w in group]), strict=True):
                if isinstance(outcome, BaseException):
                    each.error = outcome
                else:
                    each.result = outcome
        except BaseException as error:
            for each in group:
                if each.result is None and each.error is None:
                    each.error = error
            raise
        finally:
            for each in group[1:]:
                each.ready.set()
