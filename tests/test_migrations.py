"""The shipped Alembic scripts match the models, run from the CLI, and stay out of the app's history."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_ai_metering import AiMetering
from flask_ai_metering.models import Base
from flask_ai_metering.ops import schema as migrations


def test_migrations_and_models_agree(backend, db_url):
    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"include_object": migrations.include_object, "compare_type": True}
        )
        assert compare_metadata(context, Base.metadata) == []
    assert migrations.current(engine) == migrations.head()
    engine.dispose()


def test_cli_downgrade_current_upgrade(app):
    runner = app.test_cli_runner()
    result = runner.invoke(args=["ai-metering", "db", "current"])
    assert result.exit_code == 0 and json.loads(result.output)["current"] == migrations.head()
    assert runner.invoke(args=["ai-metering", "db", "downgrade", "base", "--yes"]).exit_code == 0
    engine = app.extensions["sqlalchemy"].engine
    assert not [n for n in sa.inspect(engine).get_table_names() if n.startswith("ai_metering_") and "alembic" not in n]
    assert json.loads(runner.invoke(args=["ai-metering", "db", "current"]).output)["current"] is None
    assert runner.invoke(args=["ai-metering", "db", "upgrade"]).exit_code == 0
    assert "ai_metering_usage" in sa.inspect(engine).get_table_names()
    assert "alembic_version" not in sa.inspect(engine).get_table_names()  # ours is ai_metering_alembic_version


@pytest.fixture
def keep_loggers():
    """Flask-Migrate's env.py calls logging.config.fileConfig, which disables every existing logger."""
    import logging

    before = {
        name: logger.disabled
        for name, logger in logging.root.manager.loggerDict.items()
        if isinstance(logger, logging.Logger)
    }
    yield
    for name, disabled in before.items():
        logging.getLogger(name).disabled = disabled


def test_app_flask_migrate_autogenerate_ignores_our_tables(tmp_path, db_url, keep_loggers):
    from flask_migrate import Migrate

    app = Flask("host")
    app.config["SQLALCHEMY_DATABASE_URI"] = db_url
    db = SQLAlchemy()

    class Note(db.Model):  # the app's own model
        id = sa.Column(sa.Integer, primary_key=True)

    db.init_app(app)
    AiMetering(app, db=db)  # before Flask-Migrate: the order must not matter
    Migrate(app, db, directory=str(tmp_path / "app_migrations"))
    runner = app.test_cli_runner()
    assert runner.invoke(args=["db", "init"]).exit_code == 0
    result = runner.invoke(args=["db", "migrate", "-m", "notes"])
    assert result.exit_code == 0, result.output
    [script] = (tmp_path / "app_migrations" / "versions").glob("*.py")
    text = script.read_text()
    assert "create_table('note'" in text
    assert "ai_metering" not in text
