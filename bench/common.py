"""Shared bench plumbing: throwaway databases, apps, and latency statistics."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import statistics
import tempfile
import typing as t
import uuid
from decimal import Decimal

import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_ai_metering import AiMetering
from flask_ai_metering.models import Plan
from flask_ai_metering.ops import schema as migrations

PG_ADMIN = os.environ.get("AI_METERING_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def _pg_url(raw: str) -> sa.URL:
    url = sa.make_url(raw)
    return url.set(drivername="postgresql+psycopg") if url.drivername == "postgresql" else url


def postgres_available() -> bool:
    try:
        engine = sa.create_engine(_pg_url(PG_ADMIN))
        with engine.connect():
            pass
        engine.dispose()
        return True
    except Exception:
        return False


@contextlib.contextmanager
def database(backend: str, prepare: t.Callable[[str], None] | None = None) -> t.Iterator[str]:
    """A fresh database URL, migrated (or set up by ``prepare``), dropped afterwards."""
    prepare = prepare or _migrate
    if backend == "sqlite":
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "bench.sqlite")
            sqlite3.connect(path).execute("PRAGMA journal_mode=WAL").close()
            url = f"sqlite:///{path}"
            prepare(url)
            yield url
        return
    admin = _pg_url(PG_ADMIN)
    name = f"aim_bench_{uuid.uuid4().hex[:8]}"
    engine = sa.create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    url = admin.set(database=name).render_as_string(hide_password=False)
    try:
        prepare(url)
        yield url
    finally:
        with engine.connect() as conn:
            conn.exec_driver_sql(
                f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
                " AND pid <> pg_backend_pid()"
            )
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}")
        engine.dispose()


def _migrate(url: str) -> None:
    engine = sa.create_engine(url)
    migrations.upgrade(engine)
    engine.dispose()


def make_app(url: str, pool_size: int = 40, **config: t.Any) -> tuple[Flask, SQLAlchemy, AiMetering]:
    app = Flask("bench")
    options: dict[str, t.Any] = (
        {"connect_args": {"timeout": 60}}
        if url.startswith("sqlite")
        else {
            "pool_size": pool_size,
            "max_overflow": 0,
        }
    )
    app.config.update(
        SQLALCHEMY_DATABASE_URI=url,
        SQLALCHEMY_ENGINE_OPTIONS=options,
        AI_METERING_DASHBOARD_ENABLED=False,
        **config,
    )
    db = SQLAlchemy()
    db.init_app(app)
    if url.startswith("sqlite"):
        with app.app_context():
            sa.event.listen(db.engine, "connect", _sqlite_pragmas)
    return app, db, AiMetering(app, db=db)


def _sqlite_pragmas(dbapi_connection: t.Any, record: t.Any) -> None:
    """WAL with synchronous=NORMAL, the setting the research measured (commits don't fsync)."""
    dbapi_connection.execute("PRAGMA synchronous=NORMAL")


def add_plan(db: SQLAlchemy, slug: str, token_limit: int | None, cost_limit: str | None = None) -> None:
    db.session.add(
        Plan(
            name=slug,
            slug=slug,
            token_limit=token_limit,
            cost_limit=None if cost_limit is None else Decimal(cost_limit),
        )
    )
    db.session.commit()


def percentiles(samples_ms: list[float]) -> tuple[float, float]:
    """p50 and p99 of latencies in milliseconds."""
    if len(samples_ms) < 2:
        value = samples_ms[0] if samples_ms else float("nan")
        return value, value
    cuts = statistics.quantiles(samples_ms, n=100, method="inclusive")
    return statistics.median(samples_ms), cuts[98]
