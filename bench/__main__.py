"""``make bench``: every benchmark in one run, printed as a table and saved under bench/results/.

Figures are only comparable within one run (the machines are noisy): each bench
measures its own baseline beside it — the database floor, the bare call, the
naive check-then-increment — and reports ratios against it.

Environment: ``AI_METERING_TEST_POSTGRES_URL`` (PostgreSQL benches run when it is
reachable), ``BENCH_QUICK=1`` (shorter runs), ``BENCH_DASHBOARD_ROWS`` (default
1,000,000; e.g. ``1000000,10000000``), ``BENCH_HTTP=0`` (leave out the HTTP bench),
``BENCH_HTTP_SECONDS`` / ``BENCH_HTTP_ROUNDS`` (wrk run length, default 5 s, best of
2), ``BENCH_HTTP_SOAK=1`` (add the 100,000-request RSS soak; see bench/http.py).

``BENCH_DASHBOARD_WIDE_ROWS`` / ``_MODELS`` (the wide ledger, default 600,000 rows over
20,000 model names).

``python -m bench calls`` runs the in-process ones alone: ``meter.call``'s overhead against
the two-transaction floor, and reserve+commit throughput against the plain cycle;
``python -m bench http`` runs the HTTP bench alone (gunicorn + wrk);
``python -m bench http-soak`` runs the worker RSS soak alone;
``python -m bench budgets`` runs only the cost of each matching budget per call;
``python -m bench dashboard-wide`` runs only the wide-ledger dashboard case (peak RSS
and page time per view), which the full run is too long to repeat for.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import platform
import signal
import sys
import typing as t
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _table(rows: list[dict[str, t.Any]]) -> str:
    lines = []
    for bench in dict.fromkeys(r["bench"] for r in rows):
        group = [r for r in rows if r["bench"] == bench]
        columns = [c for c in dict.fromkeys(k for r in group for k in r) if c != "bench"]
        widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in group)) for c in columns}
        lines.append(f"\n## {bench}")
        lines.append(" | ".join(c.ljust(widths[c]) for c in columns))
        lines.append("-|-".join("-" * widths[c] for c in columns))
        lines.extend(" | ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns) for r in group)
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    logging.getLogger("flask_ai_metering").setLevel(logging.ERROR)
    # SIGTERM (and SIGINT, which a background job ignores) unwind: servers stop, databases are dropped.
    signal.signal(signal.SIGTERM, _interrupted)
    signal.signal(signal.SIGINT, _interrupted)
    quick = os.environ.get("BENCH_QUICK") == "1"
    only = argv[0] if argv else None
    if only not in (None, "calls", "http", "http-soak", "dashboard-wide", "budgets"):
        print("usage: python -m bench [calls | http | http-soak | dashboard-wide | budgets]", file=sys.stderr)
        return 2
    # The HTTP bench's own check: it does not import bench.common.
    from bench.common import postgres_available

    backends = ["sqlite"] + (["postgresql"] if postgres_available() else [])
    if "postgresql" not in backends:
        print("PostgreSQL not reachable (AI_METERING_TEST_POSTGRES_URL): SQLite only", file=sys.stderr)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    RESULTS.mkdir(exist_ok=True)
    meta = {"when": stamp, "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()}
    rows: list[dict[str, t.Any]] = []
    if only in (None, "budgets"):
        from bench import budgets

        print("budgets on the hot path…", file=sys.stderr)
        rows += budgets.run(backends, calls=500 if quick else 1500)
    if only in (None, "calls"):
        from bench import overhead
        from bench import quota

        print("call overhead…", file=sys.stderr)
        rows += overhead.run(backends, calls=500 if quick else 2000)
        print("quota throughput…", file=sys.stderr)
        rows += quota.run(backends, concurrencies=(1, 8) if quick else (1, 8, 32))
    for name, call in _optional_benches(backends, quick, only):
        print(f"{name}…", file=sys.stderr)
        rows += call()
        # Saved after each bench, so a failure later keeps what was measured.
        (RESULTS / f"{stamp}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
    (RESULTS / f"{stamp}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
    if not rows:
        print("nothing measured", file=sys.stderr)
        return 1
    text = _table(rows)
    # A partial run (``python -m bench http``) keeps the full run's latest.md.
    latest = "latest.md" if only is None else f"latest-{only}.md"
    (RESULTS / latest).write_text(f"# Bench results {stamp}\n{text}\n")
    print(text)
    print(f"\nsaved bench/results/{stamp}.json and bench/results/{latest}", file=sys.stderr)
    return 0


def _interrupted(signum: int, frame: t.Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _optional_benches(
    backends: list[str], quick: bool, only: str | None = None
) -> list[tuple[str, t.Callable[[], list[dict[str, t.Any]]]]]:
    """Benches of the dashboard, queued recording and HTTP, when their modules are present."""
    from bench import http

    if only == "http":
        return [("HTTP under gunicorn + wrk", lambda: http.run(backends))]
    if only == "http-soak":
        return [("HTTP soak, worker RSS", lambda: http.soak(backends))]
    if only in ("budgets", "calls"):
        return []
    from bench import dashboard

    def wide(rows: int, models: int) -> list[dict[str, t.Any]]:
        return [{"bench": "dashboard, wide ledger", **r} for r in dashboard.run_wide(backends, rows, models)]

    if only == "dashboard-wide":
        return [("dashboard, wide ledger", lambda: wide(dashboard.WIDE_ROWS, dashboard.WIDE_MODELS))]
    benches = []
    sizes = [int(n) for n in os.environ.get("BENCH_DASHBOARD_ROWS", "1000000").split(",")]
    if quick:
        sizes = [min(sizes[0], 100_000)]
    benches.append(
        (
            "dashboard",
            lambda: [{"bench": "dashboard page time", **r} for n in sizes for r in dashboard.run(n, backends)],
        )
    )
    size = (100_000, 5_000) if quick else (dashboard.WIDE_ROWS, dashboard.WIDE_MODELS)
    benches.append(("dashboard, wide ledger", lambda: wide(*size)))
    try:
        from bench import queue
    except ImportError:
        pass
    else:
        benches.append(("queued recording", lambda: queue.run(backends, calls=300 if quick else 1000)))
    if os.environ.get("BENCH_HTTP") != "0":
        benches.append(("HTTP under gunicorn + wrk", lambda: http.run(backends)))
    return benches


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
