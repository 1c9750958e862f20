"""The registry on both of its databases: SQLite (the default) and PostgreSQL.

Every test runs twice, once per backend. PostgreSQL gets a fresh database per module run
(``CREATE DATABASE`` through the ``postgres`` maintenance database) and a fresh schema per
test (``drop_all`` and Alembic's version table afterwards); the module skips PostgreSQL only if
none is reachable. The schema migrations run here on both, too.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from edgefleet.coordinator import migrations
from edgefleet.coordinator.home import Coordinator
from edgefleet.coordinator.registry import Registry, Release, ReleaseTarget, engine_for
from edgefleet.protocol.manifest import Manifest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from tests.conftest import Digits
from tests.coordinator.legacy_registry import assert_old_rows, make_old_registry, open_concurrently

from .fleet import make_agent_home

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def registry(db_url: str) -> Iterator[Registry]:
    reg = Registry(db_url)
    yield reg
    reg.engine.dispose()


def _enroll(reg: Registry, *devices: str) -> None:
    for d in devices:
        reg.enroll(device_id=d, sign_public=d.encode() * 4, kem="x25519",
                   kem_public=bytes(range(32)))


def _model(reg: Registry, name: str = "digits", version: str | None = None) -> int:
    return reg.add_model(name=name, version=version, format="onnx", blob="ab" * 32, size=1234,
                         meta={"inputs": [{"name": "x", "shape": [None, 64]}], "atol": 1e-4},
                         metrics={"accuracy": 0.98}, lineage={"parent": None}).id


def test_add_model_versions_automatically_and_round_trips_metadata(registry: Registry) -> None:
    assert [registry.add_model(name="digits", version=None, format="onnx", blob="00" * 32,
                               size=1, meta={}).version for _ in range(2)] == ["1", "2"]
    _model(registry, version="v3")
    assert registry.add_model(name="digits", version=None, format="tflite", blob="11" * 32,
                              size=2, meta={}).version == "4"
    assert registry.add_model(name="other", version=None, format="onnx", blob="22" * 32,
                              size=3, meta={}).version == "1"
    with pytest.raises(ValueError, match="already registered"):
        _model(registry, version="v3")
    mv = registry.model("digits", "v3")
    assert (mv.format, mv.size, mv.blob) == ("onnx", 1234, "ab" * 32)
    assert mv.meta == {"inputs": [{"name": "x", "shape": [None, 64]}], "atol": 1e-4}
    assert (mv.metrics, mv.lineage) == ({"accuracy": 0.98}, {"parent": None})
    with pytest.raises(LookupError, match="not registered"):
        registry.model("digits", "99")
    assert [(m.name, m.version) for m in registry.models()] == [
        ("digits", "1"), ("digits", "2"), ("digits", "v3"), ("digits", "4"), ("other", "1")]


def test_enroll_is_idempotent_and_refuses_other_keys(registry: Registry) -> None:
    key = bytes(range(256)) * 4  # binary columns keep every byte value
    first = registry.enroll(device_id="dev-a", sign_public=key, kem="mlkem768-x25519",
                            kem_public=key[::-1])
    again = registry.enroll(device_id="dev-a", sign_public=key, kem="mlkem768-x25519",
                            kem_public=key[::-1])
    assert again.enrolled == first.enrolled
    with pytest.raises(ValueError, match="other keys"):
        registry.enroll(device_id="dev-a", sign_public=b"\x01" * 32, kem="x25519",
                        kem_public=key)
    dev = registry.device("dev-a")
    assert dev is not None and (dev.sign_public, dev.kem_public) == (key, key[::-1])
    assert (dev.state, dev.last_result, dev.revoked, dev.last_seen) == ("enrolled", {}, False, None)
    assert registry.device("dev-z") is None
    _enroll(registry, "dev-c", "dev-b")
    assert [d.device_id for d in registry.devices()] == ["dev-a", "dev-b", "dev-c"]


def test_groups_and_selectors(registry: Registry) -> None:
    _enroll(registry, "dev-a", "dev-b", "dev-c")
    registry.add_to_group("canary", ["dev-c"])
    registry.add_to_group("canary", ["dev-c", "dev-a"])  # again: no duplicate membership
    registry.add_to_group("lab", ["dev-b"])
    with pytest.raises(LookupError, match="not enrolled"):
        registry.add_to_group("lab", ["dev-zz"])
    assert registry.groups() == {"canary": ["dev-a", "dev-c"], "lab": ["dev-b"]}

    assert registry.resolve("all") == ["dev-a", "dev-b", "dev-c"]
    assert registry.resolve("group:canary") == ["dev-a", "dev-c"]
    assert registry.resolve("device:dev-b") == ["dev-b"]
    assert registry.resolve("dev-c,dev-a") == ["dev-a", "dev-c"]
    with pytest.raises(LookupError, match="dev-x"):
        registry.resolve("dev-a,dev-x")
    with pytest.raises(LookupError, match="group nope"):
        registry.resolve("group:nope")

    assert registry.update_device("dev-c", revoked=True)
    assert registry.resolve("all") == ["dev-a", "dev-b"]
    assert registry.resolve("group:canary") == ["dev-a"]
    with pytest.raises(LookupError, match="revoked: dev-c"):  # naming one is an operator error
        registry.resolve("device:dev-c")


def test_next_sequence_is_monotonic_and_never_reused(registry: Registry, db_url: str) -> None:
    assert [registry.next_sequence() for _ in range(3)] == [1, 2, 3]
    # Several coordinators (each its own engine) allocating at once: no lost update.
    others = [Registry(db_url) for _ in range(4)]
    got: list[int] = []
    lock = threading.Lock()

    def allocate(reg: Registry) -> None:
        for _ in range(15):
            seq = reg.next_sequence()
            with lock:
                got.append(seq)

    threads = [threading.Thread(target=allocate, args=(r,)) for r in others]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for r in others:
        r.engine.dispose()
    assert sorted(got) == list(range(4, 4 + 60))
    assert registry.next_sequence() == 64


def test_first_sequence_allocated_concurrently(db_url: str) -> None:
    """The counter row does not exist yet: racing creators must not fail or collide."""
    regs = [Registry(db_url) for _ in range(4)]
    got: list[int] = []
    barrier = threading.Barrier(len(regs))

    def allocate(reg: Registry) -> None:
        barrier.wait()
        got.append(reg.next_sequence())

    threads = [threading.Thread(target=allocate, args=(r,)) for r in regs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for r in regs:
        r.engine.dispose()
    assert sorted(got) == [1, 2, 3, 4]


def _release(model_id: int, sequence: int, bundle_id: str,
             targets: list[str]) -> Release:
    return Release(sequence=sequence, bundle_id=bundle_id, model_id=model_id, selector="all",
                   created=1_700_000_000, manifest=b"{manifest}", signature=b"\x00sig\xff",
                   keyring=b"kr", keyring_sig=b"krs", payload_blob="cd" * 32,
                   content_key=bytes(32),
                   targets=[ReleaseTarget(device_id=d, envelope=f'{{"d":"{d}"}}'.encode())
                            for d in targets])


def test_add_release_and_look_it_up(registry: Registry) -> None:
    _enroll(registry, "dev-a", "dev-b")
    model_id = _model(registry, version="1")
    bundles = [uuid.uuid4().hex for _ in range(2)]
    for bundle in bundles:
        seq = registry.next_sequence()
        registry.add_release(_release(model_id, seq, bundle, ["dev-a", "dev-b"][:seq]))
    by_seq, by_bundle = registry.release(sequence=2), registry.release(bundle_id=bundles[1])
    assert by_seq is not None and by_bundle is not None
    assert by_seq.bundle_id == bundles[1] and by_bundle.sequence == 2
    assert sorted(t.device_id for t in by_seq.targets) == ["dev-a", "dev-b"]  # loaded eagerly
    assert by_seq.model.version == "1" and by_seq.signature == b"\x00sig\xff"
    assert registry.release(sequence=99) is None
    assert registry.release(bundle_id="f" * 32) is None
    assert [(r.sequence, len(r.targets)) for r in registry.releases()] == [(1, 1), (2, 2)]
    with pytest.raises(IntegrityError):  # a bundle id names one release only
        registry.add_release(_release(model_id, 3, bundles[0], ["dev-a"]))


def test_update_device(registry: Registry) -> None:
    _enroll(registry, "dev-a")
    result = {"ok": False, "code": "signature", "reason": "bad", "progress": {"done": 1}}
    assert registry.update_device("dev-a", state="idle", last_seen=1_700_000_123,
                                  active_name="digits", active_version="2", active_sequence=7,
                                  last_result=result)
    dev = registry.device("dev-a")
    assert dev is not None
    assert (dev.state, dev.last_seen, dev.active_name, dev.active_version,
            dev.active_sequence) == ("idle", 1_700_000_123, "digits", "2", 7)
    assert dev.last_result == result
    assert not registry.update_device("dev-zz", state="idle")


def test_coordinator_builds_a_release(db_url: str, tmp_path: Path, digits_v1: Digits) -> None:
    """The coordinator facade end to end on this database: register, enroll, build."""
    c = Coordinator.init(tmp_path / "coordinator", database=db_url)
    reopened = Coordinator.open(tmp_path / "coordinator")
    assert reopened.config.database_url == db_url
    mv = c.register_model("digits", digits_v1.onnx)
    root = (c.home / "root.pub").read_bytes()
    from edgefleet.protocol.keys import decode_public_key

    for dev in ("dev-a", "dev-b"):
        c.enroll(make_agent_home(tmp_path / dev, dev, decode_public_key(root)).public())
    c.registry.add_to_group("canary", ["dev-b"])
    release, built = c.build("digits", mv.version, "group:canary")
    stored = reopened.registry.release(bundle_id=built.manifest.bundle_id)
    assert stored is not None and stored.sequence == release.sequence == 1
    assert Manifest.decode(stored.manifest).targets.keys() == {"dev-b"}
    assert c.blobs.path(stored.payload_blob).stat().st_size == built.manifest.payload_size
    c.registry.engine.dispose()
    reopened.registry.engine.dispose()


def _versions(url: str) -> list[str]:
    engine = engine_for(url)
    with engine.connect() as conn:
        found = [r for (r,) in conn.execute(text("SELECT version_num FROM alembic_version"))]
    engine.dispose()
    return found


def test_a_database_made_before_migrations_keeps_its_rows(db_url: str) -> None:
    """Today's tables, made as ``create_all`` made them, are stamped, upgraded and kept."""
    engine = engine_for(db_url)
    make_old_registry(engine)
    engine.dispose()
    reg = Registry(db_url)
    assert _versions(db_url) == [migrations.head()]
    assert_old_rows(reg)
    reg.engine.dispose()


def test_concurrent_opens_migrate_once(db_url: str) -> None:
    """Coordinators starting together on an empty database: one of them creates the tables."""
    assert open_concurrently(db_url) == []
    assert _versions(db_url) == [migrations.head()]


def test_the_models_and_the_revisions_agree(registry: Registry) -> None:
    """``alembic check`` on this backend: the revisions make exactly the models' schema."""
    with registry.engine.connect() as conn:
        command.check(migrations.alembic_config(conn))
