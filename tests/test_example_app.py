"""The example app: seeding is idempotent, metered routes work, the dashboard opens for the admin."""

from __future__ import annotations

import typing as t
from pathlib import Path

import pytest
import sqlalchemy as sa
from flask import Flask

from example_app import create_app
from flask_ai_metering.models import Usage


@pytest.fixture
def demo(tmp_path: Path, sqlite_template: Path) -> t.Iterator[Flask]:
    path = tmp_path / "demo.sqlite"
    path.write_bytes(sqlite_template.read_bytes())
    app = create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": f"sqlite:///{path}"})
    yield app
    with app.app_context():
        app.extensions["sqlalchemy"].engine.dispose()


def usage_count(app: Flask) -> int:
    with app.app_context():
        engine = app.extensions["sqlalchemy"].engine
        with engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(Usage.__table__)).scalar_one())


def test_seed_demo_is_idempotent(demo: Flask) -> None:
    runner = demo.test_cli_runner()
    first = runner.invoke(args=["seed-demo"])
    assert first.exit_code == 0, first.output
    rows = usage_count(demo)
    assert rows > 1000
    again = runner.invoke(args=["seed-demo"])
    assert again.exit_code == 0 and "Seeded 0 new" in again.output
    assert usage_count(demo) == rows


def test_metered_routes_and_dashboard(demo: Flask) -> None:
    demo.test_cli_runner().invoke(args=["seed-demo"])
    client = demo.test_client()
    assert "Demo mode" in client.get("/").get_data(as_text=True)
    response = client.post("/ai/chat")
    assert response.status_code == 200 and response.get_json()["cost"] != "0"
    assert "X-Remaining-Tokens" in response.headers
    assert client.post("/ai/summarize").status_code == 200
    assert client.get("/ai-metering/").status_code == 200
    client.get("/login/2")  # alice is not an admin
    assert client.get("/ai-metering/").status_code == 403
