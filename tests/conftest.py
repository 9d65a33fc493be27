"""Shared fixtures: apps on a real SQLite file, PostgreSQL or MariaDB, and the fake LLM server.

PostgreSQL and MariaDB come from ``AI_METERING_TEST_POSTGRES_URL`` and
``AI_METERING_TEST_MYSQL_URL``; each test session creates its own database there
and drops it at the end. Without a URL those tests are skipped with the reason
shown, unless ``AI_METERING_REQUIRE_SERVICES=1`` (CI), where they fail.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import typing as t
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_ai_metering import AiMetering
from flask_ai_metering.models import Base
from flask_ai_metering.models import Plan
from flask_ai_metering.ops import schema as migrations
from tests.fake_llm import FakeLLMServer

BACKENDS = ("sqlite", "postgresql", "mysql")
_ENV = {"postgresql": "AI_METERING_TEST_POSTGRES_URL", "mysql": "AI_METERING_TEST_MYSQL_URL"}
REQUIRE_SERVICES = os.environ.get("AI_METERING_REQUIRE_SERVICES") == "1"


def server_url(backend: str) -> str:
    """The admin URL of a database server from the environment, or skip/fail the test."""
    raw = os.environ.get(_ENV[backend])
    if not raw:
        message = f"{_ENV[backend]} is not set: no {backend} server to test against"
        if REQUIRE_SERVICES:
            pytest.fail(message)
        pytest.skip(message)
    url = sa.make_url(raw)
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    if url.drivername in ("mysql", "mariadb"):
        url = url.set(drivername="mysql+pymysql")
    return url.render_as_string(hide_password=False)


class ServerDatabases:
    """One throwaway database per server per test session, migrated once."""

    def __init__(self) -> None:
        self.urls: dict[str, str] = {}

    def url(self, backend: str) -> str:
        if backend not in self.urls:
            admin = sa.make_url(server_url(backend))
            name = f"aim_test_{uuid.uuid4().hex[:10]}"
            engine = sa.create_engine(admin, isolation_level="AUTOCOMMIT")
            try:
                with engine.connect() as conn:
                    conn.exec_driver_sql(f"CREATE DATABASE {name}")
            except sa.exc.OperationalError as exc:
                if REQUIRE_SERVICES:
                    raise
                pytest.skip(f"{backend} server not reachable: {exc.orig}")
            finally:
                engine.dispose()
            url = admin.set(database=name)
            if backend == "mysql":
                url = url.update_query_dict({"charset": "utf8mb4"})
            self.urls[backend] = url.render_as_string(hide_password=False)
            test_engine = sa.create_engine(self.urls[backend])
            migrations.upgrade(test_engine)
            test_engine.dispose()
        return self.urls[backend]

    def drop_all(self) -> None:
        for backend, url in self.urls.items():
            admin = sa.create_engine(server_url(backend), isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                if backend == "postgresql":
                    conn.exec_driver_sql(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        f" WHERE datname = '{sa.make_url(url).database}' AND pid <> pg_backend_pid()"
                    )
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {sa.make_url(url).database}")
            admin.dispose()


@pytest.fixture(scope="session")
def server_databases() -> t.Iterator[ServerDatabases]:
    databases = ServerDatabases()
    yield databases
    databases.drop_all()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file in WAL mode, copied for each test (migrating is the slow part)."""
    path = tmp_path_factory.mktemp("template") / "template.sqlite"
    sqlite3.connect(path).execute("PRAGMA journal_mode=WAL").close()
    engine = sa.create_engine(f"sqlite:///{path}")
    migrations.upgrade(engine)
    engine.dispose()
    return path


def empty_tables(url: str) -> None:
    """Delete every metering row (children first), keeping the migrated schema."""
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        for table in reversed(Base.metadata.sorted_tables):
            conn.execute(table.delete())
    engine.dispose()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Parametrize a test over SQLite, PostgreSQL and MariaDB."""
    return t.cast(str, request.param)


@pytest.fixture
def db_url(
    request: pytest.FixtureRequest, tmp_path: Path, sqlite_template: Path, server_databases: ServerDatabases
) -> str:
    """A migrated, empty database: SQLite unless the test asks for ``backend``."""
    which = request.getfixturevalue("backend") if "backend" in request.fixturenames else "sqlite"
    if which == "sqlite":
        path = tmp_path / "metering.sqlite"
        shutil.copy(sqlite_template, path)
        return f"sqlite:///{path}"
    url = server_databases.url(which)
    empty_tables(url)
    return url


class AppFactory(t.Protocol):
    def __call__(self, **config: t.Any) -> tuple[Flask, SQLAlchemy, AiMetering]: ...


@pytest.fixture
def make_app(db_url: str) -> t.Iterator[AppFactory]:
    """Build ``(app, db, meter)`` on the test's database with extra config."""
    made: list[tuple[Flask, SQLAlchemy]] = []

    def factory(**config: t.Any) -> tuple[Flask, SQLAlchemy, AiMetering]:
        app = Flask(f"test_app_{len(made)}")
        config.setdefault("SECRET_KEY", "test-secret-key-not-a-placeholder-0123456789")
        app.config.update(
            TESTING=True,
            SQLALCHEMY_DATABASE_URI=db_url,
            SQLALCHEMY_ENGINE_OPTIONS={"connect_args": {"timeout": 30}} if db_url.startswith("sqlite") else {},
            **config,
        )
        db = SQLAlchemy()
        db.init_app(app)
        meter = AiMetering(app, db=db)
        made.append((app, db))
        return app, db, meter

    yield factory
    for app, db in made:
        with app.app_context():
            for engine in db.engines.values():
                engine.dispose()


@pytest.fixture
def app(make_app: AppFactory) -> t.Iterator[Flask]:
    app, _, _ = make_app()
    with app.app_context():
        yield app


@pytest.fixture
def meter(app: Flask) -> AiMetering:
    return t.cast(AiMetering, app.extensions["ai_metering"])


@pytest.fixture
def db(app: Flask) -> SQLAlchemy:
    return t.cast(SQLAlchemy, app.extensions["sqlalchemy"])


@pytest.fixture(scope="session")
def llm() -> t.Iterator[FakeLLMServer]:
    with FakeLLMServer() as server:
        yield server


@pytest.fixture
def fake_llm(llm: FakeLLMServer) -> FakeLLMServer:
    llm.reset()
    return llm


@pytest.fixture
def openai_client(fake_llm: FakeLLMServer) -> t.Iterator[t.Any]:
    openai = pytest.importorskip("openai")
    with openai.OpenAI(base_url=f"{fake_llm.url}/v1", api_key="test", max_retries=0) as client:
        yield client


@pytest.fixture
def anthropic_client(fake_llm: FakeLLMServer) -> t.Iterator[t.Any]:
    anthropic = pytest.importorskip("anthropic")
    with anthropic.Anthropic(base_url=fake_llm.url, api_key="test", max_retries=0) as client:
        yield client


def add_plan(db: SQLAlchemy, **fields: t.Any) -> Plan:
    """Create and commit a plan through the app's own session, as a user would."""
    fields.setdefault("name", fields.get("slug", "Plan").title())
    plan = Plan(**fields)
    db.session.add(plan)
    db.session.commit()
    return plan


def concurrently(fn: t.Callable[[], t.Any], times: int = 2, timeout: float = 60) -> list[t.Any]:
    """Run ``fn`` in ``times`` threads released together by a barrier; return what they returned."""
    import threading

    start = threading.Barrier(times)
    results: list[t.Any] = []

    def run() -> None:
        start.wait()
        results.append(fn())

    threads = [threading.Thread(target=run) for _ in range(times)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    return results


@pytest.fixture(autouse=True)
def _stop_alert_threads() -> t.Iterator[None]:
    """Stop any alert delivery thread a test started, so none outlives its test's database."""
    yield
    from flask_ai_metering.alerts import worker

    assert worker.stop(), "an alert delivery thread did not stop"
