"""Alert delivery: the outbox written inside the commit, the webhook signature, the deliverers.

- :mod:`.outbox`: :func:`~.outbox.write_alert`, called in the transaction that crossed a threshold;
- :mod:`.signing`: the ``AI-Metering-Signature`` header, and :func:`~.signing.verify` for receivers;
- :mod:`.delivery`: :func:`~.delivery.deliver_due`, one pass over the alerts that are due;
- :mod:`.worker`: the per-process background thread (``AI_METERING_ALERT_DELIVERY="thread"``).
"""

from __future__ import annotations
