"""Group commit of PostgreSQL's one-statement commits, by counter (see :mod:`.grouping`).

A group is written by :func:`~flask_ai_metering.postgres.commit_many`. If the
database refuses it (an integrity or data error: nothing was written), each
commit is written alone so each caller gets its own answer; any other error (the
outcome is unknown, as for a single commit) is raised to every caller of the group.
"""

from __future__ import annotations

import dataclasses
import functools
import typing as t

from sqlalchemy import exc as sa_exc

from . import postgres
from .grouping import Grouped

if t.TYPE_CHECKING:
    from .quota import CounterState
    from .storage import Store

Outcome = tuple[int, "CounterState"]


@dataclasses.dataclass(frozen=True)
class _Commit:
    store: Store
    true_up: postgres.TrueUp
    values: dict[str, t.Any]


def _alone(commit: _Commit) -> Outcome:
    work = functools.partial(postgres.commit, true_up=commit.true_up, values=commit.values)
    return commit.store.run(work, autocommit=True)


def _write(group: list[_Commit]) -> list[Outcome | BaseException]:
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
        self._grouped: Grouped[_Commit, Outcome] = Grouped(_write)

    def commit(self, store: Store, true_up: postgres.TrueUp, values: dict[str, t.Any]) -> Outcome:
        """Write one call's commit; return its usage id and the counter after it."""
        return self._grouped.submit(true_up.counter_id, _Commit(store, true_up, values))
