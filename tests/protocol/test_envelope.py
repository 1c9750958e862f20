"""protocol.envelope and protocol.keys: HPKE key envelopes (X25519 and ML-KEM-768+X25519)."""

from __future__ import annotations

import secrets

import pytest
from edgefleet.protocol.device import DevicePublic
from edgefleet.protocol.envelope import MAX_ENVELOPE, Envelope, unwrap_key, wrap_key
from edgefleet.protocol.errors import DecodeError, DecryptError, SignatureError
from edgefleet.protocol.keys import (
    KEM_HYBRID,
    KEM_X25519,
    KemPrivateKey,
    KemPublicKey,
    SigningKey,
    decode_public_key,
    encode_public_key,
    generate_kem_key,
    key_id,
    verify_signature,
)

BUNDLE = "ab" * 16
OTHER_BUNDLE = "cd" * 16
KEMS = [KEM_X25519, KEM_HYBRID]


@pytest.fixture(scope="module", params=KEMS)
def device(request: pytest.FixtureRequest) -> KemPrivateKey:
    return generate_kem_key(request.param)


@pytest.fixture(scope="module")
def content_key() -> bytes:
    return secrets.token_bytes(32)


@pytest.fixture(scope="module")
def envelope(device: KemPrivateKey, content_key: bytes) -> Envelope:
    return wrap_key(content_key, device.public(), bundle_id=BUNDLE, device_id="dev-a")


def test_round_trip(device: KemPrivateKey, envelope: Envelope, content_key: bytes) -> None:
    assert envelope.kem == device.kem
    assert unwrap_key(envelope, device, bundle_id=BUNDLE) == content_key
    again = Envelope.from_dict(envelope.to_dict())
    assert again == envelope and again.digest == envelope.digest


def test_envelopes_are_fresh(device: KemPrivateKey, content_key: bytes, envelope: Envelope) -> None:
    other = wrap_key(content_key, device.public(), bundle_id=BUNDLE, device_id="dev-a")
    assert other.sealed != envelope.sealed


@pytest.mark.parametrize("attack", ["wrong-device-key", "other-bundle", "renamed-device",
                                    "flipped-byte", "truncated", "kem-mismatch"])
def test_unwrap_fails(attack: str, device: KemPrivateKey, envelope: Envelope) -> None:
    key, bundle, env = device, BUNDLE, envelope
    if attack == "wrong-device-key":
        key = generate_kem_key(device.kem)
    elif attack == "other-bundle":
        bundle = OTHER_BUNDLE
    elif attack == "renamed-device":
        env = Envelope(device_id="dev-b", kem=env.kem, sealed=env.sealed)
    elif attack == "flipped-byte":
        env = Envelope(device_id=env.device_id, kem=env.kem,
                       sealed=env.sealed[:-1] + bytes([env.sealed[-1] ^ 1]))
    elif attack == "truncated":
        env = Envelope(device_id=env.device_id, kem=env.kem, sealed=env.sealed[:20])
    else:
        key = generate_kem_key(KEM_X25519 if device.kem == KEM_HYBRID else KEM_HYBRID)
    with pytest.raises(DecryptError):
        unwrap_key(env, key, bundle_id=bundle)


def test_wrap_needs_a_32_byte_key(device: KemPrivateKey) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        wrap_key(bytes(16), device.public(), bundle_id=BUNDLE, device_id="d")


@pytest.mark.parametrize(("d", "match"), [
    ("x", "expected an object"),
    ({"device_id": "d", "kem": "x25519"}, "expected an object"),
    ({"device_id": "d", "kem": "x25519", "sealed": "AA==", "extra": 1}, "expected an object"),
    ({"device_id": 1, "kem": "x25519", "sealed": "AA=="}, "must be strings"),
    ({"device_id": "d", "kem": "rsa", "sealed": "AA=="}, "KEM"),
    ({"device_id": "d", "kem": "x25519", "sealed": ""}, "1..4096 bytes"),
    ({"device_id": "d", "kem": "x25519", "sealed": "A"}, "base64"),
    ({"device_id": "d", "kem": "x25519", "sealed": "A" * (MAX_ENVELOPE * 2)}, "at most"),
])
def test_envelope_decode_errors(d: object, match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        Envelope.from_dict(d)


@pytest.mark.parametrize("kem", KEMS)
def test_kem_key_sizes_and_public_round_trip(kem: str) -> None:
    private = generate_kem_key(kem)
    assert len(private.raw) == {KEM_X25519: 32, KEM_HYBRID: 96}[kem]
    assert len(private.public().raw) == {KEM_X25519: 32, KEM_HYBRID: 1216}[kem]
    assert KemPrivateKey(kem, private.raw).public() == private.public()


@pytest.mark.parametrize(("make", "error"), [
    (lambda: KemPublicKey(KEM_X25519, bytes(31)), DecodeError),
    (lambda: KemPublicKey(KEM_HYBRID, bytes(32)), DecodeError),
    (lambda: KemPublicKey("rsa", bytes(32)), DecodeError),
    (lambda: KemPrivateKey(KEM_X25519, bytes(33)), ValueError),
    (lambda: KemPrivateKey("rsa", bytes(32)), ValueError),
    (lambda: generate_kem_key("rsa"), ValueError),
    (lambda: SigningKey.from_raw(bytes(31)), ValueError),
])
def test_bad_key_material(make: object, error: type[Exception]) -> None:
    with pytest.raises(error) as info:
        make()  # type: ignore[operator]
    assert type(info.value) is error


def test_signatures() -> None:
    key = SigningKey.generate()
    sig = key.sign(b"data")
    verify_signature(key.public_raw, sig, b"data", what="t")
    assert key.keyid == key_id(key.public_raw) and len(key.keyid) == 32
    other = SigningKey.generate().public_raw
    for pub, s, data in [(key.public_raw, sig, b"Data"), (key.public_raw, sig[:-1], b"data"),
                         (other, sig, b"data"), (bytes(3), sig, b"data")]:
        with pytest.raises(SignatureError):
            verify_signature(pub, s, data, what="t")


def test_public_key_file() -> None:
    key = SigningKey.generate()
    assert decode_public_key(encode_public_key(key.public_raw)) == key.public_raw
    other = SigningKey.generate()
    forged = encode_public_key(key.public_raw).replace(key.keyid.encode(), other.keyid.encode())
    for bad in (forged, b'{"type":"rsa"}', b"[]"):
        with pytest.raises(DecodeError):
            decode_public_key(bad)


def test_device_public_round_trip(device: KemPrivateKey) -> None:
    pub = DevicePublic(device_id="dev-a", sign_public=SigningKey.generate().public_raw,
                       kem=device.public())
    assert DevicePublic.decode(pub.encode()) == pub
    with pytest.raises(DecodeError):
        DevicePublic.decode(pub.encode().replace(b"device-public", b"device-secret"))
