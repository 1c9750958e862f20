"""The coordinator facade: keys, registry, blobs; registers models and builds releases."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefleet.infra.fsutil import atomic_write, fsync_dir, os_errors, private_dir, private_file
from edgefleet.protocol.build import BuiltRelease, ReleaseSpec, build_release
from edgefleet.protocol.candidate import CandidateSpec
from edgefleet.protocol.canonical import canonical_json
from edgefleet.protocol.device import DevicePublic
from edgefleet.protocol.errors import ConfigError
from edgefleet.protocol.keys import KemPublicKey
from edgefleet.protocol.manifest import FORMATS, SmokeVector, TensorSpec
from sqlalchemy.engine import make_url

from .blobs import BlobStore
from .config import CoordinatorConfig
from .keys import CoordinatorKeys
from .registry import (
    CONTENT_KEY_SIZE,
    Device,
    ModelVersion,
    Registry,
    Release,
    ReleaseTarget,
    open_content_key,
    seal_content_key,
)
from .tables.shards import shard_rows
from .vault import StorageKey, Vault, read_key_file, write_key_file

__all__ = ["Coordinator", "Signed"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Signed:
    """A release signed and encrypted (``Coordinator.sign``), its payload stored, not recorded."""

    model: ModelVersion
    built: BuiltRelease
    created: int  # unix s
    payload_blob: str  # SHA-256 hex of the stored ciphertext


def format_of(path: Path) -> str:
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise ValueError(f"{path}: expected a .onnx or .tflite model file, saw {path.suffix!r}")
    return fmt


class Coordinator:
    """``storage_key``: the key sealing content keys and blobs at rest when the config names
    an environment variable (``storage_key_env``; the CLI reads it); else the key file's."""

    def __init__(self, config: CoordinatorConfig, *, storage_key: StorageKey | None = None) -> None:
        self.config = config
        self.home = config.home
        if not (self.home / "keyring.json").exists():
            raise FileNotFoundError(
                f"{self.home}: not a coordinator home (run `edgefleet coordinator init`)"
            )
        with os_errors(f"{self.home}: cannot make the coordinator home private"):
            private_dir(self.home)  # 0700: also tightens a home made before it was
            _private_sqlite(config.database_url)
        self.keys = CoordinatorKeys.load(self.home)
        self.registry = Registry(config.database_url)
        self.blobs = BlobStore(self.home / "blobs")
        vault, migrate = self._vault(storage_key)
        self._use(vault)
        if migrate:
            log.warning("sealing this home's content keys and model blobs at rest (first open)")
            self.rotate_storage_key()

    @classmethod
    def init(cls, home: Path, *, database: str = "", now: int | None = None) -> Coordinator:
        with os_errors(f"{home}: cannot create the coordinator home"):
            private_dir(home)
        CoordinatorKeys.create(home, now=int(now if now is not None else time.time()))
        config = CoordinatorConfig(home=home, database=database)
        write_key_file(config.storage_key_path, StorageKey.generate())
        atomic_write(home / "coordinator.toml", config.to_toml().encode())
        return cls(config)

    @classmethod
    def open(cls, home: Path, *, storage_key: StorageKey | None = None, **overrides: Any
             ) -> Coordinator:  # fmt: skip
        return cls(CoordinatorConfig.load(home, **overrides), storage_key=storage_key)

    def update_config(self, **changes: Any) -> None:
        """Change settings in ``coordinator.toml`` (and in this instance)."""
        from dataclasses import replace

        self.config = replace(self.config, **changes)
        atomic_write(self.home / "coordinator.toml", self.config.to_toml().encode())

    # -- models ---------------------------------------------------------------------------
    def register_model(
        self,
        name: str,
        path: Path,
        *,
        version: str | None = None,
        meta_path: Path | None = None,
        lineage: dict[str, Any] | None = None,
        check: bool = True,
        reference_stats: dict[str, Any] | None = None,
    ) -> ModelVersion:
        """Store the model file content-addressed and record a version with its metadata.

        Metadata (input/output spec, smoke vectors, feature statistics, metrics) comes from
        ``meta_path`` or a sidecar ``<stem>.json`` next to the model, as ``edgefleet model
        train`` writes it. A name or version no manifest can carry is refused (``ValueError``);
        so is, with ``check`` (the default), a model the agent cannot serve or that its
        metadata does not describe (``coordinator.modelcheck``). ``check=False`` registers
        opaque bytes that no device will load (tests, payload benchmarks).
        ``reference_stats`` (``models.refstats``) replaces the metadata's ``feature_stats``,
        the drift reference every release manifest carries; drift statistics that do not
        validate or do not match the input width are refused (``ValueError``).
        """
        from .modelcheck import check_model, check_names

        check_names(name, version)
        fmt = format_of(path)
        data = path.read_bytes()
        meta_path = meta_path or path.with_suffix(".json")
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        if reference_stats is not None:
            meta["feature_stats"] = reference_stats
        spec = _release_meta(meta)
        if check:
            check_model(fmt, data, spec)
        blob = self.blobs.put(data)
        metrics = {k: meta[k] for k in ("accuracy",) if k in meta}
        mv = self.registry.add_model(
            name=name,
            version=version,
            format=fmt,
            blob=blob,
            size=len(data),
            meta=spec,
            metrics=metrics,
            lineage=lineage,
        )
        log.info("registered model %s version %s (%s, %d bytes)", name, mv.version, fmt, len(data))
        return mv

    # -- fleet ----------------------------------------------------------------------------
    def enroll(self, public: DevicePublic) -> Device:
        if public.device_id == self.config.username:  # it would take over the broker account
            raise ValueError(f"device id {public.device_id!r} is the coordinator's broker username")
        return self.registry.enroll(
            device_id=public.device_id,
            sign_public=public.sign_public,
            kem=public.kem.kem,
            kem_public=public.kem.raw,
        )

    def revoke(self, device_id: str) -> None:
        """No future release includes the device, and its broker password is forgotten
        (re-run ``coordinator broker-config`` to drop it from the broker too)."""
        self.registry.revoke(device_id)
        (self.home / "secrets" / "devices" / f"{device_id}.password").unlink(missing_ok=True)

    # -- releases -------------------------------------------------------------------------
    def sign(
        self,
        name: str,
        version: str,
        selector: str,
        *,
        now: int | None = None,
        ttl: int | None = None,
        candidate: CandidateSpec | None = None,
        shard_size: int | None = None,
    ) -> Signed:
        """Encrypt a registered model once for the selected devices under a new sequence and
        sign its manifests (one per ``shard_size`` devices, default ``manifest_shard``); the
        payload is stored, nothing is recorded: ``build`` records a release,
        ``candidates.build_candidate`` a candidate."""
        mv = self.registry.model(name, version)
        device_ids = self.registry.resolve(selector)
        if not device_ids:
            raise LookupError(f"selector {selector!r} matches no enrolled device")
        recipients = {d.device_id: KemPublicKey(d.kem, d.kem_public)
                      for d in self.registry.devices(device_ids)}  # one query per 1,000
        assert len(recipients) == len(device_ids)  # resolve() named enrolled devices only
        now = int(now if now is not None else time.time())
        ttl = ttl or self.config.manifest_ttl
        self.keys.check(now=now, ttl=ttl)
        meta = mv.meta
        spec = ReleaseSpec(
            name=mv.name,
            format=mv.format,
            model_version=mv.version,
            sequence=self.registry.next_sequence(),
            inputs=tuple(TensorSpec.from_dict(t) for t in meta["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in meta["outputs"]),
            created=now,
            ttl=ttl,
            segment_size=self.config.segment_size,
            smoke=tuple(SmokeVector.from_dict(v) for v in meta.get("smoke", [])),
            reference_stats=meta.get("feature_stats", {}),
            lineage={"model_id": mv.id, **mv.lineage, "metrics": mv.metrics},
            candidate=candidate,
        )
        built = build_release(
            self.blobs.get(mv.blob),
            spec,
            release_key=self.keys.release,
            recipients=recipients,
            shard_size=shard_size or self.config.manifest_shard,
        )
        blob = self.blobs.put_encrypted(built.payload)  # ciphertext already
        return Signed(model=mv, built=built, created=now, payload_blob=blob)

    def build(
        self,
        name: str,
        version: str,
        selector: str,
        *,
        now: int | None = None,
        ttl: int | None = None,
        shard_size: int | None = None,
    ) -> tuple[Release, BuiltRelease]:
        """Sign and encrypt a release of a registered model for the selected devices
        (``shard_size``: devices per signed manifest, default ``manifest_shard``)."""
        signed = self.sign(name, version, selector, now=now, ttl=ttl, shard_size=shard_size)
        built, seq = signed.built, signed.built.manifest.sequence
        release = Release(
            sequence=seq,
            bundle_id=built.manifest.bundle_id,
            model_id=signed.model.id,
            selector=selector,
            created=signed.created,
            manifest=built.manifest_raw,
            signature=built.signature_raw,
            keyring=self.keys.keyring_raw,
            keyring_sig=self.keys.keyring_sig,
            payload_blob=signed.payload_blob,
            content_key=built.content_key,
            targets=[
                ReleaseTarget(device_id=e.device_id, envelope=canonical_json(e.to_dict()))
                for e in built.envelopes
            ],
            shards=shard_rows(seq, built),
        )
        self.registry.add_release(release)
        log.info("built release %d: %s v%s for %d devices (%d segments, %d signed manifests)",
                 seq, name, version, len(built.envelopes), built.manifest.segments,
                 len(built.shards))  # fmt: skip
        return release, built

    def write_bundle(self, built: BuiltRelease, out: Path) -> None:
        atomic_write(out, built.to_file_bytes(self.keys.keyring_raw, self.keys.keyring_sig))

    # -- encryption at rest ---------------------------------------------------------------
    def _vault(self, given: StorageKey | None) -> tuple[Vault, bool]:
        """The vault from the configured key, and whether this home still needs sealing
        (made before encryption at rest: no key yet and nothing sealed)."""
        cfg = self.config
        if cfg.storage_key_env:
            if given is None:
                return Vault.unavailable(
                    f"storage key: ${cfg.storage_key_env} is not set (storage_key_env in "
                    f"{self.home / 'coordinator.toml'})"
                ), False
            return Vault(given), False
        if given is not None:
            return Vault(given), False
        path, pending = cfg.storage_key_path, _pending(cfg.storage_key_path)
        current = read_key_file(path) if path.exists() else None
        nxt = read_key_file(pending) if pending.exists() else None
        if nxt is not None:
            if current is not None:
                log.warning("a storage key rotation was interrupted: run `edgefleet "
                            "coordinator rotate-storage-key` to finish it")  # fmt: skip
            return Vault(nxt, also=[current] if current else []), current is None
        if current is not None:
            return Vault(current), False
        missing = Vault.unavailable(f"the storage key file {path} is missing: restore it")
        return missing, not self._has_sealed()

    def _has_sealed(self) -> bool:
        if any(len(k) != CONTENT_KEY_SIZE for _, _, k in self.registry.stored_content_keys()):
            return True
        return any(not self.blobs.is_plain(m.blob) for m in self.registry.models())

    def rotate_storage_key(
        self, new: StorageKey | None = None, *, checkpoint: Callable[[str], None] | None = None
    ) -> str:
        """Re-seal every content key and model blob under a new storage key; its key id.

        Key file: the new key is written to ``<file>.next`` first and seals from then on
        (opens of this home read both keys meanwhile); each item is re-sealed in one atomic
        step; then ``<file>.next`` replaces the key file, which removes the old key. A crash
        or error on the way loses nothing, and a re-run reuses ``<file>.next`` and completes.
        Environment key: ``new`` is required and the operator switches the variable after.
        Other coordinator writers (register, build, release) should not run meanwhile.
        """
        cp = checkpoint or (lambda label: None)
        old = self.registry.vault.key if self.registry.vault else None
        if self.config.storage_key_env:
            if new is None:
                raise ConfigError(
                    f"the storage key comes from ${self.config.storage_key_env}: pass the new "
                    "key (rotate-storage-key --new-key-env NAME)"
                )
            old = self._require_vault().require()  # the old key must open what is sealed
            self._reseal_all(Vault(new, also=[old]), cp)
            return new.keyid
        path = self.config.storage_key_path
        pending = _pending(path)
        nxt = read_key_file(pending) if pending.exists() else None
        if nxt is not None and new is not None and new.keyid != nxt.keyid:
            raise ConfigError(f"{pending}: an interrupted rotation to another key; finish it first")
        if nxt is None:
            nxt = new or StorageKey.generate()
            write_key_file(pending, nxt)
        current = read_key_file(path) if path.exists() else None
        self._reseal_all(Vault(nxt, also=[k for k in (old, current) if k]), cp)
        with os_errors(f"{path}: cannot install the new storage key"):
            os.replace(pending, path)  # the switch; the old key is gone with it
            fsync_dir(path.parent)
        self._use(Vault(nxt))
        log.info("storage key is now %s (was %s)", nxt.keyid, old.keyid if old else "none")
        return nxt.keyid

    def _reseal_all(self, vault: Vault, cp: Callable[[str], None]) -> None:
        self._use(vault)  # new items are sealed under the new key from here on
        resealed = 0
        for seq, bundle_id, stored in self.registry.stored_content_keys():
            if not vault.is_current(stored):
                plain = open_content_key(vault, bundle_id, seq, stored)
                sealed = seal_content_key(vault, bundle_id, seq, plain)
                resealed += self.registry.replace_content_key(seq, stored, sealed)
                cp(f"content key {seq}")
        for digest in sorted({m.blob for m in self.registry.models()}):
            if self.blobs.reseal(digest):
                resealed += 1
                cp(f"blob {digest}")
        log.info("re-sealed %d content keys and blobs under storage key %s", resealed, vault.keyid)

    def _require_vault(self) -> Vault:
        assert self.registry.vault is not None  # set in __init__
        return self.registry.vault

    def _use(self, vault: Vault) -> None:
        self.registry.vault = self.blobs.vault = vault


def _pending(key_file: Path) -> Path:
    return key_file.with_name(key_file.name + ".next")


def _private_sqlite(url: str) -> None:
    """A SQLite registry file (and its journals) 0600: SQLite gives the journal, WAL and
    shared-memory files the database file's mode, so it is made 0600 before SQLite opens it."""
    u = make_url(url)
    if not u.drivername.startswith("sqlite") or u.database in (None, "", ":memory:"):
        return
    db = Path(u.database)
    private_file(db)
    for suffix in ("-wal", "-shm", "-journal"):
        side = db.with_name(db.name + suffix)
        if side.exists():
            private_file(side)


def _release_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """The parts of a model's metadata that go into release manifests, validated."""
    out: dict[str, Any] = {}
    for key in ("inputs", "outputs"):
        specs = meta.get(key) or ([meta[key[:-1]]] if key[:-1] in meta else None)
        if not specs:
            raise ValueError(f"model metadata lacks {key!r} (input/output tensor specs)")
        out[key] = [TensorSpec.from_dict(s).to_dict() for s in specs]
    smoke = meta.get("smoke", [])
    if isinstance(smoke, dict):  # the trainer's form: {"x": rows, "probabilities": rows, "atol"}
        smoke = [
            {"input": [x], "expected": [p], "atol": float(smoke.get("atol", 1e-4))}
            for x, p in zip(smoke["x"], smoke["probabilities"], strict=True)
        ]
    out["smoke"] = [SmokeVector.from_dict(v).to_dict() for v in smoke]
    out["feature_stats"] = stats = meta.get("feature_stats", {})
    if isinstance(stats, dict) and "drift_schema" in stats:  # drift reference: checked now
        from edgefleet.protocol.drift import ReferenceStats
        from edgefleet.protocol.errors import DecodeError

        try:
            ref = ReferenceStats.from_dict(stats)
        except DecodeError as exc:
            raise ValueError(f"model metadata feature_stats: {exc}") from exc
        width = out["inputs"][0]["shape"][-1] if out["inputs"][0]["shape"] else None
        if width is not None and width != ref.features:
            raise ValueError(f"model metadata feature_stats: statistics of {ref.features} "
                             f"features for an input of {width}")  # fmt: skip
    return out
