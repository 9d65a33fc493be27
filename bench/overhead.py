"""What ``meter.call`` adds to one call, against the bare call and the database floor.

The floor is two minimal transactions (``SELECT 1``) on the same pool in the same
run: a metered call needs at least a reserve and a commit, so 1.0× the floor is
the least any database-backed meter can cost.
"""

from __future__ import annotations

import time
import typing as t

import sqlalchemy as sa

from bench.common import add_plan
from bench.common import database
from bench.common import make_app
from bench.common import percentiles

TEAM = ("Team", "bench")


def _chat_completion() -> t.Any:
    """A real ``openai`` ChatCompletion object, as the SDK would return it."""
    from openai.types.chat import ChatCompletion

    return ChatCompletion.model_validate(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 0,
            "model": "gpt-4o-mini-2024-07-18",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "hi"}}],
            "usage": {
                "prompt_tokens": 1200,
                "completion_tokens": 300,
                "total_tokens": 1500,
                "prompt_tokens_details": {"cached_tokens": 1024},
            },
        }
    )


def _time(fn: t.Callable[[], t.Any], n: int) -> list[float]:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def run(backends: list[str], calls: int = 1500) -> list[dict[str, t.Any]]:
    rows = []
    response = _chat_completion()
    for backend in backends:
        with database(backend) as url:
            app, db, meter = make_app(url)
            with app.app_context():
                add_plan(db, "bench", token_limit=10**15, cost_limit="1000000")
                meter.subscribe(TEAM, "bench")
                engine = db.engine

                def floor(engine: sa.Engine = engine) -> None:
                    for _ in range(2):
                        with engine.connect() as conn:
                            conn.execute(sa.text("SELECT 1"))
                            conn.commit()

                def metered(meter: t.Any = meter) -> t.Any:
                    return meter.call(
                        lambda: response,
                        billable=TEAM,
                        provider="openai",
                        model="gpt-4o-mini",
                        max_tokens=2000,
                        feature="chat",
                    )

                def bare() -> t.Any:
                    return (lambda: response)()

                for fn in (floor, metered, bare):  # warm up pools, caches and price lookups
                    _time(fn, 50)
                floor_ms = _time(floor, calls)
                metered_ms = _time(metered, calls)
                bare_ms = _time(bare, calls)
            engine.dispose()
        f50, f99 = percentiles(floor_ms)
        m50, m99 = percentiles(metered_ms)
        b50, _ = percentiles(bare_ms)
        rows.append(
            {
                "bench": "call overhead",
                "backend": backend,
                "calls": calls,
                "overhead_p50_ms": round(m50 - b50, 3),
                "overhead_p99_ms": round(m99 - b50, 3),
                "floor_p50_ms": round(f50, 3),
                "floor_p99_ms": round(f99, 3),
                "p50_vs_floor": round((m50 - b50) / f50, 2),
            }
        )
    return rows
