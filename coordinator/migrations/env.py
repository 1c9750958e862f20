"""Alembic environment: migrate the connection the registry hands over, or one by URL.

Programmatic runs (``edgefleet.coordinator.migrations.upgrade``) pass an open connection,
already inside a locked transaction, in ``config.attributes["connection"]``. The ``alembic``
command line (``[tool.alembic]`` in pyproject.toml) names a database with ``-x url=...``.
"""

from __future__ import annotations

from alembic import context
from edgefleet.coordinator.registry import Base
from sqlalchemy import Connection, MetaData, create_engine, pool

config = context.config


def run(connection: Connection) -> None:
    metadata: MetaData = config.attributes.get("target_metadata", Base.metadata)
    # Batch mode always, not only on SQLite: SQLite can only alter a table by copying it, and
    # revisions stay the same whichever database they were generated against (on PostgreSQL a
    # batch is plain ALTER TABLE statements).
    context.configure(
        connection=connection, target_metadata=metadata, render_as_batch=True, compare_type=True
    )
    with context.begin_transaction():
        context.run_migrations()


def main() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        run(connection)
        return
    url = context.get_x_argument(as_dictionary=True).get("url")
    if not url:
        raise SystemExit("name the database: alembic -x url=sqlite:///path/registry.db ...")
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as conn:
        run(conn)
    engine.dispose()


main()
