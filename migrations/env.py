"""Alembic environment of flask_ai_metering: our tables only, our own version table."""

from __future__ import annotations

from alembic import context

from flask_ai_metering.models import Base
from flask_ai_metering.ops.schema import VERSION_TABLE
from flask_ai_metering.ops.schema import include_object

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run these migrations through 'flask ai-metering db upgrade'")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    version_table=VERSION_TABLE,
    include_object=include_object,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
