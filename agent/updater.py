"""The install path: verify, decrypt, store, load, smoke-test, switch — in that order.

This is the I/O shell around ``protocol.verify``: it reads segments from a ``SegmentSource``
(a side-loaded ``.efb`` file or a downloaded ``.part`` file), decrypts them straight into the
staged model file (``agent.opener``: one signed-hash check per segment, none again for a
download that checked each on arrival; several cores open segments in parallel), and
activates only a version whose model loads and reproduces the signed smoke vectors, and whose
loaded input/output tensors have the signed dtypes and shapes (a symbolic batch dimension
matches any size). While the staged files are fsynced, the signed plaintext digest is checked
by hashing the staged file back, and the model is loaded and smoke-tested: only the pointer
switch waits for the disk. Any failure raises a
``BundleError`` (or ``StoreError``, which is also what operating-system errors such as a full
disk become) and leaves the previously active version active, with nothing of the new one
left behind.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from edgefleet.infra.fsutil import os_errors
from edgefleet.protocol.container import BundleReader, decode_envelopes
from edgefleet.protocol.envelope import unwrap_key
from edgefleet.protocol.errors import (
    BundleError,
    IntegrityError,
    MalformedError,
    ModelLoadError,
    RollbackError,
    SmokeTestError,
    StoreError,
    TooLargeError,
)
from edgefleet.protocol.manifest import Manifest, TensorSpec
from edgefleet.protocol.messages import ReleaseOffer
from edgefleet.protocol.segments import SegmentCipher
from edgefleet.protocol.verify import Policy, check_envelopes, select_envelope, verify_manifest

from .identity import DeviceIdentity
from .opener import SegmentOpener, SegmentSource, default_workers, plaintext_check
from .runtime import Runtime, RuntimeLoadError, load_runtime
from .store import InstalledVersion, ModelStore
from .trust import TrustStore

__all__ = [
    "AlreadyAcceptedError",
    "FileSource",
    "SegmentSource",
    "Updater",
    "UpdaterConfig",
    "check_specs",
    "smoke_test",
]

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]


@dataclass(frozen=True, kw_only=True)
class UpdaterConfig:
    max_payload: int = 512 * 1024 * 1024  # bytes; larger releases are refused before download
    offline_grace: int = 0  # seconds a manifest is still accepted past its expiry
    threads: int = 1  # runtime intra-op threads
    open_workers: int = 0  # threads opening segments; 0: one per core (at most 4), 1: none


class AlreadyAcceptedError(RollbackError):
    """An offer of a release this device accepted before: not a rollback attempt.

    ``version`` is the kept version it is (active or not), or None for the newest accepted
    release that is no longer kept (a local rollback left it). Nothing is installed; callers
    log it at INFO and report nothing.
    """

    code = "current"

    def __init__(self, message: str, *, manifest: Manifest, version: InstalledVersion | None):
        super().__init__(message)
        self.manifest, self.version = manifest, version


class FileSource:
    """Segments read from a file region (payload of an ``.efb`` or a downloaded ``.part``)."""

    def __init__(self, path: Path, base: int = 0) -> None:
        with os_errors(f"{path}: cannot open the bundle"):
            self._fd = os.open(path, os.O_RDONLY)
        self._base = base

    def read(self, offset: int, length: int) -> bytes:
        with os_errors(f"cannot read the bundle at {offset}"):
            return os.pread(self._fd, length, self._base + offset)

    def close(self) -> None:
        os.close(self._fd)


def check_specs(runtime: Runtime, manifest: Manifest) -> None:
    """The loaded model's input and output are the signed ones; raise ``ModelLoadError``."""
    for kind, signed, seen in (
        ("input", manifest.inputs, runtime.input_spec),
        ("output", manifest.outputs, runtime.output_spec),
    ):
        if len(signed) != 1 or not _same_tensor(signed[0], seen):
            want = ", ".join(_describe(t) for t in signed) or "none"
            raise ModelLoadError(f"model {kind}: expected {want} as signed, saw {_describe(seen)}")


def _same_tensor(signed: TensorSpec, seen: TensorSpec) -> bool:
    """Same dtype and shape; names are not compared (each runtime names tensors its own way)."""
    if signed.dtype != seen.dtype or len(signed.shape) != len(seen.shape):
        return False
    # A symbolic dimension (None) on either side matches any size: the batch dimension.
    pairs = zip(signed.shape, seen.shape, strict=True)
    return all(a is None or b is None or a == b for a, b in pairs)


def _describe(t: TensorSpec) -> str:
    dims = ", ".join("?" if d is None else str(d) for d in t.shape)
    return f"{t.name!r} {t.dtype} ({dims})"


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
        self.workers = config.open_workers or default_workers()  # segment-open threads

    def check(self, offer: ReleaseOffer) -> Manifest:
        """Verify keyring and manifest (no payload yet): is this release for us, and new?

        The offer's envelope is not looked at: check it with ``select_envelope`` (the
        release flow does, once, before the download). Over the air, an older kept version
        is never the coordinator's desired state (an operator's rollback is a new release),
        so its offer is a replay: a ``RollbackError``; only the active release, or the newest
        accepted one after a local rollback, is ``AlreadyAcceptedError``."""
        return self._verify(
            offer.keyring, offer.keyring_sig, offer.manifest, offer.signature, kept_too=False
        )

    def _verify(
        self, keyring_raw: bytes, keyring_sig: bytes, raw: bytes, sig: bytes, *, kept_too: bool
    ) -> Manifest:
        now = int(self.clock())
        keyring = self.trust.accept(keyring_raw, keyring_sig, now=now)
        try:
            manifest = verify_manifest(
                keyring,
                raw,
                sig,
                now=now,
                device_id=self.identity.device_id,
                highest_sequence=self.store.state.highest_sequence,
                policy=self._policy,
            )
        except RollbackError as exc:  # raised after the signature verified: ``raw`` is signed
            known = self._accepted_before(raw, kept_too=kept_too)
            if known is None:
                raise
            raise known from exc
        if manifest.payload_size > self.config.max_payload:
            raise TooLargeError(
                f"release {manifest.sequence}: payload of {manifest.payload_size} "
                f"bytes exceeds this device's cap of {self.config.max_payload}"
            )
        return manifest

    def _accepted_before(self, raw: bytes, *, kept_too: bool) -> AlreadyAcceptedError | None:
        """Why the signed manifest ``raw``, refused by the sequence rule, is no rollback
        (``kept_too``: a kept version that is not active counts as already here)."""
        m = Manifest.decode(raw)
        what = f"release {m.sequence} ({m.name} {m.model_version})"
        try:
            kept = self.store.kept()
        except StoreError:
            kept = []  # cannot tell: a rollback it stays
        for v in kept:
            is_active = v.dir.name == self.store.state.active
            if v.manifest.bundle_id == m.bundle_id and (is_active or kept_too):
                where = "active" if is_active else "kept, not active"
                return AlreadyAcceptedError(
                    f"{what} is already installed ({where})", manifest=m, version=v
                )
        active = next((v for v in kept if v.dir.name == self.store.state.active), None)
        highest = self.store.state.highest_sequence
        if m.sequence == highest and active is not None and active.manifest.sequence < highest:
            return AlreadyAcceptedError(
                f"{what} was accepted here before and rolled back locally; "
                "only a newer release replaces the active model",
                manifest=m,
                version=None,
            )
        return None

    def install(
        self,
        offer: ReleaseOffer,
        source: SegmentSource,
        *,
        manifest: Manifest | None = None,
        progress: Progress | None = None,
    ) -> tuple[InstalledVersion, Runtime]:
        """Verify and install a release; return the now active version and its loaded runtime.

        ``manifest``: what ``check`` returned for this offer once its envelope was checked
        with ``select_envelope`` (the release flow). The signed parts are verified again
        (time and the accepted sequence may have moved during the download), the envelope
        is not. Without it, both are checked here.
        """
        verified = self.check(offer)
        if manifest is None:
            select_envelope(verified, [offer.envelope], self.identity.device_id)
        elif verified != manifest:
            raise ValueError("install: the manifest is not the one this offer signs")
        return self._install_verified(verified, offer, source, progress)

    def _install_verified(
        self,
        manifest: Manifest,
        offer: ReleaseOffer,
        source: SegmentSource,
        progress: Progress | None,
    ) -> tuple[InstalledVersion, Runtime]:
        """Install a verified release; ``offer.envelope`` is this device's, already checked."""
        key = unwrap_key(offer.envelope, self.identity.kem, bundle_id=manifest.bundle_id)
        loaded: list[Runtime] = []

        def load(model: Path) -> None:  # while the staged files are being fsynced
            loaded.append(self._load_and_smoke(model, manifest))

        try:
            version = self._write(manifest, offer, key, source, progress, during_sync=load)
        except BaseException:
            for rt in loaded:  # loaded, then the commit failed
                rt.close()
            raise
        runtime = loaded[0]
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
        offer: ReleaseOffer,
        key: bytes,
        source: SegmentSource,
        progress: Progress | None,
        *,
        during_sync: Callable[[Path], None] | None = None,
    ) -> InstalledVersion:
        """Decrypt every segment into a staged version and commit it (durable, not active).

        A source whose ``verified`` is True (a finished ``Download``) checked every segment
        against its signed hash as it arrived; its segments are not hashed again (AES-GCM
        still authenticates each one as it is read back). While the staged files are
        fsynced, the plaintext digest is checked (unless workers checked it already) and then
        ``during_sync(model path)`` runs (the install loads and smoke-tests the model there:
        the file is complete, and only the switch waits for the disk). What either raises
        aborts the staging."""
        cipher = SegmentCipher(key, bytes.fromhex(m.bundle_id), m.segment_size)
        opener = SegmentOpener(m, cipher, verified=getattr(source, "verified", False) is True)

        def done(i: int) -> None:
            self.store._cp(f"segment:{i}")
            if progress:
                offset, length = m.segment_span(i)
                progress(offset + length, m.payload_size)

        staging = self.store.begin(m)
        try:  # OS errors the store did not map already (e.g. at the segment checkpoint)
            with os_errors(f"release {m.sequence}: cannot stage it"):
                fd = staging.fd
                written, digest = opener.open_into(source, fd, workers=self.workers, done=done)
                staging.written = written
                if written != m.plaintext_size or digest not in (None, m.plaintext_sha256):
                    raise IntegrityError(
                        f"plaintext: expected {m.plaintext_size} bytes with SHA-256 "
                        f"{m.plaintext_sha256[:16]}…, decrypted {written} bytes"
                        + ("" if digest is None else f" hashing to {digest[:16]}…")
                    )

                def check(version_dir: Path) -> None:  # runs while the fsyncs do
                    if digest is None:  # one core: hashed from the file, beside the fsync
                        plaintext_check(m, fd)
                    if during_sync is not None:
                        during_sync(version_dir / f"model.{m.format}")

                return self.store.commit(staging, offer.manifest, offer.signature, m, check=check)
        except BaseException:
            self.store.abort(staging)
            raise

    def _load_and_smoke(self, model: Path, manifest: Manifest) -> Runtime:
        try:
            runtime = load_runtime(model, manifest.format, self.config.threads)
        except RuntimeLoadError as exc:
            raise ModelLoadError(f"{manifest.format} model does not load: {exc}") from exc
        try:
            check_specs(runtime, manifest)
            smoke_test(runtime, manifest)
        except BundleError:
            runtime.close()
            raise
        return runtime

    def install_file(
        self, path: Path, *, progress: Progress | None = None
    ) -> tuple[InstalledVersion, Runtime]:
        """Side-load an ``.efb`` file with exactly the same checks as a network release."""
        with os_errors(f"{path}: cannot read bundle"), open(path, "rb") as f:
            bundle = BundleReader(
                lambda off, n: os.pread(f.fileno(), n, off),
                file_size=os.fstat(f.fileno()).st_size,
                max_payload=self.config.max_payload,
            )
            signed = [bundle.section(s) for s in ("keyring", "keyring_sig", "manifest")]
            signed.append(bundle.section("signature"))
            manifest = self._verify(*signed, kept_too=True)  # before reading anything big
            envelopes = decode_envelopes(bundle.section("envelopes"))
        layout = bundle.layout
        check_envelopes(manifest, envelopes)
        if layout["payload"][1] != manifest.payload_size:
            raise MalformedError(
                f"payload: manifest says {manifest.payload_size} bytes, "
                f"file holds {layout['payload'][1]}"
            )
        mine = select_envelope(manifest, envelopes, self.identity.device_id)
        keyring, keyring_sig, raw, sig = signed
        offer = ReleaseOffer(
            keyring=keyring, keyring_sig=keyring_sig, manifest=raw, signature=sig, envelope=mine
        )
        source = FileSource(path, layout["payload"][0])
        try:
            return self._install_verified(manifest, offer, source, progress)
        finally:
            source.close()
