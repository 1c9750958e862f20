"""File modes of secrets and trusted state, whatever the process umask (issue 7 item 14).

A coordinator home (keys, storage key, registry, blobs) and an agent home (keys, pinned root,
store, an installed model) are made for real under umask 0o002 and 0o022; each path must have
exactly the mode in the table, and no secret may be readable or writable by group or others.
We run as root, so this checks the modes themselves, not another user's access. Also: the
store's ``LOCK`` names a holder only while it holds the lock.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from edgefleet.agent.store import ModelStore, StoreBusyError
from edgefleet.coordinator.home import Coordinator
from edgefleet.protocol.keys import decode_public_key

from .conftest import Digits, make_agent_home, open_agent

UMASKS = [0o002, 0o022]


@pytest.fixture(params=UMASKS, ids=[f"umask-{m:04o}" for m in UMASKS])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_secrets_and_trusted_state_are_private(umask: int, tmp_path: Path,
                                               digits_v1: Digits) -> None:
    now = int(time.time())
    chome, ahome = tmp_path / "coordinator", tmp_path / "agent"
    c = Coordinator.init(chome, now=now)
    c.update_config(segment_size=4096)
    mv = c.register_model("digits", digits_v1.onnx)
    root = decode_public_key((chome / "root.pub").read_bytes())
    identity = make_agent_home(ahome, "dev-a", root)
    c.enroll(identity.public())
    release, built = c.build("digits", mv.version, "all", now=now)
    bundle = tmp_path / "r.efb"
    c.write_bundle(built, bundle)
    with open_agent(ahome, now=now + 60) as agent:
        installed = agent.install_file(bundle)
        lock_mode = mode(ahome / "store" / "LOCK")
    with sqlite3.connect(chome / "registry.db") as db:  # WAL and shared memory files appear
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("UPDATE counters SET value = value")
        wal = {s: mode(chome / f"registry.db{s}") for s in ("-wal", "-shm")}

    blob = c.blobs.path(mv.blob)
    expected = {
        chome: 0o700,
        chome / "keys": 0o700,
        chome / "keys" / "root.json": 0o600,
        chome / "keys" / f"release-{c.keys.release.keyid}.json": 0o600,
        chome / "secrets": 0o700,
        chome / "secrets" / "storage.key": 0o600,
        chome / "registry.db": 0o600,
        chome / "blobs": 0o700,
        blob.parent.parent: 0o700,
        blob.parent: 0o700,
        blob: 0o600,
        c.blobs.path(release.payload_blob): 0o600,
        ahome: 0o700,
        ahome / "keys": 0o700,
        ahome / "keys" / "device.json": 0o600,
        ahome / "trust": 0o700,
        ahome / "store": 0o700,
        ahome / "store" / "versions": 0o700,
        ahome / "store" / "staging": 0o700,
        ahome / "store" / "trash": 0o700,
        installed.model_path: 0o600,
    }
    got = {p: mode(p) for p in expected}
    got_named = {str(p.relative_to(tmp_path)): f"{m:04o}" for p, m in got.items()}
    want_named = {str(p.relative_to(tmp_path)): f"{m:04o}" for p, m in expected.items()}
    assert got_named == want_named
    assert lock_mode == 0o600
    assert wal == {"-wal": 0o600, "-shm": 0o600}
    for p in expected:  # nothing here is readable, writable or searchable by anyone else
        assert mode(p) & 0o077 == 0, p


def test_a_home_made_before_is_tightened_on_open(tmp_path: Path, digits_v1: Digits) -> None:
    chome = tmp_path / "coordinator"
    c = Coordinator.init(chome, now=int(time.time()))
    c.register_model("digits", digits_v1.onnx)
    for p in (chome, chome / "registry.db", chome / "blobs"):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)  # as the code before this made them
    Coordinator.open(chome)
    assert [mode(p) for p in (chome, chome / "registry.db", chome / "blobs")] == [
        0o700, 0o600, 0o700]


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(done.stdout)


def test_a_busy_store_never_names_a_stale_pid(tmp_path: Path) -> None:
    root = tmp_path / "store"
    ModelStore(root).close()  # a writer that came and went
    lock = root / "LOCK"
    assert lock.read_bytes() == b""  # a pid is there only while its process holds the lock
    stale = dead_pid()
    lock.write_text(f"{stale}\n")  # what a writer killed while holding it leaves behind
    fd = os.open(lock, os.O_RDONLY)  # another holder that wrote no pid
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(StoreBusyError, match="in use by another process") as info:
            ModelStore(root)
        assert str(stale) not in str(info.value)
    finally:
        os.close(fd)


def test_a_busy_store_names_the_live_holder(tmp_path: Path) -> None:
    root = tmp_path / "store"
    with ModelStore(root):
        assert (root / "LOCK").read_text().strip() == str(os.getpid())
        with pytest.raises(StoreBusyError, match=f"locked by pid {os.getpid()}"):
            ModelStore(root)
    assert (root / "LOCK").read_bytes() == b""
