"""The Flask app the HTTP bench serves under gunicorn, one route per process.

``create_app()`` is the factory gunicorn loads (``bench.http_app:create_app()``);
the environment picks what the single route ``GET /bench`` does, so each variant
runs with only the middleware it needs (a Limiter's hooks run on every route):

``BENCH_HTTP_ROUTE``
    ``plain``           a JSON route, nothing else
    ``limiter-memory``  Flask-Limiter, memory storage (per worker process)
    ``limiter-redis``   Flask-Limiter, Redis storage (``BENCH_HTTP_REDIS_URL``)
    ``quota``           bare ``@quota_required``
    ``metered``         ``@quota_required`` + ``meter.call`` with manual usage, no provider
    ``instrumented``    ``@quota_required`` + an OpenAI client instrumented with
                        ``meter.instrument`` against ``BENCH_HTTP_FAKE_LLM_URL``
                        (only once ``AiMetering.instrument`` exists)
``BENCH_HTTP_DATABASE_URL``
    the migrated database of the metering routes
``BENCH_HTTP_POOL_SIZE``
    PostgreSQL pool size per worker (the bench sets threads + 2)

Only the public API of flask_ai_metering is used. Nothing here touches the
database, so gunicorn's ``--preload`` master forks no open connection.
"""

from __future__ import annotations

import os
import typing as t

from flask import Flask

BILLABLE = ("Team", "bench")
PLAN = "bench"
ROUTES = ("plain", "limiter-memory", "limiter-redis", "quota", "metered", "instrumented")
#: Never reached in a run: the limiter counts every request, but refuses none.
LIMIT = "100000000 per hour"


def create_app() -> Flask:
    route = os.environ.get("BENCH_HTTP_ROUTE", "plain")
    if route not in ROUTES:
        raise RuntimeError(f"BENCH_HTTP_ROUTE must be one of {', '.join(ROUTES)}, got {route!r}")
    if route not in ("plain", "limiter-memory", "limiter-redis"):
        return _metering_app(route)
    app = Flask("bench_http")
    app.add_url_rule("/ping", "ping", lambda: "ok")
    if route == "plain":
        app.add_url_rule("/bench", "bench", _answer)
    else:
        _limited(app, route)
    return app


def _answer() -> dict[str, t.Any]:
    return {"ok": True}


def _limited(app: Flask, route: str) -> None:
    from flask_limiter import Limiter
    from flask_limiter.util import get_remote_address

    storage = "memory://" if route == "limiter-memory" else os.environ["BENCH_HTTP_REDIS_URL"]
    limiter = Limiter(get_remote_address, app=app, storage_uri=storage)
    app.add_url_rule("/bench", "bench", limiter.limit(LIMIT)(_answer))


def metering_app(url: str, pool_size: int = 4) -> tuple[Flask, t.Any, t.Any]:
    """A Flask app with Flask-SQLAlchemy and ``AiMetering`` on ``url``; no route."""
    import sqlalchemy as sa
    from flask_sqlalchemy import SQLAlchemy

    from flask_ai_metering import AiMetering

    app = Flask("bench_http")
    sqlite = url.startswith("sqlite")
    app.config.update(
        SQLALCHEMY_DATABASE_URI=url,
        SQLALCHEMY_ENGINE_OPTIONS=(
            {"connect_args": {"timeout": 60}} if sqlite else {"pool_size": pool_size, "max_overflow": 0}
        ),
        AI_METERING_DASHBOARD_ENABLED=False,
    )
    db = SQLAlchemy()
    db.init_app(app)
    if sqlite:
        with app.app_context():
            sa.event.listen(db.engine, "connect", _sqlite_pragmas)
    meter = AiMetering(app, db=db)
    meter.billable_resolver(lambda: BILLABLE)
    return app, db, meter


def _sqlite_pragmas(dbapi_connection: t.Any, record: t.Any) -> None:
    """WAL is set on the file; synchronous=NORMAL as in the other benches (commits don't fsync)."""
    dbapi_connection.execute("PRAGMA synchronous=NORMAL")


def _metering_app(route: str) -> Flask:
    from flask_ai_metering import quota_required

    url = os.environ["BENCH_HTTP_DATABASE_URL"]
    app, db, meter = metering_app(url, pool_size=int(os.environ.get("BENCH_HTTP_POOL_SIZE", "4")))
    app.add_url_rule("/ping", "ping", lambda: "ok")

    if route == "quota":

        @quota_required
        def bench() -> dict[str, t.Any]:
            return {"ok": True}

    elif route == "metered":

        @quota_required
        def bench() -> dict[str, t.Any]:
            result = meter.call(
                lambda: {"text": "hi"},
                billable=BILLABLE,
                provider="manual",
                feature="chat",
                max_tokens=100,
                usage={"input_tokens": 60, "output_tokens": 40},
            )
            return {"ok": True, "total_tokens": result.usage.total_tokens}

    else:
        # Hook for issue 14's later part: an instrumented OpenAI client against the
        # local wire-format server (tests/fake_llm.py's FakeLLMServer, started by
        # bench/http.py). The bench only asks for this route once AiMetering has
        # an ``instrument`` attribute.
        import openai

        client = openai.OpenAI(base_url=f"{os.environ['BENCH_HTTP_FAKE_LLM_URL']}/v1", api_key="bench", max_retries=0)
        meter.instrument(client, feature="chat", billable=BILLABLE)

        @quota_required
        def bench() -> dict[str, t.Any]:
            completion = client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=100
            )
            return {"ok": True, "total_tokens": completion.usage.total_tokens if completion.usage else None}

    app.add_url_rule("/bench", "bench", bench)
    with app.app_context():
        db.engine.dispose()  # nothing is open, but make sure no pooled connection crosses the fork
    return app
