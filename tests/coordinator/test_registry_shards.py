"""Revision 0009 (``manifest_shards``) on SQLite and PostgreSQL: a registry holding releases
of one manifest (every release before sharding) is upgraded and still serves them as they
were, beside new releases signed per shard; downgrading drops only the new table."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from edgefleet.coordinator import migrations
from edgefleet.coordinator import release as releases
from edgefleet.coordinator.home import Coordinator
from edgefleet.coordinator.migrations import alembic_config
from edgefleet.coordinator.registry import Registry, engine_for
from edgefleet.protocol.envelope import unwrap_key
from edgefleet.protocol.keyring import Keyring
from edgefleet.protocol.manifest import MAX_TARGETS, Manifest
from edgefleet.protocol.messages import ReleaseOffer
from edgefleet.protocol.verify import select_envelope, verify_manifest
from sqlalchemy import inspect, text

from tests.databases import db_url, pg_url  # noqa: F401  (fixtures)

from .homes import T0, Home, make_home

DEVICES = ("dev-a", "dev-b", "dev-c", "dev-d", "dev-e")


def revision(url: str) -> tuple[str, bool]:
    """(the database's revision, whether it has ``manifest_shards``)."""
    engine = engine_for(url)
    try:
        with engine.connect() as conn:
            [(rev,)] = conn.execute(text("SELECT version_num FROM alembic_version")).all()
            return rev, inspect(conn).has_table("manifest_shards")
    finally:
        engine.dispose()


def downgrade(url: str, to: str) -> None:
    engine = engine_for(url)
    try:
        with engine.connect() as conn:
            command.downgrade(alembic_config(conn), to)
            conn.commit()
    finally:
        engine.dispose()


def served(home: Home, offers: dict[str, ReleaseOffer]) -> set[bytes]:
    """Each device verifies its offer as the agent does; the manifests the offers carried."""
    for dev, offer in offers.items():
        m = verify_manifest(Keyring.decode(offer.keyring), offer.manifest, offer.signature,
                            now=T0, device_id=dev, highest_sequence=0)  # fmt: skip
        env = select_envelope(m, [offer.envelope], dev)
        assert len(unwrap_key(env, home.kem_private[dev], bundle_id=m.bundle_id)) == 32
    return {o.manifest for o in offers.values()}


def test_old_single_manifest_releases_are_served_after_the_upgrade(
    tmp_path: Path,
    db_url: str,  # noqa: F811
) -> None:
    home = make_home(tmp_path, DEVICES, database=db_url)
    c = home.coordinator
    c.update_config(manifest_shard=MAX_TARGETS)  # one manifest naming every target, as before
    old, built = c.build("m", "1", "all", now=T0)
    assert len(built.shards) == 1 and set(Manifest.decode(old.manifest).targets) == set(DEVICES)
    before = releases.offers(old)
    c.registry.engine.dispose()
    downgrade(db_url, "0008")  # the registry as the code before sharding had it
    assert revision(db_url) == ("0008", False)

    reg = Registry(db_url)  # opening it upgrades it
    assert revision(db_url) == (migrations.head(), True) and migrations.head() == "0009"
    stored = reg.release(sequence=old.sequence)
    assert stored is not None and stored.shards == []
    assert releases.offers(stored) == before  # the same bytes, every device its full manifest
    assert served(home, before) == {old.manifest}
    chunked = reg.release_by_bundle(old.bundle_id, busy_timeout=1.0)  # the chunk path
    assert chunked is not None and Manifest.decode(chunked.manifest).segments == 4
    reg.engine.dispose()

    c = Coordinator.open(c.home, manifest_shard=2)
    new, _ = c.build("m", "2", "all", now=T0)  # beside it, a release of three shards
    assert len(served(home, releases.offers(new))) == 3
    again = c.registry.release(sequence=old.sequence)
    assert again is not None and releases.offers(again) == before
    c.registry.engine.dispose()
