"""Billing drivers: where priced overage goes to be invoiced.

``AI_METERING_BILLING_DRIVER`` is ``"null"`` (the default: overage is recorded
and reported, never sent anywhere), ``"stripe"``, or a dotted path to a class
implementing :class:`BillingDriver`.

To bill through another provider exactly once, subclass
:class:`~flask_ai_metering.billing.sync.OverageSyncer` and implement two methods::

    class LagoDriver(OverageSyncer):
        requires_customer = False

        def find_remote(self, claim: Claim) -> str | None:
            ...  # the id of an item already created for claim.overage_id, if any

        def create_remote(self, claim: Claim) -> str:
            ...  # create it, sending claim.idempotency_key; return its id

The base class claims, prices in minor units (carrying remainders), retries and
records; see :mod:`flask_ai_metering.billing.sync` for the guarantees.
"""

from __future__ import annotations

import typing as t

from ..config import ConfigVars
from ..config import import_string
from ..errors import ConfigurationError

if t.TYPE_CHECKING:
    from ..config import Settings
    from ..transactions import Transactions


class BillingDriver(t.Protocol):
    """The interface a billing driver implements.

    A driver is built once per app with ``driver_class(store, settings)``.
    ``sync_overages`` returns a report whose ``str()`` the CLI prints (the
    built-in drivers return :class:`~flask_ai_metering.billing.sync.SyncReport`).
    """

    name: str

    def sync_overages(self, *, limit: int | None = None, progress: t.Any = None) -> t.Any:
        """Send pending overages to the payment provider, each exactly once."""

    def sync_after_commit(self, overage_ids: t.Sequence[int]) -> None:
        """Called after a commit that priced overage when the sync strategy is ``immediate``."""


class NullBillingDriver:
    """Keeps overage in the ledger and sends it nowhere."""

    name = "null"

    def __init__(self, store: Transactions, settings: Settings) -> None:
        self.store = store
        self.settings = settings

    def sync_overages(self, *, limit: int | None = None, progress: t.Any = None) -> t.Any:
        return None

    def sync_after_commit(self, overage_ids: t.Sequence[int]) -> None:
        return None


def load_driver(spec: t.Any, store: Transactions, settings: Settings) -> BillingDriver:
    """Build the driver named by ``AI_METERING_BILLING_DRIVER``."""
    if spec in (None, "", "null"):
        return NullBillingDriver(store, settings)
    if spec == "stripe":
        from .stripe import StripeBillingDriver

        return StripeBillingDriver(store, settings)
    cls = import_string(spec, ConfigVars.BILLING_DRIVER)
    if not callable(cls):
        raise ConfigurationError(f"{ConfigVars.BILLING_DRIVER} must name a class, got {spec!r}")
    driver = cls(store, settings)
    for method in ("sync_overages", "sync_after_commit"):
        if not callable(getattr(driver, method, None)):
            raise ConfigurationError(
                f"{ConfigVars.BILLING_DRIVER} {spec!r} must define {method}();"
                " see flask_ai_metering.billing.BillingDriver"
            )
    return t.cast(BillingDriver, driver)
