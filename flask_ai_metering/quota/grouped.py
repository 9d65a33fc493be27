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

:class:`GroupCommit` groups PostgreSQL's one-statement commits by counter and
:class:`GroupHold` its one-statement holds by billable; both sit on :class:`Grouped`.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import typing as t

from sqlalchemy import exc as sa_exc

from . import postgres

if t.TYPE_CHECKING:
    from ..transactions import Transactions
    from .engine import CounterState
    from .policy import Policy


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


Outcome = tuple[int, "CounterState"]


@dataclasses.dataclass(frozen=True)
class _Commit:
    store: Transactions
    true_up: postgres.TrueUp
    values: dict[str, t.Any]


def _alone(commit: _Commit) -> Outcome:
    work = functools.partial(postgres.commit, true_up=commit.true_up, values=commit.values)
    return commit.store.run(work, autocommit=True)


def _write_commits(group: list[_Commit]) -> list[Outcome | BaseException]:
    if len(group) == 1:
        return [_alone(group[0])]
    work = functools.partial(postgres.commit_many, items=[(c.true_up, c.values) for c in group])
    try:
        usage_ids, state = group[0].store.run(work, autocommit=True)
    except (sa_exc.IntegrityError, sa_exc.DataError):
        # Refused whole, nothing written: write each alone, so each gets its own answer.
        outcomes: list[Outcome | BaseException] = []
        for each in group:
            try:
                outcomes.append(_alone(each))
            except Exception as error:
                outcomes.append(error)
        return outcomes
    return [(usage_ids[c.true_up.reservation_id], state) for c in group]


class GroupCommit:
    """Writes PostgreSQL's one-statement commits, several at once on a busy counter."""

    def __init__(self) -> None:
        self._grouped: Grouped[_Commit, Outcome] = Grouped(_write_commits)

    def commit(self, store: Transactions, true_up: postgres.TrueUp, values: dict[str, t.Any]) -> Outcome:
        """Write one call's commit; return its usage id and the counter after it."""
        return self._grouped.submit(true_up.counter_id, _Commit(store, true_up, values))


@dataclasses.dataclass(frozen=True)
class _Hold:
    store: Transactions
    recent: Policy
    request: postgres.HoldRequest
    enforce: bool
    mode_from_plan: bool
    feature: str | None


def _write_holds(group: list[_Hold]) -> list[t.Any]:
    first = group[0]
    if len(group) == 1:
        work = functools.partial(
            postgres.reserve_pinned,
            recent=first.recent,
            request=first.request,
            enforce=first.enforce,
            mode_from_plan=first.mode_from_plan,
            feature=first.feature,
        )
    else:
        work = functools.partial(
            postgres.reserve_pinned_many,
            recent=first.recent,
            requests=[h.request for h in group],
            enforce=first.enforce,
            mode_from_plan=first.mode_from_plan,
            feature=first.feature,
            now=max(h.request.created_at for h in group),
        )
    try:
        written = first.store.run(work, autocommit=True)
    except (sa_exc.IntegrityError, sa_exc.DataError):
        # Refused whole (a key already claimed, say), nothing written: each call tries on its own.
        return [None] * len(group)
    if len(group) == 1:
        return [written]
    return written if written is not None else [None] * len(group)


class GroupHold:
    """Holds quota for PostgreSQL calls, several at once on a busy counter."""

    def __init__(self) -> None:
        self._grouped: Grouped[_Hold, t.Any] = Grouped(_write_holds)

    def hold(
        self,
        store: Transactions,
        recent: Policy,
        request: postgres.HoldRequest,
        *,
        enforce: bool,
        mode_from_plan: bool,
        feature: str | None,
    ) -> t.Any:
        """The held row (``reservation_id``, ``counter_id`` and the policy's terms), or None."""
        key = (recent, enforce, mode_from_plan, feature)
        return self._grouped.submit(key, _Hold(store, recent, request, enforce, mode_from_plan, feature))
