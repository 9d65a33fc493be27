"""A sender of alerts that dies with ``os._exit`` at the worst moments, leaving no clean-up.

Run as ``python -m tests.crash_alerts DB_URL WEBHOOK_URL SECRET MODE EVENT_ID``:

- ``after-write``: commits the alert to the outbox in a metering transaction, as a
  threshold crossing does, then dies before anything delivers it;
- ``after-claim``: a deliverer that claimed the alert and dies before POSTing it.
"""

from __future__ import annotations

import os
import sys

from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_ai_metering import AiMetering
from flask_ai_metering.alerts import delivery
from flask_ai_metering.alerts.outbox import write_alert
from flask_ai_metering.models import utcnow


def main(db_url: str, webhook_url: str, secret: str, mode: str, event_id: str) -> None:
    app = Flask("crashing_alerts")
    app.config.update(
        SQLALCHEMY_DATABASE_URI=db_url,
        AI_METERING_ALERT_WEBHOOK_URL=webhook_url,
        AI_METERING_ALERT_WEBHOOK_SECRET=secret,
        AI_METERING_ALERT_DELIVERY="thread",
    )
    db = SQLAlchemy(app)
    meter = AiMetering(app, db=db)
    with app.app_context():
        rt = meter.runtime()
        if mode == "after-write":
            written = rt.store.run(
                lambda conn: write_alert(
                    conn,
                    rt.settings,
                    event_id=event_id,
                    kind="threshold_crossed",
                    billable=("Team", "7"),
                    data={"threshold": 80},
                    now=utcnow(),
                )
            )
            print(f"wrote the alert ({written}); dying before waking the deliverer", flush=True)
            os._exit(3)

        def dead(*args: object, **kwargs: object) -> None:
            print("claimed the alert; dying before the POST", flush=True)
            os._exit(3)

        delivery.post = dead
        delivery.deliver_due(rt)
    raise AssertionError("the deliverer should have died")


if __name__ == "__main__":
    main(*sys.argv[1:6])
