"""The agent facade: identity, trust, store and the active runtime, in one process.

``Agent.predict`` is the hot path: one attribute read and the runtime call, nothing else.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.fsutil import atomic_write
from protocol.canonical import canonical_json
from protocol.envelope import Envelope
from protocol.errors import EdgeFleetError, StoreError

from .config import AgentConfig
from .identity import DeviceIdentity
from .runtime import Runtime, RuntimeLoadError, load_runtime
from .store import InstalledVersion, ModelStore
from .trust import TrustStore
from .updater import Offer, Progress, SegmentSource, Updater, UpdaterConfig

__all__ = ["Agent"]

log = logging.getLogger(__name__)


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        *,
        clock: Callable[[], float] = time.time,
        checkpoint: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        home = config.home
        self.identity = DeviceIdentity.load(home / "keys")
        self.trust = TrustStore(home / "trust")
        self.store = ModelStore(home / "store", keep=config.keep, checkpoint=checkpoint)
        self.updater = Updater(
            self.identity,
            self.trust,
            self.store,
            clock=clock,
            config=UpdaterConfig(
                max_payload=config.max_payload,
                offline_grace=config.offline_grace,
                threads=config.threads,
            ),
        )
        self._clock = clock
        self._runtime: Runtime | None = None
        self._version: InstalledVersion | None = None
        self._load_active()

    @classmethod
    def open(cls, home: Path, **kwargs: Any) -> Agent:
        return cls(AgentConfig.load(home), **kwargs)

    def _load_active(self) -> None:
        """Load the active version; if it no longer loads, fall back to the previous one."""
        while (version := self.store.active()) is not None:
            try:
                self._swap(
                    version,
                    load_runtime(version.model_path, version.manifest.format, self.config.threads),
                )
                return
            except RuntimeLoadError as exc:
                log.error("active model %s does not load (%s); rolling back", version.dir.name, exc)
                if len(self.store.state.history) < 2:
                    raise StoreError(
                        f"active model {version.dir.name} does not load and no "
                        "previous version is kept"
                    ) from exc
                self.store.rollback()

    def _swap(self, version: InstalledVersion, runtime: Runtime) -> None:
        # The old runtime is not closed here: a predict() on another thread may still hold
        # it; it is released when the last reference goes (CPython refcounting).
        self._version, self._runtime = version, runtime

    @property
    def active(self) -> InstalledVersion | None:
        """The version being served (cheap: no disk access)."""
        return self._version

    # -- inference (hot path) -------------------------------------------------------------
    def predict(self, x: np.ndarray) -> np.ndarray:
        """Run the active model on a batch-first float32 array; returns its output."""
        rt = self._runtime
        if rt is None:
            raise RuntimeError("no model is active: install a bundle first")
        return rt.run(x)

    # -- changes --------------------------------------------------------------------------
    def install_file(self, path: Path, *, progress: Progress | None = None) -> InstalledVersion:
        return self._installing(lambda: self.updater.install_file(path, progress=progress))

    def install(
        self,
        offer: Offer,
        envelope: Envelope,
        source: SegmentSource,
        *,
        progress: Progress | None = None,
    ) -> InstalledVersion:
        return self._installing(
            lambda: self.updater.install(offer, envelope, source, progress=progress)
        )

    def _installing(self, run: Callable[[], tuple[InstalledVersion, Runtime]]) -> InstalledVersion:
        try:
            version, runtime = run()
        except EdgeFleetError as exc:
            self.record(ok=False, code=exc.code, reason=str(exc))
            log.warning("install rejected (%s): %s", exc.code, exc)
            raise
        self._swap(version, runtime)
        m = version.manifest
        self.record(
            ok=True,
            code="ok",
            reason="",
            sequence=m.sequence,
            name=m.name,
            model_version=m.model_version,
            bundle_id=m.bundle_id,
        )
        return version

    def rollback(self) -> InstalledVersion:
        version = self.store.rollback()
        self._swap(
            version, load_runtime(version.model_path, version.manifest.format, self.config.threads)
        )
        self.record(
            ok=True,
            code="rollback",
            reason="operator rollback",
            sequence=version.manifest.sequence,
            name=version.manifest.name,
            model_version=version.manifest.model_version,
        )
        return version

    def record(self, **result: Any) -> None:
        result["time"] = int(self._clock())
        atomic_write(self.config.home / "last_install.json", canonical_json(result))

    # -- reporting ------------------------------------------------------------------------
    def last_result(self) -> dict[str, Any] | None:
        path = self.config.home / "last_install.json"
        return json.loads(path.read_bytes()) if path.exists() else None

    def status(self) -> dict[str, Any]:
        v = self._version
        kept = [
            {
                "dir": k.dir.name,
                "name": k.manifest.name,
                "version": k.manifest.model_version,
                "sequence": k.manifest.sequence,
                "format": k.manifest.format,
            }
            for k in self.store.kept()
        ]
        return {
            "device_id": self.identity.device_id,
            "active": None
            if v is None
            else {
                "name": v.manifest.name,
                "version": v.manifest.model_version,
                "sequence": v.manifest.sequence,
                "format": v.manifest.format,
                "bundle_id": v.manifest.bundle_id,
            },
            "highest_sequence": self.store.state.highest_sequence,
            "keyring_version": self.trust.keyring.version if self.trust.keyring else None,
            "kept": kept,
            "last_install": self.last_result(),
        }

    def close(self) -> None:
        if self._runtime is not None:
            self._runtime.close()
            self._runtime = None
