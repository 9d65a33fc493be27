"""Dashboard response times over a large ledger, with and without rollups.

``run(rows, backends)`` bulk-loads ``rows`` usage rows (executemany on SQLite, COPY
on PostgreSQL; never the ORM), builds the daily rollups, and times the dashboard's
pages through the Flask test client, ledger first, then rollups. With rollups one
call is recorded after ``aggregate``, as in production, so today comes from the
ledger (the exact tail) and the rest from the rollups. Data: 90 days, 500 billables
with a skew (a few whales), 7 tenants, 3 providers, 8 models, 5 features. Each
timing is the median of 5 requests after one warm-up, except the ledger-only pages
above :data:`LEDGER_MAX_ROWS` rows (only the overview, one request).
"""

from __future__ import annotations

import datetime as dt
import os
import random
import statistics
import tempfile
import time
import typing as t

import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_ai_metering import AiMetering
from flask_ai_metering.models import Usage
from flask_ai_metering.models import table
from flask_ai_metering.ops import schema as migrations
from flask_ai_metering.reporting.rollups import aggregate

MODELS = [
    ("openai", "gpt-4o-mini", 0.15, 0.6),
    ("openai", "gpt-4o", 2.5, 10.0),
    ("openai", "o3-mini", 1.1, 4.4),
    ("anthropic", "claude-sonnet-4-5", 3.0, 15.0),
    ("anthropic", "claude-haiku-4-5", 1.0, 5.0),
    ("google", "gemini-2.5-flash", 0.3, 2.5),
    ("google", "gemini-2.5-pro", 1.25, 10.0),
    ("openai", "gpt-4.1-nano", 0.1, 0.4),
]
FEATURES = ["chat", "summary", "search", "import", "agent"]
COLUMNS = (
    "billable_type",
    "billable_id",
    "tenant_id",
    "provider",
    "model",
    "feature",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "total_tokens",
    "input_cost",
    "output_cost",
    "total_cost",
    "currency",
    "unpriced",
    "estimated",
    "billing_mode",
    "occurred_at",
    "created_at",
)
REPEATS = 5
CHUNK = 50_000
#: Pages timed, in order; the first is the baseline kept at every size.
PAGES = (
    ("overview (30 days)", "/ai-metering/"),
    ("overview, one model", "/ai-metering/?model=gpt-4o"),
    ("explorer page 1", "/ai-metering/usage"),
    ("explorer, one billable", "/ai-metering/usage?billable=Team:1"),
    ("billable page", "/ai-metering/billables/Team/1"),
)
#: The largest ledger whose every page is timed without rollups: above it each ledger-only
#: page takes seconds (20 s for the overview of 1M rows on SQLite), so only the overview is
#: timed, once, as the same-run baseline. ``BENCH_DASHBOARD_LEDGER_ROWS`` raises it.
LEDGER_MAX_ROWS = int(os.environ.get("BENCH_DASHBOARD_LEDGER_ROWS", "100000"))


def _row(
    at: dt.datetime,
    rng: random.Random,
    i: int,
    provider: str,
    model: str,
    inp: int,
    out: int,
    costs: tuple[int, int],
    unpriced: bool,
) -> tuple[t.Any, ...]:
    """One ledger row in the column order :func:`_load` copies."""
    cin, cout = costs
    return (
        "Team",
        str(1 + int(500 * rng.random() ** 3)),
        f"t{i % 7}",
        provider,
        model,
        FEATURES[i % 5],
        inp,
        out,
        inp // 4,
        0,
        0,
        inp + out,
        cin,
        cout,
        cin + cout,
        "usd",
        unpriced,
        False,
        "plan",
        at,
        at,
    )


def _rows(n: int, now: dt.datetime) -> t.Iterator[tuple[t.Any, ...]]:
    rng = random.Random(42)
    span = 90 * 86400
    for i in range(n):
        provider, model, pin, pout = MODELS[min(int(rng.random() ** 2 * len(MODELS)), len(MODELS) - 1)]
        inp, out = rng.randint(50, 4000), rng.randint(10, 1200)
        costs = (int(inp * pin * 10**6), int(out * pout * 10**6))  # pico-units per token = $/1M × 10^6
        at = (now - dt.timedelta(seconds=span * (n - i) / n)).replace(tzinfo=None)
        yield _row(at, rng, i, provider, model, inp, out, costs, False)


def _load(engine: sa.Engine, n: int, now: dt.datetime, rows: t.Iterable[tuple[t.Any, ...]] | None = None) -> None:
    usage = table(Usage)
    rows = _rows(n, now) if rows is None else rows
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        if engine.dialect.name == "postgresql":
            with cur.copy(f"COPY {usage.name} ({', '.join(COLUMNS)}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
        else:
            marks = ", ".join("?" for _ in COLUMNS)
            sql = f"INSERT INTO {usage.name} ({', '.join(COLUMNS)}) VALUES ({marks})"
            batch: list[tuple[t.Any, ...]] = []
            for row in rows:
                batch.append(row[:-2] + (row[-2].isoformat(sep=" "), row[-1].isoformat(sep=" ")))
                if len(batch) == CHUNK:
                    cur.executemany(sql, batch)
                    batch.clear()
            if batch:
                cur.executemany(sql, batch)
        raw.commit()
    finally:
        raw.close()
    with engine.connect() as conn:
        conn.exec_driver_sql("ANALYZE" if engine.dialect.name == "sqlite" else f"ANALYZE {usage.name}")
        conn.commit()


def _database(backend: str) -> tuple[str, t.Callable[[], None]]:
    if backend == "sqlite":
        folder = tempfile.mkdtemp(prefix="aim-bench-")
        return f"sqlite:///{folder}/bench.sqlite", lambda: None
    admin_url = sa.make_url(
        os.environ.get("AI_METERING_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    )
    admin_url = admin_url.set(drivername="postgresql+psycopg")
    name = f"aim_bench_{os.getpid()}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}")
        conn.exec_driver_sql(f"CREATE DATABASE {name}")

    def drop() -> None:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.dispose()

    return admin_url.set(database=name).render_as_string(hide_password=False), drop


def _app(url: str, rollups: bool) -> Flask:
    app = Flask(f"bench_{rollups}")
    app.config.update(SQLALCHEMY_DATABASE_URI=url, AI_METERING_AGGREGATION_TABLES=rollups)
    db = SQLAlchemy()
    db.init_app(app)
    AiMetering(app, db=db).dashboard_authorizer(lambda user: True)
    return app


def _time(client: t.Any, path: str, repeats: int = REPEATS) -> float:
    """The median of ``repeats`` requests after one warm-up (none when a single sample is asked for)."""
    if repeats > 1:
        client.get(path).close()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        response = client.get(path)
        assert response.status_code == 200, response.status_code
        samples.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(samples), 1)


def _write_since_aggregate(app: Flask) -> None:
    """One call recorded after ``aggregate``, as in production: today is then read from the ledger."""
    app.extensions["ai_metering"].record(
        billable=("Team", "1"), provider="openai", model="gpt-4o-mini", usage={"input_tokens": 500, "output_tokens": 50}
    )


def run(rows: int, backends: list[str]) -> list[dict[str, t.Any]]:
    """Time the dashboard over ``rows`` usage rows on each backend; one result row per page and mode.

    Without rollups every page above :data:`LEDGER_MAX_ROWS` takes seconds: there only
    the overview is timed, once, as the same-run baseline.
    """
    results = []
    now = dt.datetime.now(dt.timezone.utc)
    for backend in backends:
        url, drop = _database(backend)
        try:
            engine = sa.create_engine(url)
            migrations.upgrade(engine)
            started = time.perf_counter()
            _load(engine, rows, now)
            load_s = time.perf_counter() - started
            engine.dispose()
            rollup_s = 0.0
            for use_rollups in (False, True):
                app = _app(url, use_rollups)
                with app.app_context():
                    if use_rollups:
                        started = time.perf_counter()
                        aggregate(app.extensions["ai_metering"].runtime(), period="day")
                        rollup_s = time.perf_counter() - started
                        _write_since_aggregate(app)
                    client = app.test_client()
                    pages = PAGES if use_rollups or rows <= LEDGER_MAX_ROWS else PAGES[:1]
                    repeats = REPEATS if use_rollups or rows <= LEDGER_MAX_ROWS else 1
                    for page, path in pages:
                        results.append(
                            {
                                "backend": backend,
                                "rows": rows,
                                "rollups": use_rollups,
                                "page": page,
                                "median_ms": _time(client, path, repeats),
                                "load_s": round(load_s, 1),
                                "aggregate_s": round(rollup_s, 1),
                            }
                        )
                    app.extensions["sqlalchemy"].engine.dispose()
        finally:
            drop()
    return results


# -- many model names: bounded memory -------------------------------------------------------

#: The wide case: rows over distinct model names, every row inside the overview's 30 days.
WIDE_ROWS = int(os.environ.get("BENCH_DASHBOARD_WIDE_ROWS", "600000"))
WIDE_MODELS = int(os.environ.get("BENCH_DASHBOARD_WIDE_MODELS", "20000"))
#: Pages of the wide case; every one aggregates the whole ledger of the last 30 days.
WIDE_PAGES = (
    ("overview (30 days)", "/ai-metering/"),
    ("overview by provider", "/ai-metering/?group=provider"),
    ("explorer page 1", "/ai-metering/usage"),
    ("billable page", "/ai-metering/billables/Team/1"),
)
WIDE_REPEATS = 3


def _wide_rows(n: int, models: int, now: dt.datetime) -> t.Iterator[tuple[t.Any, ...]]:
    """``n`` rows over ``models`` model names (a third of them unpriced), spread over 29 days."""
    rng = random.Random(7)
    span = 29 * 86400
    for i in range(n):
        m = i % models
        provider = ("openai", "anthropic", "google")[m % 3]
        unpriced = m % 3 == 2
        inp, out = rng.randint(50, 4000), rng.randint(10, 1200)
        costs = (0, 0) if unpriced else (inp * 10**6, out * 4 * 10**6)
        at = (now - dt.timedelta(seconds=span * (n - i) / n)).replace(tzinfo=None)
        yield _row(at, rng, i, provider, f"model-{m:05d}", inp, out, costs, unpriced)


def _rss_mb() -> float:
    """The peak resident set size of this process so far (``ru_maxrss``: KiB on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def serve_one(url: str, path: str, repeats: int = WIDE_REPEATS) -> dict[str, t.Any]:
    """One page in this (fresh) process: its peak RSS, the growth the page caused, and its median time.

    Run in a child process per page, so each page's peak is its own. The baseline is
    taken after a warm-up request that imports everything a page needs (plotly among
    them) over an empty filter, so the growth is what the page's data costs.
    """
    import gc

    app = _app(url, False)
    with app.app_context():
        client = app.test_client()
        client.get("/ai-metering/?model=bench-nothing").close()
        client.get("/ai-metering/usage?model=bench-nothing").close()
        gc.collect()
        base = _rss_mb()
        started = time.perf_counter()
        response = client.get(path)
        first_ms = (time.perf_counter() - started) * 1000
        assert response.status_code == 200, response.status_code
        size = len(response.data)
        response.close()
        peak = _rss_mb()
        median = _time(client, path, repeats) if repeats > 1 else round(first_ms, 1)
        app.extensions["sqlalchemy"].engine.dispose()
    return {
        "base_rss_mb": round(base, 1),
        "peak_rss_mb": round(peak, 1),
        "growth_mb": round(peak - base, 1),
        "first_ms": round(first_ms, 1),
        "median_ms": median,
        "page_kb": round(size / 1024, 1),
    }


def run_wide(backends: list[str], rows: int = WIDE_ROWS, models: int = WIDE_MODELS) -> list[dict[str, t.Any]]:
    """The wide ledger (default 600k rows over 20k model names) on each backend, ledger only.

    Each page is served by a fresh child process (``python -m bench.dashboard serve``),
    which reports its peak RSS (``getrusage`` ``ru_maxrss``, the whole process: Python,
    the driver and the C heap) and the median of :data:`WIDE_REPEATS` requests after
    the first.
    """
    import json
    import subprocess
    import sys

    results = []
    now = dt.datetime.now(dt.timezone.utc)
    for backend in backends:
        url, drop = _database(backend)
        try:
            engine = sa.create_engine(url)
            migrations.upgrade(engine)
            started = time.perf_counter()
            _load(engine, rows, now, _wide_rows(rows, models, now))
            load_s = time.perf_counter() - started
            engine.dispose()
            for page, path in WIDE_PAGES:
                child = subprocess.run(
                    [sys.executable, "-m", "bench.dashboard", "serve", url, path],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                measured = json.loads(child.stdout.strip().splitlines()[-1])
                results.append(
                    {
                        "backend": backend,
                        "rows": rows,
                        "models": models,
                        "page": page,
                        **measured,
                        "load_s": round(load_s, 1),
                    }
                )
        finally:
            drop()
    return results


if __name__ == "__main__":  # pragma: no cover - ad hoc: python -m bench.dashboard 100000 sqlite postgresql
    import json
    import sys

    if sys.argv[1:2] == ["serve"]:  # a child of run_wide: one page, one JSON line
        print(json.dumps(serve_one(sys.argv[2], sys.argv[3])))
    elif sys.argv[1:2] == ["wide"]:  # python -m bench.dashboard wide [sqlite] [postgresql]
        for result in run_wide(sys.argv[2:] or ["sqlite"]):
            print(result)
    else:
        n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
        for result in run(n, sys.argv[2:] or ["sqlite"]):
            print(result)
