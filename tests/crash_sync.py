"""A ``sync-stripe-overages`` run that is killed (SIGKILL) right after Stripe accepted its first item.

Run as ``python -m tests.crash_sync DB_URL STRIPE_URL``: it syncs the overages of
that database to that (local) Stripe server and kills itself, with no clean-up of
any kind, between the create and the bookkeeping that would mark it synced.
"""

from __future__ import annotations

import os
import signal
import sys
import typing as t

from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_ai_metering import AiMetering
from flask_ai_metering.billing import sync as sync_module
from tests.stripe_server import API_KEY


def main(db_url: str, stripe_url: str) -> None:
    app = Flask("crashing_sync")
    app.config.update(
        SQLALCHEMY_DATABASE_URI=db_url,
        AI_METERING_OVERAGE_BEHAVIOR="charge",
        AI_METERING_BILLING_DRIVER="stripe",
        AI_METERING_STRIPE_API_KEY=API_KEY,
        AI_METERING_STRIPE_API_BASE=stripe_url,
    )
    db = SQLAlchemy(app)
    meter = AiMetering(app, db=db)

    def killed(*args: t.Any, **kwargs: t.Any) -> bool:
        print("stripe accepted the item; dying", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable")

    sync_module.mark_synced = killed  # type: ignore[assignment]
    with app.app_context():
        meter.runtime().billing.sync_overages()
    raise AssertionError("the sync should have died")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
