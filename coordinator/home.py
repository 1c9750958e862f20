"""The coordinator facade: keys, registry, blobs; registers models and builds releases."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from edgefleet.infra.fsutil import atomic_write
from edgefleet.protocol.build import BuiltRelease, ReleaseSpec, build_release
from edgefleet.protocol.canonical import canonical_json
from edgefleet.protocol.device import DevicePublic
from edgefleet.protocol.keys import KemPublicKey
from edgefleet.protocol.manifest import FORMATS, SmokeVector, TensorSpec

from .blobs import BlobStore
from .config import CoordinatorConfig
from .keys import CoordinatorKeys
from .registry import Device, ModelVersion, Registry, Release, ReleaseTarget

__all__ = ["Coordinator"]

log = logging.getLogger(__name__)


def format_of(path: Path) -> str:
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise ValueError(f"{path}: expected a .onnx or .tflite model file, saw {path.suffix!r}")
    return fmt


class Coordinator:
    def __init__(self, config: CoordinatorConfig) -> None:
        self.config = config
        self.home = config.home
        if not (self.home / "keyring.json").exists():
            raise FileNotFoundError(
                f"{self.home}: not a coordinator home (run `edgefleet coordinator init`)"
            )
        self.keys = CoordinatorKeys.load(self.home)
        self.registry = Registry(config.database_url)
        self.blobs = BlobStore(self.home / "blobs")

    @classmethod
    def init(cls, home: Path, *, database: str = "", now: int | None = None) -> Coordinator:
        home.mkdir(parents=True, exist_ok=True)
        CoordinatorKeys.create(home, now=int(now if now is not None else time.time()))
        config = CoordinatorConfig(home=home, database=database)
        atomic_write(home / "coordinator.toml", config.to_toml().encode())
        return cls(config)

    @classmethod
    def open(cls, home: Path, **overrides: Any) -> Coordinator:
        return cls(CoordinatorConfig.load(home, **overrides))

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
    ) -> ModelVersion:
        """Store the model file content-addressed and record a version with its metadata.

        Metadata (input/output spec, smoke vectors, feature statistics, metrics) comes from
        ``meta_path`` or a sidecar ``<stem>.json`` next to the model, as ``edgefleet model
        train`` writes it. A name or version no manifest can carry is refused (``ValueError``);
        so is, with ``check`` (the default), a model the agent cannot serve or that its
        metadata does not describe (``coordinator.modelcheck``). ``check=False`` registers
        opaque bytes that no device will load (tests, payload benchmarks).
        """
        from .modelcheck import check_model, check_names

        check_names(name, version)
        fmt = format_of(path)
        data = path.read_bytes()
        meta_path = meta_path or path.with_suffix(".json")
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
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
    def build(
        self,
        name: str,
        version: str,
        selector: str,
        *,
        now: int | None = None,
        ttl: int | None = None,
    ) -> tuple[Release, BuiltRelease]:
        """Sign and encrypt a release of a registered model for the selected devices."""
        mv = self.registry.model(name, version)
        device_ids = self.registry.resolve(selector)
        if not device_ids:
            raise LookupError(f"selector {selector!r} matches no enrolled device")
        recipients = {}
        for dev_id in device_ids:
            dev = self.registry.device(dev_id)
            assert dev is not None
            recipients[dev_id] = KemPublicKey(dev.kem, dev.kem_public)
        now = int(now if now is not None else time.time())
        self.keys.check(now=now, ttl=ttl or self.config.manifest_ttl)
        meta = mv.meta
        spec = ReleaseSpec(
            name=mv.name,
            format=mv.format,
            model_version=mv.version,
            sequence=self.registry.next_sequence(),
            inputs=tuple(TensorSpec.from_dict(t) for t in meta["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in meta["outputs"]),
            created=now,
            ttl=ttl or self.config.manifest_ttl,
            segment_size=self.config.segment_size,
            smoke=tuple(SmokeVector.from_dict(v) for v in meta.get("smoke", [])),
            reference_stats=meta.get("feature_stats", {}),
            lineage={"model_id": mv.id, **mv.lineage, "metrics": mv.metrics},
        )
        built = build_release(
            self.blobs.get(mv.blob), spec, release_key=self.keys.release, recipients=recipients
        )
        release = Release(
            sequence=spec.sequence,
            bundle_id=built.manifest.bundle_id,
            model_id=mv.id,
            selector=selector,
            created=now,
            manifest=built.manifest_raw,
            signature=built.signature_raw,
            keyring=self.keys.keyring_raw,
            keyring_sig=self.keys.keyring_sig,
            payload_blob=self.blobs.put(built.payload),
            content_key=built.content_key,
            targets=[
                ReleaseTarget(device_id=e.device_id, envelope=canonical_json(e.to_dict()))
                for e in built.envelopes
            ],
        )
        self.registry.add_release(release)
        log.info(
            "built release %d: %s v%s for %d devices (%d segments)",
            spec.sequence,
            name,
            version,
            len(device_ids),
            built.manifest.segments,
        )
        return release, built

    def write_bundle(self, built: BuiltRelease, out: Path) -> None:
        atomic_write(out, built.to_file_bytes(self.keys.keyring_raw, self.keys.keyring_sig))


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
    out["feature_stats"] = meta.get("feature_stats", {})
    return out
