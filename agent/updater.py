"""The install path: verify, decrypt, store, load, smoke-test, switch — in that order.

This is the I/O shell around ``protocol.verify``: it reads segments from a ``SegmentSource``
(a side-loaded ``.efb`` file or a downloaded ``.part`` file), writes plaintext into the
store's staging area, and activates only a version whose model loads and reproduces the
signed smoke vectors. Any failure raises a ``BundleError`` (or ``StoreError``, which is also
what operating-system errors such as a full disk become) and leaves the previously active
version active, with nothing of the new one left behind.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from edgefleet.protocol.container import BundleReader, decode_envelopes
from edgefleet.protocol.envelope import Envelope, unwrap_key
from edgefleet.protocol.errors import (
    BundleError,
    IntegrityError,
    MalformedError,
    ModelLoadError,
    SmokeTestError,
    StoreError,
    TooLargeError,
)
from edgefleet.protocol.manifest import Manifest
from edgefleet.protocol.segments import SegmentCipher, sha256_hex
from edgefleet.protocol.verify import Policy, check_envelopes, select_envelope, verify_manifest

from .identity import DeviceIdentity
from .runtime import Runtime, RuntimeLoadError, load_runtime
from .store import InstalledVersion, ModelStore
from .trust import TrustStore

__all__ = ["FileSource", "Offer", "SegmentSource", "Updater", "UpdaterConfig", "smoke_test"]

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]


@dataclass(frozen=True, kw_only=True)
class UpdaterConfig:
    max_payload: int = 512 * 1024 * 1024  # bytes; larger releases are refused before download
    offline_grace: int = 0  # seconds a manifest is still accepted past its expiry
    threads: int = 1  # runtime intra-op threads


@dataclass(frozen=True, kw_only=True)
class Offer:
    """The small, signed part of a release, as received (bytes are verified, not trusted)."""

    keyring: bytes
    keyring_sig: bytes
    manifest: bytes
    signature: bytes


class SegmentSource(Protocol):
    def read(self, offset: int, length: int) -> bytes: ...


class FileSource:
    """Segments read from a file region (payload of an ``.efb`` or a downloaded ``.part``)."""

    def __init__(self, path: Path, base: int = 0) -> None:
        self._fd = os.open(path, os.O_RDONLY)
        self._base = base

    def read(self, offset: int, length: int) -> bytes:
        try:
            return os.pread(self._fd, length, self._base + offset)
        except OSError as exc:
            raise StoreError(f"cannot read the bundle at {offset} ({exc.strerror or exc})") from exc

    def close(self) -> None:
        os.close(self._fd)


def smoke_test(runtime: Runtime, manifest: Manifest) -> None:
    """Run the signed smoke vectors; raise ``SmokeTestError`` on any mismatch."""
    for i, vec in enumerate(manifest.smoke):
        try:
            x = np.asarray(vec.input, dtype=np.float32)
            want = np.asarray(vec.expected, dtype=np.float32)
        except (ValueError, TypeError) as exc:  # ragged rows: decoding refuses them too
            raise SmokeTestError(f"smoke vector {i}: expected a matrix of numbers ({exc})") from exc
        try:
            got = runtime.run(x)
        except (ValueError, RuntimeError) as exc:
            raise SmokeTestError(f"smoke vector {i}: model rejected the input ({exc})") from exc
        if got.shape != want.shape or not np.allclose(got, want, atol=vec.atol, rtol=0):
            err = float(np.max(np.abs(got - want))) if got.shape == want.shape else float("nan")
            raise SmokeTestError(
                f"smoke vector {i}: expected output within {vec.atol} "
                f"(shape {want.shape}), saw shape {got.shape}, max error {err:.3g}"
            )


class Updater:
    def __init__(
        self,
        identity: DeviceIdentity,
        trust: TrustStore,
        store: ModelStore,
        *,
        clock: Callable[[], float],
        config: UpdaterConfig = UpdaterConfig(),
    ) -> None:
        self.identity, self.trust, self.store = identity, trust, store
        self.clock, self.config = clock, config
        self._policy = Policy(offline_grace=config.offline_grace)

    def check(self, offer: Offer) -> Manifest:
        """Verify keyring and manifest (no payload yet): is this release for us, and new?"""
        now = int(self.clock())
        keyring = self.trust.accept(offer.keyring, offer.keyring_sig, now=now)
        manifest = verify_manifest(
            keyring,
            offer.manifest,
            offer.signature,
            now=now,
            device_id=self.identity.device_id,
            highest_sequence=self.store.state.highest_sequence,
            policy=self._policy,
        )
        if manifest.payload_size > self.config.max_payload:
            raise TooLargeError(
                f"release {manifest.sequence}: payload of {manifest.payload_size} "
                f"bytes exceeds this device's cap of {self.config.max_payload}"
            )
        return manifest

    def install(
        self,
        offer: Offer,
        envelope: Envelope,
        source: SegmentSource,
        *,
        progress: Progress | None = None,
    ) -> tuple[InstalledVersion, Runtime]:
        """Verify and install a release; return the now active version and its loaded runtime."""
        return self._install_verified(self.check(offer), offer, envelope, source, progress)

    def _install_verified(
        self,
        manifest: Manifest,
        offer: Offer,
        envelope: Envelope,
        source: SegmentSource,
        progress: Progress | None,
    ) -> tuple[InstalledVersion, Runtime]:
        envelope = select_envelope(manifest, [envelope], self.identity.device_id)
        key = unwrap_key(envelope, self.identity.kem, bundle_id=manifest.bundle_id)
        version = self._write(manifest, offer, key, source, progress)
        try:
            runtime = self._load_and_smoke(version)
        except BundleError:
            self._discard(version)
            raise
        try:
            self.store.activate(version)
        except StoreError:
            runtime.close()
            if version.dir.name not in self.store.state.history:  # the pointer did not move
                self._discard(version)
            raise
        return version, runtime

    def _discard(self, version: InstalledVersion) -> None:
        try:
            self.store.discard(version)
        except StoreError as exc:  # the error being raised matters more; this is a leftover
            log.warning("%s; it goes on the next open", exc)

    def _write(
        self,
        m: Manifest,
        offer: Offer,
        key: bytes,
        source: SegmentSource,
        progress: Progress | None,
    ) -> InstalledVersion:
        cipher = SegmentCipher(key, bytes.fromhex(m.bundle_id), m.segment_size)
        digest = hashlib.sha256()
        staging = self.store.begin(m)
        try:
            for i in range(m.segments):
                offset, length = m.segment_span(i)
                ct = source.read(offset, length)
                if len(ct) != length or sha256_hex(ct) != m.segment_hashes[i]:
                    raise IntegrityError(
                        f"segment {i}: expected {length} bytes with SHA-256 "
                        f"{m.segment_hashes[i][:16]}…, saw {len(ct)} bytes "
                        f"hashing to {sha256_hex(ct)[:16]}…"
                    )
                plain = cipher.open(i, ct, final=i == m.segments - 1)
                digest.update(plain)
                staging.write(plain)
                self.store._cp(f"segment:{i}")
                if progress:
                    progress(offset + length, m.payload_size)
            if staging.written != m.plaintext_size or digest.hexdigest() != m.plaintext_sha256:
                raise IntegrityError(
                    f"plaintext: expected {m.plaintext_size} bytes with SHA-256 "
                    f"{m.plaintext_sha256[:16]}…, saw {staging.written} bytes "
                    f"hashing to {digest.hexdigest()[:16]}…"
                )
            return self.store.commit(staging, offer.manifest, offer.signature, m)
        except OSError as exc:  # what the store did not map already (the segment checkpoint)
            self.store.abort(staging)
            raise StoreError(
                f"release {m.sequence}: cannot stage it ({exc.strerror or exc})"
            ) from exc
        except BaseException:
            self.store.abort(staging)
            raise

    def _load_and_smoke(self, version: InstalledVersion) -> Runtime:
        try:
            runtime = load_runtime(version.model_path, version.manifest.format, self.config.threads)
        except RuntimeLoadError as exc:
            raise ModelLoadError(f"{version.manifest.format} model does not load: {exc}") from exc
        try:
            smoke_test(runtime, version.manifest)
        except BundleError:
            runtime.close()
            raise
        return runtime

    def install_file(
        self, path: Path, *, progress: Progress | None = None
    ) -> tuple[InstalledVersion, Runtime]:
        """Side-load an ``.efb`` file with exactly the same checks as a network release."""
        try:
            with open(path, "rb") as f:
                bundle = BundleReader(
                    lambda off, n: os.pread(f.fileno(), n, off),
                    file_size=os.fstat(f.fileno()).st_size,
                    max_payload=self.config.max_payload,
                )
                offer = Offer(
                    keyring=bundle.section("keyring"),
                    keyring_sig=bundle.section("keyring_sig"),
                    manifest=bundle.section("manifest"),
                    signature=bundle.section("signature"),
                )
                manifest = self.check(offer)  # verify before reading anything big
                envelopes = decode_envelopes(bundle.section("envelopes"))
            layout = bundle.layout
        except OSError as exc:
            raise StoreError(f"{path}: cannot read bundle ({exc.strerror})") from exc
        check_envelopes(manifest, envelopes)
        if layout["payload"][1] != manifest.payload_size:
            raise MalformedError(
                f"payload: manifest says {manifest.payload_size} bytes, "
                f"file holds {layout['payload'][1]}"
            )
        mine = select_envelope(manifest, envelopes, self.identity.device_id)
        source = FileSource(path, layout["payload"][0])
        try:
            return self._install_verified(manifest, offer, mine, source, progress)
        finally:
            source.close()
