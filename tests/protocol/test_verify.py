"""protocol.keyring and protocol.verify: keyrings, rotation, and the manifest checks in order.

Pure: keys, keyrings and releases are built in memory with ``protocol.build``; no files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

import pytest
from edgefleet.protocol.build import BuiltRelease, ReleaseSpec, build_release, rewrap
from edgefleet.protocol.canonical import canonical_json
from edgefleet.protocol.envelope import Envelope, unwrap_key
from edgefleet.protocol.errors import (
    BundleError,
    DecodeError,
    ExpiredError,
    IntegrityError,
    KeyringError,
    NotForMeError,
    RollbackError,
    SignatureError,
    TooLargeError,
    UntrustedSignerError,
)
from edgefleet.protocol.keyring import MAX_KEYRING, KeyEntry, Keyring, Signature
from edgefleet.protocol.keys import KemPrivateKey, SigningKey, generate_kem_key
from edgefleet.protocol.manifest import MAX_MANIFEST, Manifest, TensorSpec
from edgefleet.protocol.segments import SegmentCipher
from edgefleet.protocol.verify import (
    Policy,
    check_envelopes,
    select_envelope,
    verify_keyring,
    verify_manifest,
)

T0 = 1_700_000_000
DAY = 24 * 3600
MODEL = bytes(range(256)) * 20  # 5120 bytes: five 1 KiB segments
SPEC = (TensorSpec(name="x", dtype="float32", shape=(None, 4)),)


def sign(key: SigningKey, raw: bytes) -> bytes:
    return Signature(keyid=key.keyid, sig=key.sign(raw)).encode()


@dataclass
class Kit:
    root: SigningKey
    release: SigningKey
    devices: dict[str, KemPrivateKey]

    def keyring(self, version: int = 1, *, expires: int = T0 + 365 * DAY,
                keys: tuple[SigningKey, ...] | None = None, key_expires: int | None = None,
                signer: SigningKey | None = None) -> tuple[bytes, bytes]:
        entries = tuple(KeyEntry(keyid=k.keyid, public=k.public_raw,
                                 expires=key_expires or expires) for k in keys or (self.release,))
        raw = Keyring(version=version, expires=expires, root_keyid=self.root.keyid,
                      keys=entries).encode()
        return raw, sign(signer or self.root, raw)

    def trusted(self, **kw: Any) -> Keyring:
        return verify_keyring(self.root.public_raw, *self.keyring(**kw), now=T0, current=None)

    def build(self, *, sequence: int = 5, ttl: int = 30 * DAY, key: SigningKey | None = None,
              to: tuple[str, ...] = ("dev-a", "dev-b")) -> BuiltRelease:
        spec = ReleaseSpec(name="m", format="onnx", model_version="1", sequence=sequence,
                           inputs=SPEC, outputs=SPEC, created=T0, ttl=ttl, segment_size=1024)
        return build_release(MODEL, spec, release_key=key or self.release,
                             recipients={d: self.devices[d].public() for d in to})


@pytest.fixture(scope="module")
def kit() -> Kit:
    return Kit(SigningKey.generate(), SigningKey.generate(),
               {"dev-a": generate_kem_key("x25519"), "dev-b": generate_kem_key("mlkem768-x25519")})


@pytest.fixture(scope="module")
def built(kit: Kit) -> BuiltRelease:
    return kit.build()


# -- keyrings -----------------------------------------------------------------------------------
def test_keyring_round_trip(kit: Kit) -> None:
    raw, _ = kit.keyring(3)
    kr = Keyring.decode(raw)
    assert kr.version == 3 and kr.encode() == raw and kr.keys[0].keyid == kit.release.keyid
    assert kr.release_key(kit.release.keyid, T0).public == kit.release.public_raw


def test_release_key_lookup(kit: Kit) -> None:
    kr = Keyring.decode(kit.keyring(key_expires=T0 + 10)[0])
    with pytest.raises(UntrustedSignerError, match="expired"):
        kr.release_key(kit.release.keyid, T0 + 10)
    with pytest.raises(UntrustedSignerError, match="not in keyring"):
        kr.release_key(kit.root.keyid, T0)


def _keyring_doc(kit: Kit) -> dict[str, Any]:
    return dict(json.loads(kit.keyring()[0]))


@pytest.mark.parametrize(("edit", "match"), [
    (lambda d: d.update(type="manifest"), "expected type 'keyring'"),
    (lambda d: d.update(version=0), "version"),
    (lambda d: d.update(extra=1), "unexpected fields"),
    (lambda d: d.update(keys=d["keys"] * 2), "duplicate key ids"),
    (lambda d: d.update(keys=d["keys"] * 65), "at most 64 keys"),
    (lambda d: d["keys"][0].update(keyid="00" * 16), "does not match"),
    (lambda d: d["keys"][0].update(public="AAAA"), "does not match"),
    (lambda d: d["keys"][0].update(expires="soon"), "expected int"),
    (lambda d: d.update(keys=["x"]), "expected an object"),
])
def test_keyring_decode_errors(kit: Kit, edit: Any, match: str) -> None:
    d = _keyring_doc(kit)
    edit(d)
    with pytest.raises(DecodeError, match=match):
        Keyring.decode(canonical_json(d))


@pytest.mark.parametrize(("raw", "match"), [
    (b'{"keyid":"k","sig":"AAAA"}', "64 bytes"),
    (b'{"keyid":"k"}', "base64"),
    (b'{"keyid":1,"sig":""}', "expected str"),
    (b'{"keyid":"k","sig":"","x":1}', "unexpected"),
])
def test_signature_decode_errors(raw: bytes, match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        Signature.decode(raw)


def test_newer_keyring_is_adopted_older_ignored(kit: Kit) -> None:
    v1, v2 = kit.trusted(version=1), kit.trusted(version=2)
    assert verify_keyring(kit.root.public_raw, *kit.keyring(2), now=T0, current=v1) == v2
    assert verify_keyring(kit.root.public_raw, *kit.keyring(1), now=T0, current=v2) is v2
    # an older genuine keyring is ignored even when it has expired
    old = kit.keyring(1, expires=T0 - 1)
    assert verify_keyring(kit.root.public_raw, *old, now=T0, current=v2) is v2


def _other_key(kit: Kit) -> tuple[bytes, bytes]:
    return kit.keyring(2, keys=(SigningKey.generate(),))


KEYRING_BAD = [
    ("expired", lambda k: k.keyring(2, expires=T0), KeyringError),
    ("same-version-other-content", _other_key, KeyringError),
    ("bad-signature", lambda k: (k.keyring(2)[0] + b" ", k.keyring(2)[1]), KeyringError),
    ("signed-by-release-key", lambda k: k.keyring(2, signer=k.release), UntrustedSignerError),
    ("names-another-root", lambda k: _names_other_root(k), KeyringError),
    ("signature-not-json", lambda k: (k.keyring(2)[0], b"sig"), DecodeError),
    ("too-large", lambda k: (b" " * (MAX_KEYRING + 1), k.keyring(2)[1]), TooLargeError),
]


def _names_other_root(kit: Kit) -> tuple[bytes, bytes]:
    d = _keyring_doc(kit)
    d.update(version=2, root_keyid=kit.release.keyid)
    raw = canonical_json(d)
    return raw, sign(kit.root, raw)


@pytest.mark.parametrize(("make", "error"), [(m, e) for _, m, e in KEYRING_BAD],
                         ids=[i for i, _, _ in KEYRING_BAD])
def test_keyring_rejected(kit: Kit, make: Any, error: type[BundleError]) -> None:
    current = kit.trusted(version=2)
    with pytest.raises(BundleError) as info:
        verify_keyring(kit.root.public_raw, *make(kit), now=T0, current=current)
    assert type(info.value) is error


# -- manifests ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Check:
    id: str
    error: type[BundleError] | None
    raw: Any = None  # (kit, built) -> (manifest bytes, signature bytes)
    keyring: dict[str, Any] | None = None
    now: int = T0 + 1
    device: str = "dev-a"
    highest: int = 4
    grace: int = 0


def _resign(raw: bytes) -> Any:
    return lambda k, b: (raw, sign(k.release, raw))


def _edited(edit: Any) -> Any:
    def make(k: Kit, b: BuiltRelease) -> tuple[bytes, bytes]:
        d = json.loads(b.manifest_raw)
        edit(d)
        raw = canonical_json(d)
        return raw, sign(k.release, raw)
    return make


EXPIRES = T0 + 30 * DAY
CHECKS = [
    Check("valid", None),
    Check("valid-within-grace", None, now=EXPIRES + 10, grace=10),
    Check("valid-hybrid-device", None, device="dev-b"),
    Check("too-large", TooLargeError, lambda k, b: (b" " * (MAX_MANIFEST + 1), b.signature_raw)),
    Check("keyring-expired", KeyringError, now=T0 + 365 * DAY),
    Check("signer-not-in-keyring", UntrustedSignerError,
          lambda k, b: (b.manifest_raw, sign(SigningKey.generate(), b.manifest_raw))),
    Check("signer-revoked", UntrustedSignerError, keyring={"keys": (SigningKey.generate(),)}),
    Check("signer-expired", UntrustedSignerError, keyring={"key_expires": T0 + 1}),
    Check("bad-signature", SignatureError, lambda k, b: (b.manifest_raw + b" ", b.signature_raw)),
    Check("signed-by-root", UntrustedSignerError,
          lambda k, b: (b.manifest_raw, sign(k.root, b.manifest_raw))),
    Check("signature-garbage", DecodeError, lambda k, b: (b.manifest_raw, b"\x00")),
    Check("signed-garbage", DecodeError, _resign(b"garbage")),
    Check("signed-wrong-fields", DecodeError, _edited(lambda d: d.pop("targets"))),
    Check("replay-equal", RollbackError, highest=5),
    Check("replay-older", RollbackError, highest=9),
    Check("expired", ExpiredError, now=EXPIRES + 1),
    Check("expired-beyond-grace", ExpiredError, now=EXPIRES + 11, grace=10),
    Check("not-a-target", NotForMeError, device="dev-c"),
    # order: the signature is checked before decoding, the sequence before expiry
    Check("unsigned-garbage", UntrustedSignerError,
          lambda k, b: (b"garbage", sign(SigningKey.generate(), b"garbage"))),
    Check("replayed-and-expired", RollbackError, now=EXPIRES + 1, highest=5),
    Check("expired-and-not-a-target", ExpiredError, now=EXPIRES + 1, device="dev-c"),
]


@pytest.mark.parametrize("c", CHECKS, ids=[c.id for c in CHECKS])
def test_verify_manifest(kit: Kit, built: BuiltRelease, c: Check) -> None:
    keyring = kit.trusted(**(c.keyring or {}))
    raw, sig = c.raw(kit, built) if c.raw else (built.manifest_raw, built.signature_raw)

    def run() -> Manifest:
        return verify_manifest(keyring, raw, sig, now=c.now, device_id=c.device,
                               highest_sequence=c.highest, policy=Policy(offline_grace=c.grace))

    if c.error is None:
        assert run() == built.manifest
        return
    with pytest.raises(BundleError) as info:
        run()
    assert type(info.value) is c.error, info.value


def test_select_and_check_envelopes(kit: Kit, built: BuiltRelease) -> None:
    m = built.manifest
    mine = select_envelope(m, built.envelopes, "dev-a")
    assert mine.device_id == "dev-a"
    check_envelopes(m, built.envelopes)
    other = kit.build().envelope_for("dev-a")  # the same device's envelope of another release
    with pytest.raises(IntegrityError, match="digest"):
        select_envelope(m, [other], "dev-a")
    with pytest.raises(NotForMeError):
        select_envelope(m, [built.envelope_for("dev-b")], "dev-a")
    with pytest.raises(IntegrityError, match="digest"):
        check_envelopes(m, [other])
    stray = Envelope(device_id="dev-c", kem="x25519", sealed=other.sealed)
    with pytest.raises(IntegrityError, match="not a target"):
        check_envelopes(m, [*built.envelopes, stray])


def test_built_release_decrypts_for_every_recipient(kit: Kit, built: BuiltRelease) -> None:
    m = built.manifest
    assert m.plaintext_size == len(MODEL) and m.segments == 5
    assert len(built.payload) == m.payload_size
    for dev, private in kit.devices.items():
        key = unwrap_key(built.envelope_for(dev), private, bundle_id=m.bundle_id)
        assert key == built.content_key
        cipher = SegmentCipher(key, bytes.fromhex(m.bundle_id), m.segment_size)
        plain = b"".join(cipher.open(i, s, final=i == m.segments - 1)
                         for i, s in enumerate(built.segments))
        assert plain == MODEL
    [again] = rewrap(built.content_key, m.bundle_id, [("dev-a", kit.devices["dev-a"].public())])
    assert unwrap_key(again, kit.devices["dev-a"], bundle_id=m.bundle_id) == built.content_key
    with pytest.raises(KeyError):
        built.envelope_for("dev-c")


def test_every_build_has_a_fresh_bundle_id_and_key(kit: Kit, built: BuiltRelease) -> None:
    again = kit.build()
    assert again.manifest.bundle_id != built.manifest.bundle_id
    assert again.content_key != built.content_key and again.payload != built.payload
    assert replace(again.manifest, bundle_id=built.manifest.bundle_id,
                   targets=built.manifest.targets, segment_hashes=built.manifest.segment_hashes
                   ) == built.manifest


def test_build_needs_recipients(kit: Kit) -> None:
    with pytest.raises(ValueError, match="recipient"):
        kit.build(to=())
