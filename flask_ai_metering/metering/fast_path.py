"""The dialect's fast path: chosen once per app, so the portable code never asks which database.

On PostgreSQL (:class:`PostgresFastPath`) a hold is one autocommitted statement
that reads the policy and holds quota on the counter the billable's last policy
read named, grouped with the holds queued beside it; a commit is one statement
that settles, trues up and writes the ledger row, grouped likewise. Each method
returns None when it cannot decide alone (a first use of a period, a refusal to
explain, a credits call, an overage to price), and the caller then runs the
portable transaction. Elsewhere :class:`NoFastPath` always answers None.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import typing as t

import sqlalchemy as sa

from ..models import utcnow
from ..quota import budgets
from ..quota import postgres
from ..quota.grouped import GroupCommit
from ..quota.grouped import GroupHold
from ..quota.policy import RecentPolicies
from ..quota.policy import with_terms
from .holds import HoldSize
from .holds import current_policy
from .ledger import replay_of
from .ledger import to_payload
from .spec import Hold
from .spec import Replay

if t.TYPE_CHECKING:
    from ..quota.engine import CounterState
    from ..quota.policy import Policy
    from ..runtime import Runtime
    from ..transactions import Transactions
    from .spec import CallSpec


#: What a one-statement commit returns: the usage id (None when queued), the plan's counter
#: and the budget counters after it.
Committed = tuple[int | None, "CounterState", "list[budgets.Standing]"]


class FastPath(t.Protocol):
    """What the portable reserve and commit ask of a dialect's fast path."""

    def remember(self, policy: Policy) -> None:
        """Note the billable's policy just read (the counter the next hold aims at)."""

    def try_hold(self, rt: Runtime, spec: CallSpec, size: HoldSize, at: dt.datetime) -> Hold | Replay | None:
        """The call's hold or replay, or None to take the portable transaction."""

    def try_commit(self, rt: Runtime, hold: Hold, values: dict[str, t.Any], cost_units: int) -> Committed | None:
        """The usage id (None when queued), the counter and budget counters after the commit, or None."""


class NoFastPath:
    """Every phase takes the portable transaction."""

    def remember(self, policy: Policy) -> None:
        return None

    def try_hold(self, rt: Runtime, spec: CallSpec, size: HoldSize, at: dt.datetime) -> Hold | Replay | None:
        return None

    def try_commit(self, rt: Runtime, hold: Hold, values: dict[str, t.Any], cost_units: int) -> Committed | None:
        return None


class PostgresFastPath:
    """PostgreSQL's one-statement phases, grouped on a busy counter (see :mod:`..quota.grouped`)."""

    def __init__(self) -> None:
        #: The last policy read per billable: names the counter a hold aims at (never trusted for a limit).
        self.recent = RecentPolicies()
        #: Writes the one-statement commits, several at once on a busy counter.
        self.commits = GroupCommit()
        #: Holds quota, several calls of one billable at once.
        self.holds = GroupHold()
        #: Budgets by id, as the one-statement hold names them (a budget's terms never change).
        self.budget_terms = budgets.TermsCache()

    def remember(self, policy: Policy) -> None:
        self.recent.remember(policy)

    def try_hold(self, rt: Runtime, spec: CallSpec, size: HoldSize, at: dt.datetime) -> Hold | Replay | None:
        if spec.idempotency_key is not None:
            replay = rt.store.run(functools.partial(replay_of, spec=spec), autocommit=True)
            if replay is not None:
                return replay
        held = self._grouped(rt, spec, size, at)
        if held is not None:
            return held
        return rt.store.run(functools.partial(self._pinned, rt, spec, size, at), autocommit=True)

    def _grouped(self, rt: Runtime, spec: CallSpec, size: HoldSize, at: dt.datetime) -> Hold | None:
        """The hold in one statement shared with the calls queued beside it, on the remembered policy."""
        recent = self.recent.get(spec.billable, at)
        if recent is None or spec.billing_mode not in (None, "plan"):
            return None
        if recent.has_budgets:
            return rt.store.run(functools.partial(self._budgeted, rt, spec, size, at, recent), autocommit=True)
        row = self.holds.hold(
            rt.store,
            recent,
            _request(rt, spec, size, at),
            enforce=size.enforce,
            mode_from_plan=spec.billing_mode is None,
            feature=spec.feature,
        )
        return None if row is None else _pinned_hold(row, recent, size)

    def _pinned(
        self, rt: Runtime, spec: CallSpec, size: HoldSize, at: dt.datetime, conn: sa.Connection
    ) -> Hold | Replay | None:
        """Read the policy afresh, then hold in one statement on the counter it names."""
        replay = replay_of(conn, spec)
        if replay is not None:
            return replay
        policy = current_policy(rt, spec, conn, at)
        mode = spec.billing_mode or policy.billing_mode
        if mode != "plan" or policy.expired:
            return None
        if policy.has_budgets:
            return self._budgeted(rt, spec, size, at, policy, conn)
        row = postgres.reserve_pinned(
            conn,
            policy,
            _request(rt, spec, size, at),
            enforce=size.enforce,
            mode_from_plan=spec.billing_mode is None,
            feature=spec.feature,
        )
        return None if row is None else _pinned_hold(row, policy, size)

    def _budgeted(
        self, rt: Runtime, spec: CallSpec, size: HoldSize, at: dt.datetime, policy: Policy, conn: sa.Connection
    ) -> Hold | None:
        """The hold on the plan's counter and every matching budget's, in one statement."""
        row = postgres.reserve_budgeted(
            conn,
            policy,
            _request(rt, spec, size, at),
            enforce=size.enforce,
            mode_from_plan=spec.billing_mode is None,
            feature=spec.feature,
            user_id=spec.user_id,
            model=spec.model,
            timezone=rt.settings.timezone,
        )
        if row is None:
            return None
        pairs = [(int(counter_id), int(budget_id)) for counter_id, budget_id in row.budget_counters or []]
        terms = self.budget_terms.get(conn, [budget_id for _, budget_id in pairs])
        hold = _pinned_hold(row, policy, size)
        return dataclasses.replace(hold, budgets=tuple((cid, terms[bid]) for cid, bid in sorted(pairs)))

    def try_commit(self, rt: Runtime, hold: Hold, values: dict[str, t.Any], cost_units: int) -> Committed | None:
        if hold.wallet_id is not None or rt.settings.overage_behavior == "charge":
            return None  # the wallet or the overage needs the portable transaction's locks
        if hold.budgets and rt.settings.queue_recording:
            return None  # the budgets' true-up is in the portable transaction only
        true_up = postgres.TrueUp(
            hold.reservation_id,
            hold.counter_id,
            values["occurred_at"],
            values["total_tokens"],
            cost_units,
            hold.tokens,
            hold.cost_units,
        )
        if rt.settings.queue_recording:
            work = functools.partial(postgres.commit_queued, true_up=true_up, payload=to_payload(values))
            state = rt.store.run(work, autocommit=True)
            # None: the sweeper expired the hold first, and the portable path records it.
            return None if state is None else (None, state, [])
        row = {**values, "created_at": utcnow()}
        if hold.budgets:
            budgeted = functools.partial(postgres.commit_budgeted, true_up=true_up, values=row, held=hold.budgets)
            return rt.store.run(budgeted, autocommit=True)
        usage_id, state = self.commits.commit(rt.store, true_up, row)
        return usage_id, state, []


def choose_fast_path(store: Transactions) -> FastPath:
    """The fast path for the app's database: PostgreSQL's one-statement phases, or none."""
    return PostgresFastPath() if store.is_postgres else NoFastPath()


def _request(rt: Runtime, spec: CallSpec, size: HoldSize, at: dt.datetime) -> postgres.HoldRequest:
    expires_at = at + dt.timedelta(seconds=rt.settings.reservation_ttl)
    return postgres.HoldRequest(
        size.tokens, size.cost_units, spec.idempotency_key, spec.scope, expires_at, at, rt.settings.durable_holds
    )


def _pinned_hold(row: t.Any, policy: Policy, size: HoldSize) -> Hold:
    """The hold a one-statement reserve wrote, under the policy terms it read."""
    return Hold(
        row.reservation_id, row.counter_id, with_terms(policy, row), "plan", size.tokens, size.cost_units, None, 0
    )
