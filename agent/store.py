"""The on-device model store: versions side by side, one active, switched atomically.

Layout under ``root``::

    ACTIVE.json              {"active": dir, "history": [dirs, newest first], "highest_sequence": n}
    versions/<dir>/          model.<fmt>, manifest.json (bytes as signed), manifest.sig
    staging/<tmp>/           an install in progress (deleted on open)
    trash/                   pruned versions being deleted (deleted on open)

Crash safety: a version directory is fully written and fsynced in ``staging/`` before one
``os.rename`` moves it into ``versions/``; ``ACTIVE.json`` is replaced atomically and is the
only thing that says what is active, so after a crash at any point either the old or the
new version is active and complete. Directories the pointer does not name are leftovers and
are removed on open. The anti-rollback sequence is bumped in the same write as the switch.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from edgefleet.fsutil import atomic_write, fsync_dir
from protocol.canonical import canonical_json
from protocol.errors import StoreError
from protocol.manifest import Manifest

__all__ = ["InstalledVersion", "ModelStore", "Staging", "StoreState"]

log = logging.getLogger(__name__)
POINTER = "ACTIVE.json"


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
    """A version being written; becomes visible only through ``ModelStore.commit``."""

    dir: Path
    model: BinaryIO
    written: int = 0
    extra: dict[str, bytes] = field(default_factory=dict)

    def write(self, data: bytes) -> None:
        self.model.write(data)
        self.written += len(data)


def version_dirname(m: Manifest) -> str:
    return f"{m.sequence:010d}-{m.name}-{m.model_version}-{m.bundle_id[:8]}"


class ModelStore:
    """Crash-safe version store. ``checkpoint`` is a fault-injection hook for tests."""

    def __init__(
        self, root: Path, *, keep: int = 2, checkpoint: Callable[[str], None] | None = None
    ) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root, self.keep = root, keep
        self._cp = checkpoint or (lambda label: None)
        for sub in ("versions", "staging", "trash"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self.state = self._load_state()
        self._recover()

    # -- state -----------------------------------------------------------------------------
    def _load_state(self) -> StoreState:
        path = self.root / POINTER
        if not path.exists():
            return StoreState()
        try:
            d = json.loads(path.read_bytes())
            return StoreState(d["active"], tuple(d["history"]), int(d["highest_sequence"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"{path}: unreadable store pointer ({exc})") from exc

    def _write_state(self, state: StoreState) -> None:
        self._cp("pointer:before")
        atomic_write(self.root / POINTER, state.to_bytes())
        self.state = state
        self._cp("pointer:after")

    def _recover(self) -> None:
        """Remove leftovers of interrupted installs and prunes."""
        for sub in ("staging", "trash"):
            for p in (self.root / sub).iterdir():
                shutil.rmtree(p, ignore_errors=True)
        keep = set(self.state.history)
        for p in (self.root / "versions").iterdir():
            if p.name not in keep:
                log.info("removing unreferenced version %s", p.name)
                shutil.rmtree(p, ignore_errors=True)
        if self.state.active and not (self.root / "versions" / self.state.active).is_dir():
            raise StoreError(f"active version {self.state.active} is missing from {self.root}")

    # -- reading ---------------------------------------------------------------------------
    def version(self, dirname: str) -> InstalledVersion:
        d = self.root / "versions" / dirname
        raw = (d / "manifest.json").read_bytes()
        return InstalledVersion(d, Manifest.decode(raw), raw)

    def active(self) -> InstalledVersion | None:
        return self.version(self.state.active) if self.state.active else None

    def kept(self) -> list[InstalledVersion]:
        return [self.version(name) for name in self.state.history]

    # -- installing ------------------------------------------------------------------------
    def begin(self, manifest: Manifest) -> Staging:
        d = self.root / "staging" / uuid.uuid4().hex
        d.mkdir()
        self._cp("staging:created")
        return Staging(d, open(d / f"model.{manifest.format}", "wb"))  # noqa: SIM115

    def abort(self, staging: Staging) -> None:
        staging.model.close()
        shutil.rmtree(staging.dir, ignore_errors=True)

    def commit(
        self, staging: Staging, manifest_raw: bytes, signature_raw: bytes, manifest: Manifest
    ) -> InstalledVersion:
        """Make the staged version durable and visible under ``versions/`` (not active)."""
        staging.model.flush()
        os.fsync(staging.model.fileno())
        staging.model.close()
        self._cp("model:synced")
        for fname, data in (("manifest.json", manifest_raw), ("manifest.sig", signature_raw)):
            with open(staging.dir / fname, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            self._cp(f"{fname}:synced")
        fsync_dir(staging.dir)
        target = self.root / "versions" / version_dirname(manifest)
        if target.exists():  # same release installed before (e.g. replayed after a crash)
            shutil.rmtree(target)
        os.rename(staging.dir, target)
        self._cp("version:renamed")
        fsync_dir(target.parent)
        self._cp("version:synced")
        return InstalledVersion(target, manifest, manifest_raw)

    def discard(self, version: InstalledVersion) -> None:
        """Remove a committed but never activated version (e.g. it failed its smoke test)."""
        if version.dir.name in self.state.history:
            raise RuntimeError(f"{version.dir.name} is kept; use rollback instead")
        self._trash(version.dir.name)

    def activate(self, version: InstalledVersion) -> None:
        """Atomically make ``version`` active and raise the accepted sequence to its own."""
        name = version.dir.name
        history = (name, *(h for h in self.state.history if h != name))
        seq = max(self.state.highest_sequence, version.manifest.sequence)
        self._write_state(StoreState(name, history[: self.keep], seq))
        log.info("active model is now %s (sequence %d)", name, version.manifest.sequence)
        for old in history[self.keep :]:
            self._trash(old)

    def rollback(self) -> InstalledVersion:
        """Return to the previous kept version; the one left is removed."""
        if len(self.state.history) < 2:
            raise StoreError("rollback: no previous version is kept")
        bad, *rest = self.state.history
        self._write_state(StoreState(rest[0], tuple(rest), self.state.highest_sequence))
        log.info("rolled back from %s to %s", bad, rest[0])
        self._trash(bad)
        return self.version(rest[0])

    def _trash(self, dirname: str) -> None:
        src = self.root / "versions" / dirname
        if src.exists():
            dst = self.root / "trash" / f"{dirname}.{uuid.uuid4().hex[:8]}"
            os.rename(src, dst)
            self._cp("trash:renamed")
            shutil.rmtree(dst, ignore_errors=True)
