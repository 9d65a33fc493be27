"""Grouped holds on PostgreSQL: calls of one billable that queue are held in one statement.

A call's hold is PostgreSQL's one-statement reserve against the counter the
billable's last policy read named. Calls that
queue behind one being held (see :mod:`.grouping`) are held together by
:func:`~flask_ai_metering.postgres.reserve_pinned_many`: all of them or none, as
if admitted one by one. When the group does not fit, or the policy changed, no
row is written and every call of the group takes the general path on its own,
which holds what fits and explains a refusal.
"""

from __future__ import annotations

import dataclasses
import functools
import typing as t

from sqlalchemy import exc as sa_exc

from . import postgres
from .grouping import Grouped

if t.TYPE_CHECKING:
    from .policy import Policy
    from .storage import Store


@dataclasses.dataclass(frozen=True)
class _Hold:
    store: Store
    recent: Policy
    request: postgres.HoldRequest
    enforce: bool
    mode_from_plan: bool
    feature: str | None


def _write(group: list[_Hold]) -> list[t.Any]:
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
        self._grouped: Grouped[_Hold, t.Any] = Grouped(_write)

    def hold(
        self,
        store: Store,
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
