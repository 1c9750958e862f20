"""Crash-safe file helpers shared by the agent and the coordinator, and the one OS-error edge.

``os_errors(what)`` is where an ``OSError`` (disk full, I/O error, permission denied, a file
missing) becomes our ``StoreError``: every adapter that touches the disk wraps its I/O in it
instead of writing its own ``try/except OSError``::

    with os_errors(f"{path}: cannot read the device keys"):
        raw = path.read_bytes()
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from edgefleet.protocol.errors import StoreError

__all__ = [
    "atomic_write",
    "fsync_dir",
    "os_errors",
    "private_dir",
    "private_file",
    "start_writeback",
    "strerror",
]


def strerror(exc: OSError) -> str:
    """The operating system's short reason (``No space left on device``), else the message."""
    return exc.strerror or str(exc)


@contextlib.contextmanager
def os_errors(what: str, *, passthrough: tuple[type[OSError], ...] = ()) -> Iterator[None]:
    """Raise ``StoreError(f"{what}: {reason}")`` from any ``OSError`` leaving the block.

    ``what`` names the file or object and the operation ("<path>: cannot read the keyring").
    Handle the ``OSError`` subclasses that are not failures (``FileNotFoundError`` for an
    optional file) inside the block, or name those that must leave unchanged in
    ``passthrough``; other exceptions pass through unchanged.
    """
    try:
        yield
    except passthrough:
        raise
    except OSError as exc:
        raise StoreError(f"{what}: {strerror(exc)}") from exc


def fsync_dir(path: Path) -> None:
    """Make a rename or create inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of dirty pages, do not wait


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


_SYNC_RANGE = _sync_file_range()


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing ``fd``'s dirty pages in ``[offset, offset + length)`` to
    disk, without waiting for them (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``; a no-op
    elsewhere, and on failure). Not a durability point: the caller still fsyncs, but that
    fsync then has less left to wait for, and the disk works while the CPU does."""
    if _SYNC_RANGE is not None and length > 0:
        _SYNC_RANGE(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def private_dir(path: Path, *, mode: int = 0o700) -> Path:
    """Make ``path`` (and missing parents) a directory with exactly ``mode``, whatever the umask.

    Each missing component is created with ``mode``; the leaf, new or not, is then set to
    ``mode`` (an existing, looser directory is tightened). Raises ``OSError``.
    """
    missing = []
    p = path
    while not p.is_dir():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made by another process meanwhile
            d.mkdir(mode=mode)
        os.chmod(d, mode)  # mkdir's mode is less the umask
    if path.stat().st_mode & 0o777 != mode:
        os.chmod(path, mode)
    return path


def private_file(path: Path, *, mode: int = 0o600) -> Path:
    """Create ``path`` empty with exactly ``mode`` if missing, else set its mode (``OSError``)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, mode)
    try:
        if os.fstat(fd).st_mode & 0o777 != mode:
            os.fchmod(fd, mode)
    finally:
        os.close(fd)
    return path


def atomic_write(path: Path, data: bytes, *, mode: int = 0o644, durable: bool = True) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old or the new file.

    The temporary next to ``path`` has a unique name, so threads or processes writing the
    same file never share one (the last ``os.replace`` wins, whole). The file gets ``mode``
    less the umask, as ``os.open`` would give it, before any data is written.

    ``durable`` (two fsyncs: the file before the replace, its directory after) makes the new
    file survive a power loss once this returns. ``durable=False`` is for reports that may
    be lost: readers still never see a partial file, but after a crash ``path`` may be the
    old one (or, on a file system that does not order data before the rename, empty).
    """
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode & ~_umask())
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    if durable:
        fsync_dir(path.parent)


def _umask() -> int:
    """The process umask, read without changing it where Linux tells (``/proc``)."""
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o077)  # elsewhere: set and restore (briefly racy with other threads)
    os.umask(mask)
    return mask
