"""The agent facade: identity, trust, store and the active runtime, in one process.

``Agent.predict`` is the hot path: one attribute read and the runtime call, nothing else.
``Agent.predict_versioned`` is as cheap and also says which version answered.

An agent opened normally is the store's one writer: it holds the store lock until ``close``
(or the end of a ``with`` block), and a second writer, in any process, gets ``StoreError``.
``readonly=True`` opens it as an observer (``edgefleet agent status``/``predict`` beside the
daemon): no lock, nothing written, ``install``/``rollback`` raise ``RuntimeError``. Changes
made through one agent are serialized by a lock, so its in-memory store state is the truth.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from edgefleet.infra.fsutil import atomic_write
from edgefleet.protocol.canonical import canonical_json
from edgefleet.protocol.errors import EdgeFleetError, StoreError
from edgefleet.protocol.manifest import Manifest
from edgefleet.protocol.messages import ActiveModel, InstallResult, ReleaseOffer

from .candidate import CandidateSlot, SlotStore
from .config import AgentConfig
from .identity import DeviceIdentity
from .reporter import active_model
from .runtime import Runtime, RuntimeLoadError, load_runtime
from .store import InstalledVersion, ModelStore, StoreState
from .trust import TrustStore
from .updater import AlreadyAcceptedError, Progress, SegmentSource, Updater, UpdaterConfig

__all__ = ["Agent", "AgentStatus", "KeptVersion"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class KeptVersion:
    dir: str  # store/versions/<dir>
    name: str
    version: str
    sequence: int
    format: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class AgentStatus:
    """What ``edgefleet agent status`` and ``GET /v1/status`` show (cheap: from memory, no
    disk read once the kept manifests were read, no runtime call)."""

    device_id: str
    active: ActiveModel | None
    highest_sequence: int
    keyring_version: int | None
    kept: tuple[KeptVersion, ...]
    last_install: InstallResult | None
    broken: str | None = None  # why no model is served although one is active (None: fine)

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape (``--json``, the HTTP API): as ``last_install.json`` for the result."""
        d = dataclasses.asdict(self)
        d["kept"] = list(d["kept"])
        d["last_install"] = None if self.last_install is None else _plain(self.last_install)
        return d


log = logging.getLogger(__name__)


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        *,
        clock: Callable[[], float] = time.time,
        checkpoint: Callable[[str], None] | None = None,
        readonly: bool = False,
    ) -> None:
        self.config, self.readonly = config, readonly
        home = config.home
        self.identity = DeviceIdentity.load(home / "keys")
        self.trust = TrustStore(home / "trust")
        self.store: ModelStore = SlotStore(  # refuses candidate releases (agent.candidate)
            home / "store", candidate=False, keep=config.keep, checkpoint=checkpoint,
            readonly=readonly,
        )  # fmt: skip
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
        self._changing = threading.Lock()  # one install or rollback at a time
        self._recording = threading.Lock()  # the last result and its file change together
        self._runtime: Runtime | None = None  # what predict() runs
        self._serving: tuple[InstalledVersion, Runtime] | None = None  # the same, labelled
        self.broken: str | None = None  # why nothing is served though a model is active
        # A/B (agent.ab): while set, ``predict_versioned`` hands every request to it
        self.router: Callable[[np.ndarray], tuple[InstalledVersion, np.ndarray]] | None = None
        self.candidate: CandidateSlot | None = None  # the shadow / A/B slot, once opened
        self._last: InstallResult | None = self._read_last()  # the file is only the report
        self._kept: tuple[StoreState, tuple[KeptVersion, ...]] | None = None  # status() cache
        try:
            self._load_active()
        except BaseException:
            self.store.close()
            raise

    @classmethod
    def open(cls, home: Path, **kwargs: Any) -> Agent:
        return cls(AgentConfig.load(home), **kwargs)

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _load_active(self) -> None:
        """Serve the newest kept version that loads, deleting nothing.

        If the active version does not load (a broken runtime package, bit rot) but an older
        kept one does, that one is made active by moving the pointer only: both stay kept, so
        the newer one is still there once the cause is fixed. A read-only agent serves it
        without moving the pointer. If none loads, the agent opens serving nothing
        (``broken`` says why, ``predict`` refuses): the store is unchanged, and a valid newer
        release, over the air or from a file, still installs and repairs the device.
        """
        failures = []
        for name in self.store.state.history:
            try:
                version = self.store.version(name)
                runtime = load_runtime(
                    version.model_path, version.manifest.format, self.config.threads
                )
            except (RuntimeLoadError, EdgeFleetError) as exc:  # incl. StoreError, DecodeError
                log.error("kept model %s does not load: %s", name, exc)
                failures.append(f"{name}: {exc}")
                continue
            if name != self.store.state.active:
                self._fall_back(version)
            self._swap(version, runtime)
            return
        if failures:
            self.broken = (
                f"active model {self.store.state.active} does not load, nor does any other "
                f"kept version ({'; '.join(failures)})"
            )
            log.error(
                "no working model: %s; serving nothing until a newer release installs", self.broken
            )

    def _fall_back(self, version: InstalledVersion) -> None:
        active, name = self.store.state.active, version.dir.name
        if self.readonly:
            log.error("active model %s does not load; serving %s in this process", active, name)
            return
        log.error("active model %s does not load; falling back to %s (both kept)", active, name)
        try:
            self.store.activate(version)
        except StoreError as exc:  # serve it anyway; the next start tries the newest again
            log.error("cannot make %s active: %s", name, exc)

    def _swap(self, version: InstalledVersion, runtime: Runtime) -> None:
        # The old runtime is not closed here: a predict() on another thread may still hold
        # it; it is released when the last reference goes (CPython refcounting).
        self._serving = (version, runtime)
        self._runtime = runtime
        self.broken = None

    @property
    def serving(self) -> tuple[InstalledVersion, Runtime] | None:
        """The active version and its runtime, as one snapshot (the shadow's baseline)."""
        return self._serving

    def open_candidate(self) -> CandidateSlot:
        """The candidate slot (``<home>/candidate/``), opened on first use; closed with us."""
        if self.candidate is None:
            cfg = self.updater.config
            self.candidate = CandidateSlot(
                self.config.home, self.identity, self.trust, clock=self._clock, config=cfg,
                readonly=self.readonly,
            )  # fmt: skip
        return self.candidate

    @property
    def active(self) -> InstalledVersion | None:
        """The version being served (cheap: no disk access)."""
        serving = self._serving
        return None if serving is None else serving[0]

    # -- inference (hot path) -------------------------------------------------------------
    def predict(self, x: np.ndarray) -> np.ndarray:
        """Run the active model on a batch-first float32 array; returns its output."""
        rt = self._runtime
        if rt is None:
            raise RuntimeError(self._no_model())
        return rt.run(x)

    def _no_model(self) -> str:
        if self.broken is not None:
            return f"no working model: {self.broken}; install a newer release to repair it"
        return "no model is active: install a bundle first"

    def predict_versioned(self, x: np.ndarray) -> tuple[InstalledVersion, np.ndarray]:
        """Like ``predict``, with the version that produced the output (one snapshot: a
        concurrent swap cannot pair one model's output with another's name). While an A/B
        candidate is served, ``router`` picks the model (``agent.ab``)."""
        router = self.router
        if router is not None:
            return router(x)
        return self.predict_active(x)

    def predict_active(self, x: np.ndarray) -> tuple[InstalledVersion, np.ndarray]:
        """``predict_versioned`` on the active model, whatever the router says."""
        serving = self._serving
        if serving is None:
            raise RuntimeError(self._no_model())
        version, rt = serving
        return version, rt.run(x)

    # -- changes --------------------------------------------------------------------------
    def _writer(self, what: str) -> None:
        if self.readonly:
            raise RuntimeError(f"{what}: this agent was opened read-only")

    def install_file(self, path: Path, *, progress: Progress | None = None) -> InstalledVersion:
        return self._installing(lambda: self.updater.install_file(path, progress=progress))

    def install(
        self,
        offer: ReleaseOffer,
        source: SegmentSource,
        *,
        manifest: Manifest | None = None,
        progress: Progress | None = None,
    ) -> InstalledVersion:
        """Install a network release (see ``Updater.install`` for ``manifest``)."""
        return self._installing(
            lambda: self.updater.install(offer, source, manifest=manifest, progress=progress)
        )

    def _installing(self, run: Callable[[], tuple[InstalledVersion, Runtime]]) -> InstalledVersion:
        self._writer("install")
        with self._changing:
            try:
                version, runtime = run()
            except AlreadyAcceptedError as exc:  # not an error: nothing to do, nothing recorded
                log.info("install skipped (%s): %s", exc.code, exc)
                raise
            except EdgeFleetError as exc:
                self.record(ok=False, code=exc.code, reason=str(exc))
                log.warning("install rejected (%s): %s", exc.code, exc)
                raise
            self._swap(version, runtime)
            m = version.manifest
            log.info(
                "installed %s %s (release %d, %s): active",
                m.name,
                m.model_version,
                m.sequence,
                m.format,
            )
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
        self._writer("rollback")
        with self._changing:
            version = self.store.rollback()
            self._swap(
                version,
                load_runtime(version.model_path, version.manifest.format, self.config.threads),
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
        """Keep ``InstallResult(**result)`` as the last result (time: now) and write it to
        ``last_install.json``: a report only, so a failure to write it is logged."""
        self._writer("record")
        last = InstallResult(**{**result, "time": int(self._clock())})
        with self._recording:
            self._last = last
            try:
                # A report, not state (ACTIVE.json is): replaced atomically, but not fsynced.
                atomic_write(
                    self.config.home / "last_install.json",
                    canonical_json(_plain(last)),
                    durable=False,
                )
            except OSError as exc:
                log.error("cannot record the install result %s: %s", last.code, exc)

    def record_failure(self, error: EdgeFleetError) -> None:
        self.record(ok=False, code=error.code, reason=str(error))

    # -- reporting ------------------------------------------------------------------------
    @property
    def last_install(self) -> InstallResult | None:
        """The last install, rollback or refused offer (in memory: no disk read)."""
        return self._last

    def last_result(self) -> dict[str, Any] | None:
        """``last_install`` as the JSON object ``last_install.json`` holds."""
        last = self._last
        return None if last is None else _plain(last)

    def _read_last(self) -> InstallResult | None:
        path = self.config.home / "last_install.json"
        try:
            d = json.loads(path.read_bytes())
            known = {f.name for f in dataclasses.fields(InstallResult)}
            return InstallResult(**{k: v for k, v in d.items() if k in known})
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, AttributeError) as exc:  # a report: not fatal
            log.warning("ignoring unreadable %s: %s", path, exc)
            return None

    def status(self) -> AgentStatus:
        return AgentStatus(
            device_id=self.identity.device_id,
            active=active_model(self.active),
            highest_sequence=self.store.state.highest_sequence,
            keyring_version=self.trust.keyring.version if self.trust.keyring else None,
            kept=self._kept_versions(),
            last_install=self._last,
            broken=self.broken,
        )

    def _kept_versions(self) -> tuple[KeptVersion, ...]:
        """The kept versions, cached while the store's state is the same object: every
        install, rollback or fall-back makes a new one. A status report reads no disk."""
        state, cached = self.store.state, self._kept
        if cached is not None and cached[0] is state:
            return cached[1]
        kept = tuple(
            KeptVersion(
                dir=k.dir.name,
                name=k.manifest.name,
                version=k.manifest.model_version,
                sequence=k.manifest.sequence,
                format=k.manifest.format,
            )
            for k in self.store.kept()
        )
        self._kept = (state, kept)
        return kept

    def close(self) -> None:
        """Release the runtime and the store lock (idempotent)."""
        serving, self._serving, self._runtime = self._serving, None, None
        if serving is not None:
            serving[1].close()
        if self.candidate is not None:
            self.candidate.close()
        self.store.close()


def _plain(result: InstallResult) -> dict[str, Any]:
    """As written before results were typed: fields that are None are left out."""
    return {k: v for k, v in dataclasses.asdict(result).items() if v is not None}
