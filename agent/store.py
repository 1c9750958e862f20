"""The on-device model store: versions side by side, one active, switched atomically.

Layout under ``root``::

    ACTIVE.json              {"active": dir, "history": [dirs, newest first], "highest_sequence": n}
    LOCK                     held (``flock``, exclusive) by the one process that may write
    versions/<dir>/          model.<fmt>, manifest.json (bytes as signed), manifest.sig
    staging/<tmp>/           an install in progress (deleted on open)
    trash/                   pruned versions being deleted (deleted on open)

Crash safety: a version directory is written in ``staging/``, moved into ``versions/`` by one
``os.rename``, and fsynced (its files, itself, ``versions/``) before ``ACTIVE.json`` may name
it; the pointer is replaced atomically and is the only thing that says what is active, so
after a crash at any point either the old or the new version is active and complete.
Directories the pointer does not name are leftovers and are removed on open. The
anti-rollback sequence is bumped in the same write as the switch.

An install costs seven fsyncs, the least POSIX asks for this layout: the three files of the
version (model, manifest, signature), its directory (their names) and ``versions/`` (its
name), issued from one helper thread while the caller's ``check`` runs (the updater hashes the
model back and loads it there), then the pointer's two (its temporary file, then the store
root for the replace). A rollback costs the pointer's two. Pruning needs none:
a leftover goes on open.

Kept versions are immutable once committed (a directory name includes the bundle id), so a
writer remembers the ones it committed or read: ``kept()`` and ``version()`` then read
nothing from disk (a status report costs no I/O). A read-only store reads every time.

One writer: a writing ``ModelStore`` takes ``LOCK`` (non-blocking) before it reads the
pointer and holds it until ``close``, so no other process can change the store meanwhile.
That is why ``state`` is read once, at open, and never re-read before a check or a switch:
with a single writer the copy in memory is the truth (and its one process serializes its
own changes; see ``Agent``). Leftovers are only removed under the lock, so an open can never
delete another process's install in progress. A read-only store (``readonly=True``: the CLI's
``status`` and ``predict`` beside a running daemon) takes no lock, removes nothing and writes
nothing; its ``state`` is a snapshot, and a version pruned after it was taken is skipped by
``kept``.

Operating-system errors (disk full, I/O errors) leave the methods as ``StoreError`` (mapped at
one edge, ``edgefleet.infra.fsutil.os_errors``), after undoing what was half done; the active
version is unchanged unless the pointer was replaced.
Pruning after a switch only logs a failure: the leftover goes on the next open.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from edgefleet.infra.fsutil import atomic_write, fsync_dir, os_errors, private_dir, strerror
from edgefleet.protocol.canonical import canonical_json
from edgefleet.protocol.errors import StoreError
from edgefleet.protocol.manifest import Manifest

__all__ = ["InstalledVersion", "ModelStore", "Staging", "StoreBusyError", "StoreState"]

log = logging.getLogger(__name__)
POINTER = "ACTIVE.json"
LOCK = "LOCK"


class StoreBusyError(StoreError):
    """Another process (normally ``edgefleet agent run``) holds the store's writer lock."""


@dataclass(frozen=True)
class StoreState:
    active: str | None = None
    history: tuple[str, ...] = ()  # kept versions, most recently activated first
    highest_sequence: int = 0

    def to_bytes(self) -> bytes:
        return canonical_json(
            {
                "active": self.active,
                "history": list(self.history),
                "highest_sequence": self.highest_sequence,
            }
        )


@dataclass(frozen=True)
class InstalledVersion:
    dir: Path
    manifest: Manifest
    manifest_raw: bytes

    @property
    def model_path(self) -> Path:
        return self.dir / f"model.{self.manifest.format}"


@dataclass
class Staging:
    """A version being written; becomes visible only through ``ModelStore.commit``.

    ``fd`` is the model file, open read-write: write at offsets (``os.pwrite``, any order,
    any thread) or append with ``write``; set ``written`` to the bytes it holds.
    """

    dir: Path
    fd: int
    written: int = 0
    extra: dict[str, bytes] = field(default_factory=dict)

    def write(self, data: bytes) -> None:
        with os_errors(f"staging {self.dir.name}: cannot write the model"):
            view = memoryview(data)
            while view:
                n = os.pwrite(self.fd, view, self.written)
                view, self.written = view[n:], self.written + n

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


def version_dirname(m: Manifest) -> str:
    return f"{m.sequence:010d}-{m.name}-{m.model_version}-{m.bundle_id[:8]}"


class ModelStore:
    """Crash-safe version store. ``checkpoint`` is a fault-injection hook for tests."""

    def __init__(
        self,
        root: Path,
        *,
        keep: int = 2,
        checkpoint: Callable[[str], None] | None = None,
        readonly: bool = False,
    ) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root, self.keep, self.readonly = root, keep, readonly
        self._cp = checkpoint or (lambda label: None)
        self._lock_fd: int | None = None
        self._versions: dict[str, InstalledVersion] = {}  # committed or read (writer only)
        if readonly:
            self.state = self._load_state()
            return
        with os_errors(f"{root}: cannot create the model store"):
            for sub in ("versions", "staging", "trash"):  # 0700: decrypted models inside
                private_dir(root / sub)
            private_dir(root)
        self._lock_fd = _lock(root / LOCK)
        try:
            self.state = self._load_state()
            self._recover()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the writer lock (idempotent); the store can then no longer change."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):  # the pid names the holder only while it holds
                os.ftruncate(fd, 0)
            os.close(fd)  # releases the flock

    def __del__(self) -> None:  # a writer dropped unclosed still lets go of the lock
        if getattr(self, "_lock_fd", None) is not None:
            self.close()

    def __enter__(self) -> ModelStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _writable(self) -> None:
        if self.readonly:
            raise RuntimeError(f"{self.root}: the model store was opened read-only")
        if self._lock_fd is None:
            raise RuntimeError(f"{self.root}: the model store is closed")

    # -- state -----------------------------------------------------------------------------
    def _load_state(self) -> StoreState:
        path = self.root / POINTER
        with os_errors(f"{path}: cannot read the store pointer"):
            try:
                raw = path.read_bytes()
            except FileNotFoundError:
                return StoreState()
        try:
            d = json.loads(raw)
            return StoreState(d["active"], tuple(d["history"]), int(d["highest_sequence"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"{path}: unreadable store pointer ({exc})") from exc

    def _write_state(self, state: StoreState) -> None:
        try:
            self._cp("pointer:before")
            atomic_write(self.root / POINTER, state.to_bytes())
        except OSError as exc:
            try:
                switched = self._load_state() == state
            except StoreError:
                switched = False
            if not switched:
                raise StoreError(
                    f"{POINTER}: cannot switch to {state.active}: {strerror(exc)}"
                ) from exc
            # Replaced, but syncing its directory failed: the switch is what every reader
            # sees now, so this process must act on it too.
            log.error("%s now names %s, but syncing it failed: %s", POINTER, state.active, exc)
        self.state = state
        self._cp("pointer:after")

    def _recover(self) -> None:
        """Remove leftovers of interrupted installs and prunes (only ever under the lock)."""
        with os_errors(f"{self.root}: cannot clean up the store"):
            for sub in ("staging", "trash"):
                for p in (self.root / sub).iterdir():
                    shutil.rmtree(p, ignore_errors=True)
            keep = set(self.state.history)
            for p in (self.root / "versions").iterdir():
                if p.name not in keep:
                    log.info("removing unreferenced version %s", p.name)
                    shutil.rmtree(p, ignore_errors=True)
        if self.state.active and not (self.root / "versions" / self.state.active).is_dir():
            # Not fatal: the agent serves another kept version or nothing, and a valid newer
            # release (over the air or from a file) still installs and repairs the device.
            log.error("active version %s is missing from %s", self.state.active, self.root)

    # -- reading ---------------------------------------------------------------------------
    def version(self, dirname: str) -> InstalledVersion:
        with os_errors(f"version {dirname}: cannot read its manifest"):
            return self._read_version(dirname)

    def _read_version(self, dirname: str) -> InstalledVersion:
        known = self._versions.get(dirname)
        if known is not None:
            return known
        d = self.root / "versions" / dirname
        raw = (d / "manifest.json").read_bytes()
        version = InstalledVersion(d, Manifest.decode(raw), raw)
        self._remember(version)
        return version

    def _remember(self, version: InstalledVersion) -> None:
        if not self.readonly:  # a reader's versions may be pruned under it: always re-read
            self._versions[version.dir.name] = version

    def active(self) -> InstalledVersion | None:
        return self.version(self.state.active) if self.state.active else None

    def kept(self) -> list[InstalledVersion]:
        """The kept versions, newest first; one pruned by a writer while we read is skipped."""
        kept = []
        for name in self.state.history:
            with os_errors(f"version {name}: cannot read its manifest"):
                try:
                    kept.append(self._read_version(name))
                except FileNotFoundError:
                    log.debug("kept version %s is gone (pruned by the writer)", name)
        return kept

    # -- installing ------------------------------------------------------------------------
    def begin(self, manifest: Manifest) -> Staging:
        self._writable()
        d = self.root / "staging" / uuid.uuid4().hex
        try:
            with os_errors("cannot start staging a version"):
                d.mkdir(mode=0o700)
                self._cp("staging:created")
                return Staging(d, _private_file(d / f"model.{manifest.format}", os.O_RDWR))
        except StoreError:
            shutil.rmtree(d, ignore_errors=True)
            raise

    def abort(self, staging: Staging) -> None:
        with contextlib.suppress(OSError):
            staging.close()
        shutil.rmtree(staging.dir, ignore_errors=True)

    def commit(
        self,
        staging: Staging,
        manifest_raw: bytes,
        signature_raw: bytes,
        manifest: Manifest,
        *,
        check: Callable[[Path], None] | None = None,
    ) -> InstalledVersion:
        """Make the staged version durable and visible under ``versions/`` (not active).

        The manifest and signature are written, the directory is renamed into ``versions/``
        at once (the pointer does not name it: until the switch it is a leftover that the
        next open removes), then its files, itself and ``versions/`` are fsynced in a helper
        thread while ``check(version directory)`` runs here (the updater hashes the model
        back and loads it). What ``check`` raises leaves once the fsyncs are over. On failure
        nothing of the version is under ``versions/``; the caller aborts the staging. OS
        errors leave as ``StoreError``.
        """
        self._writable()
        target = self.root / "versions" / version_dirname(manifest)
        fds, staging.fd = [staging.fd], -1
        renamed = False
        try:
            with os_errors(f"cannot commit {target.name}"):
                files = (("manifest.json", manifest_raw), ("manifest.sig", signature_raw))
                for fname, data in files:
                    fds.append(fd := _private_file(staging.dir / fname, os.O_WRONLY))
                    os.write(fd, data)  # small: one write (a short one is caught here)
                    if os.fstat(fd).st_size != len(data):
                        raise OSError(errno.EIO, f"short write of {fname}")
                if target.exists():  # same release installed before (e.g. replayed after a crash)
                    shutil.rmtree(target)
                os.rename(staging.dir, target)
                renamed = True
                self._cp("version:renamed")
                _sync_while(fds, (target, target.parent), lambda: (check or _nothing)(target))
                self._cp("version:synced")
        except BaseException:
            if renamed and target.name not in self.state.history:  # never activated: drop it
                shutil.rmtree(target, ignore_errors=True)
            raise
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        version = InstalledVersion(target, manifest, manifest_raw)
        self._remember(version)
        return version

    def discard(self, version: InstalledVersion) -> None:
        """Remove a committed but never activated version (e.g. it failed its smoke test)."""
        self._writable()
        if version.dir.name in self.state.history:
            raise RuntimeError(f"{version.dir.name} is kept; use rollback instead")
        with os_errors(f"cannot discard {version.dir.name}"):
            self._trash(version.dir.name)
        self._versions.pop(version.dir.name, None)

    def activate(self, version: InstalledVersion) -> None:
        """Atomically make ``version`` active and raise the accepted sequence to its own.

        A version already kept just moves to the front (nothing is pruned); a new one may push
        the oldest out of the ``keep`` newest.
        """
        self._writable()
        name = version.dir.name
        history = (name, *(h for h in self.state.history if h != name))
        seq = max(self.state.highest_sequence, version.manifest.sequence)
        self._write_state(StoreState(name, history[: self.keep], seq))
        log.info("active model is now %s (sequence %d)", name, version.manifest.sequence)
        self._prune(history[self.keep :])

    def rollback(self) -> InstalledVersion:
        """Return to the previous kept version; the one left is removed."""
        self._writable()
        if len(self.state.history) < 2:
            raise StoreError("rollback: no previous version is kept")
        bad, *rest = self.state.history
        self._write_state(StoreState(rest[0], tuple(rest), self.state.highest_sequence))
        log.info("rolled back from %s to %s", bad, rest[0])
        self._prune([bad])
        return self.version(rest[0])

    def _prune(self, dirnames: Iterable[str]) -> None:
        """Remove versions the pointer no longer names; a failure only leaves a leftover."""
        for dirname in dirnames:
            try:
                self._trash(dirname)
            except OSError as exc:
                log.warning("cannot prune %s (%s); it goes on the next open", dirname, exc)

    def _trash(self, dirname: str) -> None:
        self._versions.pop(dirname, None)
        src = self.root / "versions" / dirname
        if src.exists():
            dst = self.root / "trash" / f"{dirname}.{uuid.uuid4().hex[:8]}"
            os.rename(src, dst)
            self._cp("trash:renamed")
            shutil.rmtree(dst, ignore_errors=True)


def _private_file(path: Path, access: int) -> int:
    """A new file's descriptor (``access``: ``os.O_WRONLY`` / ``O_RDWR``), mode 0600 whatever
    the umask (a decrypted model)."""
    fd = os.open(path, access | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _nothing(_: Path) -> None:
    return None


def _sync_while(fds: list[int], dirs: tuple[Path, ...], work: Callable[[], None]) -> None:
    """fsync ``fds``, then ``dirs`` (their names, in order), in a helper thread while ``work``
    runs here; raise the first error.

    fsync releases the GIL and mostly waits for the disk, so ``work`` (CPU) overlaps it even
    on one core. An error of ``work`` wins over one of the fsyncs (it is the more specific).
    """
    errors: list[BaseException] = []

    def sync() -> None:
        try:
            for fd in fds:
                os.fsync(fd)
            for d in dirs:
                fsync_dir(d)
        except BaseException as exc:  # handed to the caller below
            errors.append(exc)

    helper = threading.Thread(target=sync, name="store-fsync", daemon=True)
    helper.start()
    try:
        work()
    finally:
        helper.join()
    if errors:
        raise errors[0]


def _lock(path: Path) -> int:
    """An open descriptor on ``path`` holding its exclusive ``flock``; else ``StoreError``.

    ``LOCK`` is 0600 (in a 0700 store) and opened read-write, so no other user can take it;
    it names the holder's pid only while the holder holds it (``close`` empties it).
    """
    with os_errors(f"{path}: cannot open the store lock"):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if os.fstat(fd).st_mode & 0o777 != 0o600:
            os.fchmod(fd, 0o600)  # a LOCK made before it was 0600
    try:
        with os_errors(f"{path}: cannot lock the model store"):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise StoreBusyError(
                    "model store is in use by another process (is `edgefleet agent run` "
                    f"running?): {path.parent} is locked{_holder(fd)}"
                ) from exc
    except BaseException:
        os.close(fd)
        raise
    with contextlib.suppress(OSError):  # who holds it, for the message above; not essential
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _holder(fd: int) -> str:
    """`` by pid N`` if the lock file names a live process, else nothing: a pid left by a
    writer that died (or none, if the holder wrote none) must not be named."""
    with contextlib.suppress(OSError, ValueError):
        pid = int(os.pread(fd, 32, 0))
        if pid > 0 and _alive(pid):
            return f" by pid {pid}"
    return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True
