"""The Stripe billing driver: overage becomes invoice items on the billable's customer.

Amounts are integer minor units, priced and carried by :mod:`.sync`. Each item
carries ``metadata["ai_metering_overage_id"]``, so a retried sync finds what an
earlier attempt created before it creates again, and every create sends an
``Idempotency-Key`` derived from our ids. Neither alone is enough: Stripe prunes
keys after 24 hours (and localstripe ignores them), and a metadata look-up alone
cannot see an item whose create is still in flight.

The driver has its own :class:`stripe.StripeClient` (never the global
``stripe.api_key``), from ``AI_METERING_STRIPE_API_KEY`` and, to point at a local
Stripe server, ``AI_METERING_STRIPE_API_BASE``.
"""

from __future__ import annotations

import logging
import typing as t

from ..config import ConfigVars
from ..errors import ConfigurationError
from .sync import Claim
from .sync import OverageSyncer

if t.TYPE_CHECKING:
    from ..config import Settings
    from ..transactions import Transactions

log = logging.getLogger("flask_ai_metering")

#: The metadata key that ties an invoice item to its overage row.
OVERAGE_ID_KEY = "ai_metering_overage_id"


def make_client(settings: Settings) -> t.Any:
    """A ``StripeClient`` for the configured key and base, retrying network errors twice.

    :raises ConfigurationError: the key is missing or the ``stripe`` package is not installed.
    """
    if not settings.stripe_api_key:
        raise ConfigurationError(f"{ConfigVars.STRIPE_API_KEY} is required by the 'stripe' billing driver")
    try:
        import stripe
    except ImportError:
        raise ConfigurationError(
            "The 'stripe' billing driver needs the stripe package: pip install 'flask-ai-metering[stripe]'"
        ) from None
    options: dict[str, t.Any] = {"max_network_retries": 2}
    if settings.stripe_api_base:
        options["base_addresses"] = {"api": settings.stripe_api_base.rstrip("/")}
    return stripe.StripeClient(settings.stripe_api_key, **options)


class StripeBillingDriver(OverageSyncer):
    """Bills overage as Stripe invoice items, each exactly once.

    The items stay pending on the customer until Stripe's next invoice for it
    (the subscription's, or one the app creates) picks them up.
    """

    name = "stripe"

    def __init__(self, store: Transactions, settings: Settings) -> None:
        super().__init__(store, settings)
        self.client = make_client(settings)

    def find_remote(self, claim: Claim) -> str | None:
        """Search the customer's invoice items for this overage's metadata.

        Stripe lists pending and invoiced items alike; localstripe lists only
        pending ones, which is all a crash between create and mark can leave.
        """
        items = self.client.v1.invoice_items.list(params={"customer": claim.customer, "limit": 100})
        for item in items.auto_paging_iter():
            metadata = item.metadata.to_dict() if item.metadata is not None else {}
            if metadata.get(OVERAGE_ID_KEY) != str(claim.overage_id):
                continue
            if item.amount != claim.amount_minor or item.currency != claim.currency:
                log.error(
                    "invoice item %s of overage %s bills %s %s, not %s %s; leaving it as it is",
                    item.id,
                    claim.overage_id,
                    item.amount,
                    item.currency,
                    claim.amount_minor,
                    claim.currency,
                )
            return t.cast(str, item.id)
        return None

    def create_remote(self, claim: Claim) -> str:
        period = f"{claim.period_start:%Y-%m-%d}"
        item = self.client.v1.invoice_items.create(
            params={
                "customer": t.cast(str, claim.customer),
                "amount": claim.amount_minor,
                "currency": claim.currency,
                "description": (
                    f"AI usage beyond the plan: {claim.tokens} tokens (period from {period})"
                    if claim.tokens >= 0
                    else f"Refund of AI usage beyond the plan: {-claim.tokens} tokens (period from {period})"
                ),
                "metadata": {
                    OVERAGE_ID_KEY: str(claim.overage_id),
                    "ai_metering_billable": f"{claim.billable[0]}:{claim.billable[1]}",
                    "ai_metering_tokens": str(claim.tokens),
                    "ai_metering_exact_amount": str(claim.amount),
                },
            },
            options={"idempotency_key": claim.idempotency_key},
        )
        return t.cast(str, item.id)
