"""Running the shipped Alembic scripts, and keeping them out of the app's own migrations.

Our tables have their own version table (``ai_metering_alembic_version``), so
``flask ai-metering db upgrade`` never collides with the app's Flask-Migrate
history; and the app's ``flask db migrate`` is told to ignore our tables, so it
never proposes to drop them.
"""

from __future__ import annotations

import typing as t

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from flask import Flask
from flask import appcontext_pushed

from ..models import PREFIX
from ..resources import resource_dir

VERSION_TABLE = "ai_metering_alembic_version"


def is_ours(name: str | None) -> bool:
    return bool(name) and (t.cast(str, name).startswith(PREFIX))


def include_object(obj: t.Any, name: str | None, type_: str, reflected: bool, compare_to: t.Any) -> bool:
    """Alembic filter that keeps only flask_ai_metering's tables (and their parts)."""
    if type_ == "table":
        return is_ours(name) and name != VERSION_TABLE
    table = getattr(obj, "table", None)
    return table is None or is_ours(table.name)


def exclude_ours(obj: t.Any, name: str | None, type_: str, reflected: bool, compare_to: t.Any) -> bool:
    """Alembic filter for the app's own migrations: everything but our tables."""
    if type_ == "table":
        return not is_ours(name)
    table = getattr(obj, "table", None)
    return table is None or not is_ours(table.name)


def config(connection: sa.Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(resource_dir("migrations")))
    cfg.attributes["connection"] = connection
    return cfg


def upgrade(engine: sa.Engine, revision: str = "head") -> None:
    with engine.begin() as conn:
        command.upgrade(config(conn), revision)


def downgrade(engine: sa.Engine, revision: str = "-1") -> None:
    with engine.begin() as conn:
        command.downgrade(config(conn), revision)


def current(engine: sa.Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()


def head() -> str | None:
    return ScriptDirectory.from_config(config()).get_current_head()


def exclude_from_app_migrations(app: Flask) -> None:
    """Make Flask-Migrate's autogenerate skip our tables, whichever extension inits first.

    Flask-Migrate passes ``configure_args`` to Alembic's ``context.configure``;
    we add (or wrap) ``include_object`` there the first time an app context is
    pushed after Flask-Migrate registered itself.
    """

    def patch(sender: Flask, **_: t.Any) -> None:
        state = sender.extensions.get("migrate")
        if state is None or getattr(state, "_ai_metering_patched", False):
            return
        args = state.configure_args
        theirs = args.get("include_object")

        def combined(obj: t.Any, name: str | None, type_: str, reflected: bool, compare_to: t.Any) -> bool:
            if not exclude_ours(obj, name, type_, reflected, compare_to):
                return False
            return theirs is None or bool(theirs(obj, name, type_, reflected, compare_to))

        args["include_object"] = combined
        state._ai_metering_patched = True

    appcontext_pushed.connect(patch, app, weak=False)
