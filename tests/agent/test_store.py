"""agent.store.ModelStore on a real directory: keep N, rollback, recovery of leftovers."""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import Any

import pytest
from edgefleet.agent.store import POINTER, InstalledVersion, ModelStore, StoreState, version_dirname
from edgefleet.protocol.errors import StoreError
from edgefleet.protocol.manifest import Manifest, TensorSpec
from edgefleet.protocol.segments import ciphertext_size, sha256_hex

T0 = 1_700_000_000


def manifest(seq: int, fmt: str = "onnx") -> tuple[Manifest, bytes]:
    model = f"model bytes of release {seq}".encode()
    spec = (TensorSpec(name="x", dtype="float32", shape=(None, 4)),)
    m = Manifest(bundle_id=secrets.token_hex(16), name="m", format=fmt, sequence=seq,
                 model_version=str(seq), created=T0, expires=T0 + 10, targets={"dev": "0" * 64},
                 inputs=spec, outputs=spec, plaintext_size=len(model),
                 plaintext_sha256=sha256_hex(model), segment_size=1024,
                 payload_size=ciphertext_size(len(model), 1024), segment_hashes=("0" * 64,))
    return m, model


def stage(store: ModelStore, seq: int) -> InstalledVersion:
    m, model = manifest(seq)
    staging = store.begin(m)
    staging.write(model)
    return store.commit(staging, m.encode(), b"signature", m)


def install(store: ModelStore, seq: int) -> InstalledVersion:
    version = stage(store, seq)
    store.activate(version)
    return version


def on_disk(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "versions").iterdir())


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_keeps_the_newest_n_versions(tmp_path: Path, keep: int) -> None:
    store = ModelStore(tmp_path, keep=keep)
    versions = [install(store, seq) for seq in range(1, 6)]
    names = [v.dir.name for v in reversed(versions)][:keep]
    assert store.state == StoreState(names[0], tuple(names), 5)
    assert on_disk(tmp_path) == sorted(names)
    assert [k.manifest.sequence for k in store.kept()] == [5, 4, 3][:keep]
    active = store.active()
    assert active is not None and active.model_path.read_bytes() == b"model bytes of release 5"
    assert (active.dir / "manifest.sig").read_bytes() == b"signature"
    store.close()  # one writer at a time
    assert ModelStore(tmp_path, keep=keep).state == store.state  # persisted


def test_rollback_returns_to_the_previous_version_and_keeps_the_sequence(tmp_path: Path) -> None:
    store = ModelStore(tmp_path, keep=3)
    v1, v2, v3 = (install(store, seq) for seq in (1, 2, 3))
    assert store.rollback().dir == v2.dir
    assert store.state == StoreState(v2.dir.name, (v2.dir.name, v1.dir.name), 3)
    assert on_disk(tmp_path) == sorted([v1.dir.name, v2.dir.name])  # the bad one is gone
    assert store.rollback().dir == v1.dir
    with pytest.raises(StoreError, match="no previous version"):
        store.rollback()
    store.close()  # one writer at a time
    reopened = ModelStore(tmp_path, keep=3)
    assert reopened.state == StoreState(v1.dir.name, (v1.dir.name,), 3)


def test_open_removes_unreferenced_leftovers(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    v1 = install(store, 1)
    uncommitted = stage(store, 2)  # committed under versions/ but never activated
    (tmp_path / "versions" / "stray").mkdir()
    (tmp_path / "staging" / "half").mkdir()
    (tmp_path / "staging" / "half" / "model.onnx").write_bytes(b"partial")
    (tmp_path / "trash" / "old.1234").mkdir()
    store.close()  # one writer at a time
    ModelStore(tmp_path)
    assert on_disk(tmp_path) == [v1.dir.name]
    assert not uncommitted.dir.exists()
    assert not any((tmp_path / "staging").iterdir()) and not any((tmp_path / "trash").iterdir())


def test_empty_store(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    assert store.state == StoreState() and store.active() is None and store.kept() == []
    with pytest.raises(StoreError):
        store.rollback()


def test_discard_and_abort_leave_nothing_behind(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    v1 = install(store, 1)
    store.discard(stage(store, 2))
    m, _ = manifest(3)
    staging = store.begin(m)
    staging.write(b"half a model")
    store.abort(staging)
    assert on_disk(tmp_path) == [v1.dir.name]
    assert not any((tmp_path / "staging").iterdir()) and not any((tmp_path / "trash").iterdir())
    with pytest.raises(RuntimeError, match="rollback"):
        store.discard(v1)


def test_recommitting_the_same_release_replaces_it(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    m, model = manifest(1)
    for content in (b"first", model):
        staging = store.begin(m)
        staging.write(content)
        version = store.commit(staging, m.encode(), b"sig", m)
    assert version.dir.name == version_dirname(m)
    assert version.model_path.read_bytes() == model


@pytest.mark.parametrize(("pointer", "match"), [
    (b"not json", "unreadable"),
    (b'{"active": null}', "unreadable"),
    (b'{"active": null, "history": [], "highest_sequence": "x"}', "unreadable"),
])
def test_unusable_pointer_is_a_store_error(tmp_path: Path, pointer: bytes, match: str) -> None:
    ModelStore(tmp_path)
    (tmp_path / POINTER).write_bytes(pointer)
    with pytest.raises(StoreError, match=match):
        ModelStore(tmp_path)


def test_a_missing_active_version_is_logged_not_fatal(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The pointer is intact (so the accepted sequence is known): the store opens, and the
    agent above serves another kept version or nothing until a newer release repairs it."""
    ModelStore(tmp_path)
    (tmp_path / POINTER).write_bytes(b'{"active": "gone", "history": ["gone"], '
                                     b'"highest_sequence": 1}')
    with caplog.at_level(logging.ERROR):
        store = ModelStore(tmp_path)
    assert store.state.highest_sequence == 1
    assert any("missing" in r.getMessage() for r in caplog.records)
    with pytest.raises(StoreError):
        store.active()


def test_keep_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keep"):
        ModelStore(tmp_path, keep=0)


def test_checkpoints_name_every_filesystem_step(tmp_path: Path) -> None:
    labels: list[str] = []
    store = ModelStore(tmp_path, keep=1, checkpoint=labels.append)
    install(store, 1)
    assert labels == ["staging:created", "version:renamed", "version:synced",
                      "pointer:before", "pointer:after"]
    labels.clear()
    install(store, 2)  # keep=1: the previous version is pruned after the switch
    assert labels[-3:] == ["pointer:before", "pointer:after", "trash:renamed"]


def _replace_by_dir(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _replace_by_file(path: Path) -> None:
    path.rmdir()
    path.write_bytes(b"")


# (case, break the store on disk, then do this, the message: "<what>: <OS reason>")
OS_ERROR_CASES = [
    ("root-is-a-file", lambda root: None,
     lambda root: ((root / "f").write_bytes(b""), ModelStore(root / "f" / "store")),
     "cannot create the model store: Not a directory"),
    ("pointer-is-a-directory", lambda root: _replace_by_dir(root / POINTER),
     lambda root: ModelStore(root), "cannot read the store pointer: Is a directory"),
    ("manifest-is-a-directory",
     lambda root: _replace_by_dir(next((root / "versions").iterdir()) / "manifest.json"),
     lambda root: ModelStore(root).active(), "cannot read its manifest: Is a directory"),
    ("staging-is-a-file", lambda root: None,
     lambda root: _begin_without_staging(root), "cannot start staging a version: Not a directory"),
]


def _begin_without_staging(root: Path) -> object:
    store = ModelStore(root)
    _replace_by_file(root / "staging")
    return store.begin(manifest(2)[0])


@pytest.mark.parametrize(("case", "damage", "act", "match"), OS_ERROR_CASES,
                         ids=[c[0] for c in OS_ERROR_CASES])
def test_os_errors_leave_as_one_store_error(
    tmp_path: Path, case: str, damage: Any, act: Any, match: str
) -> None:
    with ModelStore(tmp_path) as store:
        install(store, 1)
    damage(tmp_path)
    with pytest.raises(StoreError) as info:
        act(tmp_path)
    assert match in str(info.value) and isinstance(info.value.__cause__, OSError)
