"""The two registry databases as pytest fixtures: SQLite (the default) and PostgreSQL.

``pg_url`` makes a fresh PostgreSQL database per module (``CREATE DATABASE`` through the
``postgres`` maintenance database on 127.0.0.1, trust auth) and drops it afterwards; it skips
when no server is reachable. ``db_url`` is parametrized over both; on PostgreSQL each test
starts from an empty schema (the tables and Alembic's version table are dropped after it).
Import both names into a test module (``from tests.databases import db_url, pg_url``).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from edgefleet.coordinator.registry import Base
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

__all__ = ["PG_SERVER", "db_url", "pg_url"]

PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432"


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    admin = create_engine(f"{PG_SERVER}/postgres", isolation_level="AUTOCOMMIT",
                          connect_args={"connect_timeout": 3})
    name = f"edgefleet_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as exc:
        admin.dispose()
        pytest.skip(f"no PostgreSQL reachable at {PG_SERVER} ({str(exc).splitlines()[0]})")
    try:
        yield f"{PG_SERVER}/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.db'}"
        return
    url = request.getfixturevalue("pg_url")
    yield url
    engine = create_engine(url)
    Base.metadata.drop_all(engine)  # the next test starts from an empty schema
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS alembic_version"))
    engine.dispose()
