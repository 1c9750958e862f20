"""Schema migrations of the coordinator's registry (Alembic), run whenever a Registry opens.

``upgrade(engine)`` brings a database to the newest revision this code knows:

- empty database: every revision runs, from 0001 (the schema ``create_all`` used to make);
- a database made before migrations existed (all of the baseline tables, no
  ``alembic_version``): stamped at 0001, then upgraded;
- a database at an older revision: upgraded;
- a database at a revision this code does not know (newer EdgeFleet wrote it):
  ``RegistrySchemaError``, one line, nothing touched.

A new revision (a model change in ``registry.py`` needs one; ``tests/coordinator/
test_migrations.py`` fails until it exists), from the repository root::

    alembic -x url=sqlite:///$(mktemp -d)/r.db upgrade head
    alembic -x url=sqlite:///<same file> revision --autogenerate --rev-id 0009 -m "what"

then read the generated ``versions/v0009_*.py``; autogenerate misses renames and data moves.
"""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text

__all__ = ["BASELINE", "RegistrySchemaError", "alembic_config", "head", "upgrade"]

log = logging.getLogger(__name__)

SCRIPTS = Path(__file__).resolve().parent
BASELINE = "0001"
# The tables of the baseline, frozen: with all of them and no alembic_version, a database was
# made by create_all before migrations existed.
BASELINE_TABLES = frozenset(
    {"counters", "devices", "group_members", "groups", "model_versions", "release_targets",
     "releases"}
)
PG_LOCK_KEY = 0x6564_6765_666C_6565  # pg_advisory_xact_lock key ("edgeflee"), any bigint


class RegistrySchemaError(ValueError):
    """The database's schema is not one this code can use (newer, or half made)."""


def alembic_config(connection: Connection, *, scripts: Path = SCRIPTS) -> Config:
    """An Alembic config that runs ``env.py`` on ``connection`` (for ``alembic.command``)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(scripts))
    cfg.attributes["connection"] = connection
    return cfg


@cache
def _scripts(scripts: Path) -> ScriptDirectory:
    return ScriptDirectory(str(scripts))


def head(scripts: Path = SCRIPTS) -> str:
    """The newest revision this code knows."""
    rev = _scripts(scripts).get_current_head()
    assert rev is not None, f"no revisions under {scripts}"
    return rev


def upgrade(engine: Engine, *, revision: str = "head", scripts: Path = SCRIPTS) -> None:
    """Create, adopt or upgrade the registry schema of ``engine``'s database to ``revision``."""
    target = head(scripts) if revision == "head" else revision
    with engine.connect() as conn:
        if _current(conn) == {target}:  # the common case: nothing to do, no lock needed
            return
    with engine.connect() as conn:
        _lock(conn)
        current = _current(conn)  # again: another process may have migrated meanwhile
        _check_known(current, scripts)
        cfg = alembic_config(conn, scripts=scripts)
        if not current and _predates_migrations(conn):
            log.info("registry predates migrations: stamping it at revision %s", BASELINE)
            command.stamp(cfg, BASELINE)
        log.info("upgrading the registry schema from %s to %s",
                 ", ".join(sorted(current)) or "empty", target)
        command.upgrade(cfg, target)
        conn.commit()


def _lock(conn: Connection) -> None:
    """Serialize migrations between processes (two ``coordinator serve`` starting together).

    PostgreSQL: a transaction-scoped advisory lock, released by the same commit that ends the
    migration (PostgreSQL runs DDL inside transactions). SQLite: ``BEGIN IMMEDIATE`` takes the
    database's write lock up front (pysqlite would begin only at the first INSERT and run the
    DDL outside any transaction); the other process waits on its busy timeout (``engine_for``)
    and then finds the schema current. A later revision that needs ``PRAGMA foreign_keys=OFF``
    cannot set it inside this transaction. Other databases: no lock.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_LOCK_KEY})
    elif conn.dialect.name == "sqlite":
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def _current(conn: Connection) -> set[str]:
    """The revisions the database is at (empty: never migrated), read without Alembic's logs."""
    if not inspect(conn).has_table("alembic_version"):
        return set()
    return {rev for (rev,) in conn.execute(text("SELECT version_num FROM alembic_version"))}


def _check_known(current: set[str], scripts: Path) -> None:
    known = {s.revision for s in _scripts(scripts).walk_revisions()}
    for rev in sorted(current - known):
        raise RegistrySchemaError(
            f"the registry database is at schema revision {rev!r}, which this EdgeFleet does "
            f"not know (its newest is {head(scripts)!r}): upgrade EdgeFleet, or use another "
            "database"
        )


def _predates_migrations(conn: Connection) -> bool:
    found = BASELINE_TABLES & set(inspect(conn).get_table_names())
    if found and found != BASELINE_TABLES:
        missing = ", ".join(sorted(BASELINE_TABLES - found))
        raise RegistrySchemaError(
            f"the registry database has no alembic_version and only some of the registry's "
            f"tables (missing: {missing}): repair it, or use another database"
        )
    return bool(found)
