"""What each matching budget adds to a metered call, against the same call with none.

One billable per configuration (0, 1, 2 and 3 budgets matching every call, on the
same plan), measured in interleaved rounds so the machine's noise falls on all of
them alike. The issue's target: at most +25 % per matching budget on PostgreSQL.
"""

from __future__ import annotations

import statistics
import typing as t

from bench.common import add_plan
from bench.common import database
from bench.common import make_app
from bench.overhead import _chat_completion
from bench.overhead import _time

#: Budgets added to the k-th billable, all matching the calls made (the billable, its user, its feature).
BUDGETS = (
    {"period": "month", "token_limit": 10**15},
    {"user": "member", "period": "day", "token_limit": 10**15},
    {"feature": "chat", "period": "minute", "request_limit": 10**9},
)


def run(backends: list[str], calls: int = 1500, rounds: int = 5) -> list[dict[str, t.Any]]:
    rows = []
    response = _chat_completion()
    for backend in backends:
        with database(backend) as url:
            app, db, meter = make_app(url)
            with app.app_context():
                add_plan(db, "bench", token_limit=10**15, cost_limit="1000000")
                billables = [("Team", f"budgets-{k}") for k in range(len(BUDGETS) + 1)]
                for k, billable in enumerate(billables):
                    meter.subscribe(billable, "bench")
                    for options in BUDGETS[:k]:
                        meter.add_budget(billable, **options)

                def metered(billable: tuple[str, str], meter: t.Any = meter) -> t.Callable[[], t.Any]:
                    return lambda: meter.call(
                        lambda: response,
                        billable=billable,
                        user="member",
                        provider="openai",
                        model="gpt-4o-mini",
                        max_tokens=2000,
                        feature="chat",
                    )

                samples: dict[int, list[float]] = {k: [] for k in range(len(billables))}
                for billable in billables:
                    _time(metered(billable), 50)  # warm: counters created, statements prepared
                for _ in range(rounds):
                    for k, billable in enumerate(billables):
                        samples[k] += _time(metered(billable), calls // rounds)
            base = statistics.median(samples[0])
            for k, times in samples.items():
                p50 = statistics.median(times)
                rows.append(
                    {
                        "bench": "budgets on the hot path",
                        "backend": backend,
                        "matching budgets": k,
                        "p50 ms": round(p50, 3),
                        "× no budget": round(p50 / base, 3),
                        "added per budget": "" if k == 0 else f"{(p50 / base - 1) / k:+.1%}",
                    }
                )
    return rows
