"""Blinker signals, sent with the app as sender like Flask's own.

Every signal carries ``billable`` as a ``(type, id)`` tuple among its keyword
arguments. Receivers run after metering's transaction has committed, so a slow
or failing receiver never holds a lock or undoes a recorded call.
"""

from __future__ import annotations

from blinker import Namespace

_signals = Namespace()

#: A usage row was written. Kwargs: billable, usage (``Usage``), usage_id, feature, replayed.
usage_recorded = _signals.signal("usage-recorded")
#: Usage crossed the warning threshold, once per period per billable. Kwargs: billable, check.
limit_approaching = _signals.signal("limit-approaching")
#: A hard limit refused a call. Kwargs: billable, check.
limit_reached = _signals.signal("limit-reached")
#: The provider call raised; nothing was recorded. Kwargs: billable, provider, model, error.
provider_call_failed = _signals.signal("provider-call-failed")
#: Usage beyond the plan's included tokens was priced. Kwargs: billable, overage_id, tokens, amount, currency.
overage_charged = _signals.signal("overage-charged")
#: A billable moved to another plan. Kwargs: billable, old_plan, new_plan, subscription_id.
plan_changed = _signals.signal("plan-changed")
#: Credits were added to a wallet. Kwargs: billable, amount, balance, transaction_id, reason.
credits_added = _signals.signal("credits-added")
#: Credits were taken from a wallet. Kwargs: billable, amount, balance, transaction_id, reason.
credits_deducted = _signals.signal("credits-deducted")
#: A call was refunded (part or all of it). Kwargs: billable, usage_id, refund_id, tokens, cost,
#: reason, credited (back to the wallet), overage_tokens, overage_amount (taken off the overage).
usage_refunded = _signals.signal("usage-refunded")
#: A trial ends within ``AI_METERING_TRIAL_ENDING_DAYS``; once per trial.
#: Kwargs: billable, subscription_id, plan (slug), trial_ends_at, days_left.
trial_ending = _signals.signal("trial-ending")
#: A trial ended; once per trial. Kwargs: billable, subscription_id, plan (slug), trial_ends_at.
trial_ended = _signals.signal("trial-ended")
#: A wallet's available balance went below ``AI_METERING_CREDITS_LOW_THRESHOLD``; once per crossing.
#: Kwargs: billable, wallet_id, balance, available, threshold.
credits_low = _signals.signal("credits-low")
#: Usage of a plan or budget reached one of its alert thresholds; once per threshold per period
#: per counter, however many calls crossed it. Kwargs: billable, budget (the ``Budget``'s id, or
#: None for the plan), plan (slug or None), threshold (percent), usage (percent now), event_id
#: (the id a webhook delivery of the same alert carries), check (the counter's ``LimitCheck``).
threshold_crossed = _signals.signal("threshold-crossed")
#: A subscription ended (and its grace period, if any). Kwargs: billable, subscription_id.
subscription_expired = _signals.signal("subscription-expired")

__all__ = [
    "credits_added",
    "credits_deducted",
    "credits_low",
    "limit_approaching",
    "limit_reached",
    "overage_charged",
    "plan_changed",
    "provider_call_failed",
    "subscription_expired",
    "threshold_crossed",
    "trial_ended",
    "trial_ending",
    "usage_recorded",
    "usage_refunded",
]
