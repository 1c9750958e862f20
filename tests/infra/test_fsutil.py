"""edgefleet.infra.fsutil: atomic_write (unique temporaries, so concurrent writers never
collide) and os_errors, the one place an OSError becomes a StoreError."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
from edgefleet.infra.fsutil import atomic_write, os_errors
from edgefleet.protocol.errors import StoreError


def test_two_threads_writing_one_file_do_not_share_a_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Thread A is held inside its write while thread B writes the same file start to end."""
    path = tmp_path / "last_install.json"
    real_fsync = os.fsync
    a_inside, b_done = threading.Event(), threading.Event()

    def fsync(fd: int) -> None:
        if threading.current_thread().name == "A" and not a_inside.is_set():
            a_inside.set()
            assert b_done.wait(10)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    errors: list[BaseException] = []

    def write(data: bytes) -> None:
        try:
            atomic_write(path, data)
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    a = threading.Thread(target=write, args=(b"A" * 4096,), name="A")
    a.start()
    assert a_inside.wait(10)
    b = threading.Thread(target=write, args=(b"B",), name="B")
    b.start()
    b.join(10)
    b_done.set()
    a.join(10)
    assert errors == []
    assert path.read_bytes() == b"A" * 4096  # A replaced the file last, with all of its data
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind


@pytest.mark.parametrize("mode", [0o600, 0o644])
def test_mode(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "f"
    atomic_write(path, b"x", mode=mode)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == mode & ~umask
    atomic_write(path, b"y", mode=mode)  # replacing keeps it
    assert stat.S_IMODE(path.stat().st_mode) == mode & ~umask and path.read_bytes() == b"y"


def test_failed_write_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "f"
    atomic_write(path, b"old")

    def fail(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="No space"):
        atomic_write(path, b"new")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f"]


@pytest.mark.parametrize(("make", "reason"), [
    (lambda p: (p / "missing").read_bytes(), "No such file or directory"),
    (lambda p: (p / "missing" / "f").write_bytes(b"x"), "No such file or directory"),
    (lambda p: p.read_bytes(), "Is a directory"),
    (lambda p: atomic_write(p / "f", b"x", mode=0o400) or atomic_write(p / "f" / "g", b""),
     "Not a directory"),
])
def test_os_errors_become_one_store_error(tmp_path: Path, make: Any, reason: str) -> None:
    with pytest.raises(StoreError) as info, os_errors(f"{tmp_path}: cannot do it"):
        make(tmp_path)
    assert str(info.value) == f"{tmp_path}: cannot do it: {reason}"
    assert isinstance(info.value.__cause__, OSError)


def test_os_errors_passes_other_exceptions_and_success_through(tmp_path: Path) -> None:
    with os_errors("x"):
        atomic_write(tmp_path / "f", b"ok")
    assert (tmp_path / "f").read_bytes() == b"ok"
    with pytest.raises(KeyError), os_errors("x"):
        raise KeyError("not an OS error")


def test_os_errors_lets_the_named_kinds_through(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError), os_errors("x", passthrough=(FileNotFoundError,)):
        (tmp_path / "missing").read_bytes()
    with pytest.raises(StoreError, match="x: Is a directory"), os_errors(
        "x", passthrough=(FileNotFoundError,)
    ):
        tmp_path.read_bytes()
