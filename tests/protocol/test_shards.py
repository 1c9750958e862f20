"""Manifests signed per shard of targets: an offer's size does not grow with the fleet, every
device verifies its own shard exactly as before, and no shard serves another shard's device.

Pure: keys and releases built in memory with ``protocol.build`` (real X25519, real Ed25519).
"""

from __future__ import annotations

import pytest
from edgefleet.protocol.build import SHARD_TARGETS, BuiltRelease, ReleaseSpec, build_release
from edgefleet.protocol.envelope import unwrap_key
from edgefleet.protocol.errors import IntegrityError, NotForMeError
from edgefleet.protocol.keyring import KeyEntry, Keyring, Signature
from edgefleet.protocol.keys import KemPrivateKey, SigningKey, generate_kem_key
from edgefleet.protocol.manifest import MAX_TARGETS, TensorSpec
from edgefleet.protocol.messages import ReleaseOffer
from edgefleet.protocol.verify import (
    check_envelopes,
    select_envelope,
    verify_keyring,
    verify_manifest,
)

T0 = 1_700_000_000
MODEL = bytes(range(256)) * 20  # five 1 KiB segments
SPEC = (TensorSpec(name="x", dtype="float32", shape=(None, 4)),)
FLEET = 2_000
ROOT, RELEASE = SigningKey.generate(), SigningKey.generate()


def _sign(key: SigningKey, raw: bytes) -> bytes:
    return Signature(keyid=key.keyid, sig=key.sign(raw)).encode()


KEYRING_RAW = Keyring(version=1, expires=T0 + 86400, root_keyid=ROOT.keyid,
                      keys=(KeyEntry(keyid=RELEASE.keyid, public=RELEASE.public_raw,
                                     expires=T0 + 86400),)).encode()  # fmt: skip
KEYRING_SIG = _sign(ROOT, KEYRING_RAW)


@pytest.fixture(scope="module")
def devices() -> dict[str, KemPrivateKey]:
    return {f"dev-{i:05d}": generate_kem_key("x25519") for i in range(FLEET)}


def build(devices: dict[str, KemPrivateKey], n: int, **kw: int) -> BuiltRelease:
    spec = ReleaseSpec(name="m", format="onnx", model_version="1", sequence=7, inputs=SPEC,
                       outputs=SPEC, created=T0, segment_size=1024)  # fmt: skip
    to = dict(list(devices.items())[:n])
    return build_release(MODEL, spec, release_key=RELEASE,
                         recipients={d: k.public() for d, k in to.items()}, **kw)  # fmt: skip


def offer(built: BuiltRelease, device: str) -> bytes:
    shard = built.shard_for(device)
    return ReleaseOffer(keyring=KEYRING_RAW, keyring_sig=KEYRING_SIG, manifest=shard.raw,
                        signature=shard.signature,
                        envelope=built.envelope_for(device)).encode()  # fmt: skip


def largest_offer(built: BuiltRelease) -> int:
    return max(len(offer(built, e.device_id)) for e in built.envelopes)


def test_offer_bytes_do_not_grow_with_the_fleet(devices: dict[str, KemPrivateKey]) -> None:
    sizes = {n: largest_offer(build(devices, n)) for n in (10, 2 * SHARD_TARGETS, FLEET)}
    assert sizes[FLEET] == sizes[2 * SHARD_TARGETS]  # a full shard, whatever the fleet
    assert sizes[10] < sizes[FLEET]  # a shard of 10 names fewer devices
    one = build(devices, FLEET, shard_size=MAX_TARGETS)  # one manifest, as before sharding
    assert len(offer(one, "dev-00000")) > 20 * sizes[FLEET]


def test_every_device_of_a_large_release_verifies_its_own_shard(
    devices: dict[str, KemPrivateKey],
) -> None:
    built = build(devices, FLEET)
    assert len(built.shards) == -(-FLEET // SHARD_TARGETS)
    assert [len(s.manifest.targets) for s in built.shards[:-1]] == [SHARD_TARGETS] * (
        len(built.shards) - 1)  # fmt: skip
    keyring = verify_keyring(ROOT.public_raw, KEYRING_RAW, KEYRING_SIG, now=T0, current=None)
    named = []
    for shard in built.shards:  # the same release in every shard but for its targets
        assert shard.manifest.bundle_id == built.manifest.bundle_id
        assert shard.manifest.segment_hashes == built.manifest.segment_hashes
        assert shard.manifest.sequence == 7
        named += shard.manifest.targets
    assert sorted(named) == sorted(devices)  # each device in exactly one shard
    keys = set()
    for dev, private in devices.items():
        got = ReleaseOffer.decode(offer(built, dev))
        m = verify_manifest(keyring, got.manifest, got.signature, now=T0, device_id=dev,
                            highest_sequence=0)  # fmt: skip
        check_envelopes(m, [got.envelope])
        env = select_envelope(m, [got.envelope], dev)
        keys.add(unwrap_key(env, private, bundle_id=m.bundle_id))
    assert keys == {built.content_key}


def test_another_shards_manifest_is_refused_with_a_devices_envelope(
    devices: dict[str, KemPrivateKey],
) -> None:
    built = build(devices, 5, shard_size=2)  # dev-0,1 | dev-2,3 | dev-4
    keyring = verify_keyring(ROOT.public_raw, KEYRING_RAW, KEYRING_SIG, now=T0, current=None)
    mine, other = built.shard_for("dev-00000"), built.shard_for("dev-00004")
    assert mine != other
    with pytest.raises(NotForMeError, match="dev-00000"):  # genuine signature, not its shard
        verify_manifest(keyring, other.raw, other.signature, now=T0, device_id="dev-00000",
                        highest_sequence=0)  # fmt: skip
    with pytest.raises(IntegrityError, match="not a target"):  # an envelope it does not name
        check_envelopes(other.manifest, [built.envelope_for("dev-00000")])
    with pytest.raises(KeyError):
        built.shard_for("dev-00009")


def test_a_side_load_bundle_needs_one_shard(devices: dict[str, KemPrivateKey]) -> None:
    assert build(devices, 2).to_file_bytes(KEYRING_RAW, KEYRING_SIG)  # one shard: as before
    with pytest.raises(ValueError, match="5 devices in 3 signed manifests; a side-load"):
        build(devices, 5, shard_size=2).to_file_bytes(KEYRING_RAW, KEYRING_SIG)
    with pytest.raises(ValueError, match="shard size: expected 1..10000"):
        build(devices, 2, shard_size=0)
