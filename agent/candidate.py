"""The candidate slot: a second model store for shadow and A/B candidates, never the active one.

A candidate release (a manifest with the signed ``candidate`` field, ``protocol.candidate``)
installs into ``<home>/candidate/store/``, a ``ModelStore`` of its own (keep 1) with its own
anti-rollback sequence, through an ``Updater`` that shares the agent's identity and trust
store: the same checks, in the same order, as any release (signature, keyring, sequence,
expiry, target, hashes, decryption, load, smoke test). ``SlotStore`` makes the role binding:
the agent's own store refuses a candidate manifest and the candidate store refuses an ordinary
one, at ``begin`` (which is given the verified manifest before a byte is written), so a
candidate cannot become the active model however it is delivered (over the air or as a file).

Dropping the candidate (an empty retained message on its topic, or ``drop``) writes
``<home>/candidate/DROPPED`` with its sequence: the slot then serves nothing until a newer
candidate installs, and a replay of the dropped one is "already accepted" (its sequence is
the candidate store's highest). ``listeners`` are called (with the new serving pair or None)
whenever what the slot serves changes, so the shadow and A/B metrics start afresh.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgefleet.infra.fsutil import atomic_write, os_errors
from edgefleet.protocol.errors import EdgeFleetError, MalformedError
from edgefleet.protocol.manifest import Manifest
from edgefleet.protocol.messages import ReleaseOffer

from .identity import DeviceIdentity
from .runtime import Runtime, RuntimeLoadError, load_runtime
from .store import InstalledVersion, ModelStore, Staging
from .trust import TrustStore
from .updater import Progress, SegmentSource, Updater, UpdaterConfig

__all__ = ["CANDIDATE_DIR", "CandidateSlot", "RoleError", "Serving", "SlotStore"]

log = logging.getLogger(__name__)
CANDIDATE_DIR = "candidate"
Serving = tuple[InstalledVersion, Runtime]


class RoleError(MalformedError):
    """A signed candidate offered as an ordinary release, or an ordinary one as a candidate."""

    code = "role"


class SlotStore(ModelStore):
    """A ``ModelStore`` that accepts only candidate manifests (``candidate=True``) or only
    ordinary ones (``candidate=False``, the agent's own store)."""

    def __init__(self, root: Path, *, candidate: bool, **kwargs: Any) -> None:
        self.candidate = candidate
        super().__init__(root, **kwargs)

    def begin(self, manifest: Manifest) -> Staging:
        check_role(manifest, candidate=self.candidate)
        return super().begin(manifest)


def check_role(manifest: Manifest, *, candidate: bool) -> None:
    """``RoleError`` unless ``manifest`` (verified) is a candidate exactly when ``candidate``."""
    if (manifest.candidate is not None) == candidate:
        return
    what = f"release {manifest.sequence} ({manifest.name} {manifest.model_version})"
    if candidate:
        raise RoleError(f"{what}: expected a candidate release, saw an ordinary one")
    mode = manifest.candidate.mode if manifest.candidate is not None else "?"
    raise RoleError(
        f"{what}: expected an ordinary release, saw a {mode} candidate "
        "(it installs only into the candidate slot)"
    )


class CandidateSlot:
    """What the candidate slot serves: ``serving`` is one attribute read (request path)."""

    def __init__(
        self,
        home: Path,
        identity: DeviceIdentity,
        trust: TrustStore,
        *,
        clock: Callable[[], float],
        config: UpdaterConfig | None = None,
        readonly: bool = False,
    ) -> None:
        self.root = home / CANDIDATE_DIR
        if not readonly:
            with os_errors(f"{self.root}: cannot create the candidate slot"):
                self.root.mkdir(mode=0o700, exist_ok=True)
        self.threads, self.readonly = (config or UpdaterConfig()).threads, readonly
        self.store = SlotStore(self.root / "store", candidate=True, keep=1, readonly=readonly)
        self.updater = Updater(
            identity, trust, self.store, clock=clock, config=config or UpdaterConfig()
        )
        self.serving: Serving | None = None
        self.listeners: list[Callable[[Serving | None], None]] = []
        self._changing = threading.Lock()
        self.last_error: str | None = None
        try:
            self._load()
        except BaseException:
            self.store.close()
            raise

    def _load(self) -> None:
        version = self.store.active() if self.store.state.active else None
        if version is None or version.manifest.sequence <= self._dropped():
            return
        try:
            runtime = load_runtime(version.model_path, version.manifest.format, self.threads)
        except RuntimeLoadError as exc:
            log.error("candidate %s does not load: %s; serving no candidate", version.dir.name, exc)
            return
        self.serving = (version, runtime)

    def _dropped(self) -> int:
        try:
            return int((self.root / "DROPPED").read_text().strip() or 0)
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as exc:  # unreadable: serve nothing rather than guess
            log.warning("candidate slot: unreadable DROPPED marker (%s)", exc)
            return 1 << 62

    @property
    def version(self) -> InstalledVersion | None:
        serving = self.serving
        return None if serving is None else serving[0]

    def check(self, offer: ReleaseOffer) -> Manifest:
        """Verify a candidate offer's signed parts (``Updater.check``) and its role."""
        manifest = self.updater.check(offer)
        check_role(manifest, candidate=True)
        return manifest

    def served_raw(self) -> bytes | None:
        version = self.version
        return None if version is None else version.manifest_raw

    def install(
        self,
        offer: ReleaseOffer,
        source: SegmentSource,
        *,
        manifest: Manifest | None = None,
        progress: Progress | None = None,
    ) -> InstalledVersion:
        """Verify and install a candidate (``Updater.install``); it is served at once."""
        return self._installing(
            lambda: self.updater.install(offer, source, manifest=manifest, progress=progress)
        )

    def install_file(self, path: Path, *, progress: Progress | None = None) -> InstalledVersion:
        return self._installing(lambda: self.updater.install_file(path, progress=progress))

    def _installing(self, run: Callable[[], Serving]) -> InstalledVersion:
        with self._changing:
            try:
                version, runtime = run()
            except EdgeFleetError as exc:
                self.last_error = f"{exc.code}: {exc}"
                raise
            with os_errors(f"{self.root}: cannot clear the DROPPED marker"):
                (self.root / "DROPPED").unlink(missing_ok=True)
            self.last_error = None
            self._swap((version, runtime))
        m = version.manifest
        mode = m.candidate.mode if m.candidate else "?"
        log.info("candidate %s %s (release %d, %s) installed", m.name, m.model_version,
                 m.sequence, mode)  # fmt: skip
        return version

    def drop(self) -> bool:
        """Stop serving the candidate (kept on disk; a newer one replaces it). True if one was."""
        with self._changing:
            version = self.version
            if version is None:
                return False
            with os_errors(f"{self.root}: cannot drop the candidate"):
                atomic_write(self.root / "DROPPED", f"{version.manifest.sequence}\n".encode())
            self._swap(None)
        log.info("candidate %s dropped", version.dir.name)
        return True

    def _swap(self, serving: Serving | None) -> None:
        self.serving = serving  # the old runtime goes with its last reference
        for listener in list(self.listeners):
            try:
                listener(serving)
            except Exception:  # a listener's bug must not undo the install
                log.exception("candidate listener failed")

    def close(self) -> None:
        serving, self.serving = self.serving, None
        if serving is not None:
            serving[1].close()
        self.store.close()
