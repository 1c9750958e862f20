"""The tamper corpus: every corrupted or unacceptable ``.efb`` is rejected with its own error,
and the device keeps its active model, its predictions and its on-disk state.

Every case starts from dev-a with release ``v1`` (sequence 2) active and tries a variant of
release ``v2`` (sequence 3). A hypothesis test then flips single bytes anywhere in the file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from edgefleet.agent.agent import Agent
from edgefleet.coordinator.keys import YEAR, sign_keyring
from edgefleet.protocol.canonical import canonical_json
from edgefleet.protocol.container import (
    HEADER_SIZE,
    MAGIC,
    decode_envelopes,
    encode_header,
    parse_header,
)
from edgefleet.protocol.errors import (
    BundleError,
    DecodeError,
    ExpiredError,
    IntegrityError,
    KeyringError,
    MalformedError,
    ModelLoadError,
    NotForMeError,
    RollbackError,
    SignatureError,
    SmokeTestError,
    TooLargeError,
    UntrustedSignerError,
)
from edgefleet.protocol.keyring import KeyEntry, Keyring, Signature
from edgefleet.protocol.keys import SigningKey
from edgefleet.protocol.manifest import MAX_MANIFEST, Manifest, SmokeVector
from edgefleet.protocol.messages import ReleaseOffer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import NOW, T0, Fleet, open_agent

SECTIONS = ("keyring", "keyring_sig", "manifest", "signature", "envelopes", "payload")
GRACE = 7 * 24 * 3600  # seconds: AgentConfig.offline_grace default
MANIFEST_EXPIRY = T0 + 30 * 24 * 3600  # CoordinatorConfig.manifest_ttl default
B64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


# -- byte surgery on a bundle file --------------------------------------------------------------
def split_sections(data: bytes) -> dict[str, bytes]:
    layout = parse_header(data[:HEADER_SIZE], file_size=len(data), max_payload=1 << 40)
    return {n: data[layout[n][0]: layout[n][0] + layout[n][1]] for n in SECTIONS}


def assemble(**parts: bytes) -> bytes:
    head = encode_header(**{n: len(parts[n]) for n in SECTIONS})
    return head + b"".join(parts[n] for n in SECTIONS)


def with_section(data: bytes, name: str, value: bytes) -> bytes:
    return assemble(**{**split_sections(data), name: value})


def section_offset(data: bytes, name: str) -> int:
    return parse_header(data[:HEADER_SIZE], file_size=len(data), max_payload=1 << 40)[name][0]


def xor(data: bytes, offset: int, mask: int = 0x01) -> bytes:
    out = bytearray(data)
    out[offset] ^= mask
    return bytes(out)


def other_b64(c: int) -> int:
    """A different, valid base64 character with the same low bits unused (so decoding works)."""
    return B64[(B64.index(c) + 16) % 64]


def poke_in(data: bytes, name: str, anchor: bytes, skip: int, new: Callable[[int], int]) -> bytes:
    """Replace the byte ``skip`` bytes after ``anchor`` inside section ``name``."""
    sec = split_sections(data)[name]
    at = section_offset(data, name) + sec.index(anchor) + len(anchor) + skip
    out = bytearray(data)
    out[at] = new(out[at])
    assert out[at] != data[at]
    return bytes(out)


def next_hex(c: int) -> int:
    return ord("0") if c != ord("0") else ord("1")


def manifest_of(data: bytes) -> Manifest:
    return Manifest.decode(split_sections(data)["manifest"])


def payload_byte(data: bytes, segment: int, where: str = "first") -> int:
    off, length = manifest_of(data).segment_span(segment)
    base = section_offset(data, "payload") + off
    return {"first": base, "middle": base + length // 2, "last": base + length - 1}[where]


def resigned(fleet: Fleet, data: bytes, manifest_raw: bytes) -> bytes:
    """``data`` with its manifest replaced by ``manifest_raw``, signed by the real release key."""
    sig = Signature(keyid=fleet.release_key.keyid, sig=fleet.release_key.sign(manifest_raw))
    return with_section(with_section(data, "manifest", manifest_raw), "signature", sig.encode())


def edited_manifest(fleet: Fleet, data: bytes, edit: Callable[[dict[str, Any]], None]) -> bytes:
    d = json.loads(split_sections(data)["manifest"])
    edit(d)
    return resigned(fleet, data, canonical_json(d))


def keyring_v2(fleet: Fleet, *keys: KeyEntry, expires: int = T0 + YEAR) -> tuple[bytes, bytes]:
    root = fleet.root_key()
    return sign_keyring(root, Keyring(version=2, expires=expires, root_keyid=root.keyid,
                                      keys=keys))


def entry(key: SigningKey, expires: int = T0 + YEAR) -> KeyEntry:
    return KeyEntry(keyid=key.keyid, public=key.public_raw, expires=expires)


def with_keyring(data: bytes, keyring: tuple[bytes, bytes]) -> bytes:
    return with_section(with_section(data, "keyring", keyring[0]), "keyring_sig", keyring[1])


def model_bytes(fleet: Fleet) -> bytes:
    return fleet.models["v2"].onnx.read_bytes()


def wrong_smoke(fleet: Fleet) -> SmokeVector:
    smoke = fleet.models["v2"].meta["smoke"]
    wrong = [[1.0 - p for p in row] for row in smoke["probabilities"][:1]]
    return SmokeVector(input=tuple(map(tuple, smoke["x"][:1])), expected=tuple(map(tuple, wrong)))


def swap_segments(data: bytes) -> bytes:
    m = manifest_of(data)
    (o0, n0), (o1, n1) = m.segment_span(0), m.segment_span(1)
    payload = split_sections(data)["payload"]
    seg0, seg1 = payload[o0:o0 + n0], payload[o1:o1 + n1]
    return with_section(data, "payload", seg1 + seg0 + payload[o1 + n1:])


def drop_envelope(data: bytes, device: str) -> bytes:
    env = json.loads(split_sections(data)["envelopes"])
    env["envelopes"] = [e for e in env["envelopes"] if e["device_id"] != device]
    return with_section(data, "envelopes", canonical_json(env))


def foreign_envelope(fleet: Fleet, data: bytes) -> bytes:
    """dev-a's envelope of release v1 placed into release v2 (an envelope for another bundle)."""
    mine = json.loads(split_sections(fleet.bundle_bytes("v1"))["envelopes"])["envelopes"]
    env = json.loads(split_sections(data)["envelopes"])
    env["envelopes"] = [next(e for e in mine if e["device_id"] == "dev-a") if e["device_id"] ==
                        "dev-a" else e for e in env["envelopes"]]
    return with_section(data, "envelopes", canonical_json(env))


def shorter_payload(data: bytes) -> bytes:
    """The final segment cut short, with a header that agrees (so only the manifest disagrees)."""
    return with_section(data, "payload", split_sections(data)["payload"][:-1])


def b64_padding_bits(data: bytes) -> bytes:
    """Set the unused low bits of the signature's last base64 digit: same bytes, other text."""
    sig = split_sections(data)["signature"]
    end = sig.index(b'=="')  # 64 bytes -> 86 digits + "==", the last digit carries 2 bits
    at = section_offset(data, "signature") + end - 1
    out = bytearray(data)
    out[at] = B64[B64.index(out[at]) | 0x0F]
    assert out[at] != data[at]
    return bytes(out)


# -- the corpus ---------------------------------------------------------------------------------
Make = Callable[[Fleet, bytes], bytes]


@dataclass(frozen=True)
class Case:
    id: str
    make: Make
    error: type[BundleError]
    now: int = NOW
    config: dict[str, Any] = field(default_factory=dict)
    setup: Callable[[Fleet, Agent], None] | None = None


def _accept_keyring_without_old_key(fleet: Fleet, agent: Agent) -> None:
    raw, sig = keyring_v2(fleet, entry(SigningKey.generate()))
    assert agent.trust.accept(raw, sig, now=NOW).version == 2


CASES = [
    # the fixed-size header
    Case("magic", lambda f, d: xor(d, 0), MalformedError),
    Case("header-keyring-length", lambda f, d: xor(d, len(MAGIC) + 3), MalformedError),
    Case("header-payload-length-huge", lambda f, d: xor(d, len(MAGIC) + 22, 0x10), TooLargeError),
    # keyring and its root signature
    Case("keyring-first-byte", lambda f, d: xor(d, section_offset(d, "keyring")), KeyringError),
    Case("keyring-key-bytes", lambda f, d: poke_in(d, "keyring", b'"public":"', 5, other_b64),
         KeyringError),
    Case("keyring-sig-bytes", lambda f, d: poke_in(d, "keyring_sig", b'"sig":"', 20, other_b64),
         KeyringError),
    Case("keyring-sig-keyid", lambda f, d: poke_in(d, "keyring_sig", b'"keyid":"', 3, next_hex),
         UntrustedSignerError),
    Case("keyring-sig-json", lambda f, d: xor(d, section_offset(d, "keyring_sig")), DecodeError),
    Case("keyring-signed-by-non-root",
         lambda f, d: with_keyring(d, sign_keyring(SigningKey.generate(),
                                                   f.coordinator.keys.keyring)),
         UntrustedSignerError),
    # manifest and its signature
    Case("manifest-first-byte", lambda f, d: xor(d, section_offset(d, "manifest")), SignatureError),
    Case("manifest-sequence", lambda f, d: poke_in(d, "manifest", b'"sequence":', 0,
                                                   lambda c: c + 1), SignatureError),
    Case("manifest-last-byte", lambda f, d: xor(d, section_offset(d, "signature") - 1),
         SignatureError),
    Case("signature-bytes", lambda f, d: poke_in(d, "signature", b'"sig":"', 40, other_b64),
         SignatureError),
    Case("signature-padding-bits", lambda f, d: b64_padding_bits(d), DecodeError),
    Case("signature-keyid", lambda f, d: poke_in(d, "signature", b'"keyid":"', 0, next_hex),
         UntrustedSignerError),
    Case("signature-json", lambda f, d: xor(d, section_offset(d, "manifest") + len(
        split_sections(d)["manifest"]) + 2, 0x20), DecodeError),
    # envelopes
    Case("envelope-sealed", lambda f, d: poke_in(
        d, "envelopes", b'"dev-a","kem":"x25519","sealed":"', 30, other_b64), IntegrityError),
    Case("envelope-other-device", lambda f, d: poke_in(d, "envelopes", b'"dev-b","kem":', 40,
                                                       other_b64), IntegrityError),
    Case("envelopes-json", lambda f, d: xor(d, section_offset(d, "envelopes")), DecodeError),
    Case("envelope-missing", lambda f, d: drop_envelope(d, "dev-a"), NotForMeError),
    Case("envelope-of-another-bundle", foreign_envelope, IntegrityError),
    # payload segments
    Case("segment-0", lambda f, d: xor(d, payload_byte(d, 0)), IntegrityError),
    Case("segment-middle", lambda f, d: xor(d, payload_byte(d, 20, "middle")), IntegrityError),
    Case("segment-last-tag", lambda f, d: xor(d, len(d) - 1), IntegrityError),
    Case("segments-swapped", lambda f, d: swap_segments(d), IntegrityError),
    Case("payload-short-consistent-header", lambda f, d: shorter_payload(d), MalformedError),
    # framing
    Case("truncated", lambda f, d: d[:-1], MalformedError),
    Case("truncated-in-header", lambda f, d: d[: HEADER_SIZE - 1], MalformedError),
    Case("empty-file", lambda f, d: b"", MalformedError),
    Case("appended-garbage", lambda f, d: d + b"\x00garbage", MalformedError),
    # trust: signer, revocation, expiry, replay, audience
    Case("wrong-signer", lambda f, d: f.release(model_bytes(f), sequence=60,
                                                release_key=SigningKey.generate()),
         UntrustedSignerError),
    Case("revoked-release-key", lambda f, d: d, UntrustedSignerError,
         setup=_accept_keyring_without_old_key),
    Case("expired-release-key",
         lambda f, d: with_keyring(d, keyring_v2(f, entry(f.release_key, expires=NOW - 1))),
         UntrustedSignerError),
    Case("expired-keyring", lambda f, d: d, KeyringError, now=T0 + YEAR),
    Case("replay-older-sequence", lambda f, d: f.bundle_bytes("old"), RollbackError),
    Case("replay-equal-sequence", lambda f, d: f.release(model_bytes(f), sequence=2),
         RollbackError),  # v1's sequence, another bundle (the v1 bundle itself is "current")
    Case("expired-manifest", lambda f, d: d, ExpiredError,
         now=MANIFEST_EXPIRY + GRACE + 1),
    Case("expired-manifest-no-grace", lambda f, d: d, ExpiredError,
         now=MANIFEST_EXPIRY + 1, config={"offline_grace": 0}),
    Case("not-for-this-device", lambda f, d: f.bundle_bytes("other"), NotForMeError),
    # size caps
    Case("manifest-over-cap", lambda f, d: f.release(
        model_bytes(f), sequence=61, lineage={"pad": "x" * MAX_MANIFEST}), TooLargeError),
    Case("payload-over-device-cap", lambda f, d: d, TooLargeError, config={"max_payload": 4096}),
    # validly signed but malformed manifests (signed with the real release key)
    Case("signed-not-json", lambda f, d: resigned(f, d, b"\x00not json\xff"), DecodeError),
    Case("signed-json-array", lambda f, d: resigned(f, d, b"[1,2,3]"), DecodeError),
    Case("signed-nan", lambda f, d: resigned(f, d, b'{"sequence":NaN}'), DecodeError),
    Case("signed-duplicate-key", lambda f, d: resigned(
        f, d, split_sections(d)["manifest"][:-1] + b',"sequence":99}'), DecodeError),
    Case("signed-unknown-field", lambda f, d: edited_manifest(
        f, d, lambda m: m.update(extra=1)), DecodeError),
    Case("signed-missing-field", lambda f, d: edited_manifest(
        f, d, lambda m: m.pop("segment_hashes")), DecodeError),
    Case("signed-wrong-type", lambda f, d: edited_manifest(
        f, d, lambda m: m.update(sequence="3")), DecodeError),
    Case("signed-wrong-schema", lambda f, d: edited_manifest(
        f, d, lambda m: m.update(schema_version=2)), DecodeError),
    Case("signed-wrong-plaintext-hash", lambda f, d: edited_manifest(
        f, d, lambda m: m.update(plaintext_sha256="0" * 64)), IntegrityError),
    Case("signed-wrong-segment-hash", lambda f, d: edited_manifest(
        f, d, lambda m: m["segment_hashes"].__setitem__(-1, "0" * 64)), IntegrityError),
    # validly signed, decrypts, but the model is bad
    Case("smoke-test-mismatch", lambda f, d: f.release(model_bytes(f), sequence=62,
                                                       smoke=[wrong_smoke(f)]), SmokeTestError),
    Case("model-does-not-load", lambda f, d: f.release(b"\x00garbage" * 700, sequence=63),
         ModelLoadError),
    Case("tflite-bytes-as-onnx", lambda f, d: f.release(
        f.models["v3"].tflite.read_bytes(), sequence=64), ModelLoadError),
]


def _snapshot(agent: Agent, home: Path, x: np.ndarray) -> dict[str, Any]:
    store = home / "store"
    return {
        "active": agent.status().active,
        "state": agent.store.state,
        "versions": sorted(p.name for p in (store / "versions").iterdir()),
        "pointer": (store / "ACTIVE.json").read_bytes(),
        "predictions": agent.predict(x),
    }


def _assert_unchanged(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert after["active"] == before["active"]
    assert after["state"] == before["state"]
    assert after["versions"] == before["versions"]
    assert after["pointer"] == before["pointer"]
    np.testing.assert_array_equal(after["predictions"], before["predictions"])


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_tampered_bundle_is_rejected_and_device_keeps_its_model(
        case: Case, fleet: Fleet, tmp_path: Path, x_test: np.ndarray) -> None:
    home = fleet.agent_home(tmp_path / "home", installed=["v1"])
    bundle = tmp_path / "bad.efb"
    bundle.write_bytes(case.make(fleet, fleet.bundle_bytes("v2")))
    agent = open_agent(home, now=case.now, **case.config)
    if case.setup:
        case.setup(fleet, agent)
    before = _snapshot(agent, home, x_test)

    with pytest.raises(BundleError) as info:
        agent.install_file(bundle)

    assert type(info.value) is case.error, f"{type(info.value).__name__}: {info.value}"
    assert agent.last_result() is not None
    assert agent.last_result()["ok"] is False
    assert agent.last_result()["code"] == case.error.code
    _assert_unchanged(before, _snapshot(agent, home, x_test))
    assert not any((home / "store" / "staging").iterdir())
    assert not any((home / "store" / "trash").iterdir())
    agent.close()
    reopened = open_agent(home, now=case.now, **case.config)
    _assert_unchanged(before, _snapshot(reopened, home, x_test))
    np.testing.assert_allclose(reopened.predict(x_test), fleet.expected("v1", x_test), atol=1e-5)
    reopened.close()


def test_every_payload_segment_is_covered(fleet: Fleet, tmp_path: Path,
                                          x_test: np.ndarray) -> None:
    """A flipped byte in any one segment (its first, middle or last byte) is an IntegrityError."""
    home = fleet.agent_home(tmp_path / "home", installed=["v1"])
    agent = open_agent(home)
    before = _snapshot(agent, home, x_test)
    data = fleet.bundle_bytes("v2")
    segments = manifest_of(data).segments
    assert segments >= 30  # 1 KiB segments of a ~40 KB model
    bundle = tmp_path / "bad.efb"
    for i in range(segments):
        for where in ("first", "middle", "last"):
            bundle.write_bytes(xor(data, payload_byte(data, i, where), 0x80))
            with pytest.raises(IntegrityError, match=f"segment {i}:"):
                agent.install_file(bundle)
    _assert_unchanged(before, _snapshot(agent, home, x_test))
    agent.close()


def test_untampered_update_installs(fleet: Fleet, tmp_path: Path, x_test: np.ndarray) -> None:
    """The control: release v2 itself is accepted, and the device then predicts with v2."""
    home = fleet.agent_home(tmp_path / "home", installed=["v1"])
    agent = open_agent(home)
    version = agent.install_file(fleet.bundles["v2"])
    assert version.manifest.sequence == 3 and agent.status().active.version == "2"
    assert agent.last_result()["ok"] is True
    np.testing.assert_allclose(agent.predict(x_test), fleet.expected("v2", x_test), atol=1e-5)
    agent.close()


def test_manifest_expired_but_within_offline_grace_is_accepted(
        fleet: Fleet, tmp_path: Path) -> None:
    home = fleet.agent_home(tmp_path / "home", installed=["v1"])
    agent = open_agent(home, now=MANIFEST_EXPIRY + GRACE)
    assert agent.install_file(fleet.bundles["v2"]).manifest.sequence == 3
    agent.close()


def test_release_signed_by_a_rotated_key_is_accepted(fleet: Fleet, tmp_path: Path) -> None:
    """The counterpart of revocation: a new keyring with a new key, used to sign a release."""
    new_key = SigningKey.generate()
    keyring = keyring_v2(fleet, entry(new_key))
    data = fleet.release(model_bytes(fleet), sequence=70, release_key=new_key, keyring=keyring)
    (tmp_path / "rotated.efb").write_bytes(data)
    home = fleet.agent_home(tmp_path / "home", installed=["v1"])
    agent = open_agent(home)
    assert agent.install_file(tmp_path / "rotated.efb").manifest.sequence == 70
    assert agent.trust.keyring is not None and agent.trust.keyring.version == 2
    agent.close()


def test_network_offer_over_device_cap_is_too_large(fleet: Fleet, tmp_path: Path) -> None:
    """Offers that arrive without a file header hit the same cap in ``Updater.check``."""
    home = fleet.agent_home(tmp_path / "home", installed=["v1"])
    agent = open_agent(home, max_payload=4096)
    parts = split_sections(fleet.bundle_bytes("v2"))
    mine = next(e for e in decode_envelopes(parts["envelopes"]) if e.device_id == "dev-a")
    offer = ReleaseOffer(keyring=parts["keyring"], keyring_sig=parts["keyring_sig"],
                         manifest=parts["manifest"], signature=parts["signature"], envelope=mine)
    with pytest.raises(TooLargeError, match="cap of 4096"):
        agent.updater.check(offer)
    agent.close()


# -- any single flipped byte --------------------------------------------------------------------
@dataclass
class FlipTarget:
    agent: Agent
    home: Path
    data: bytes
    file: Path
    spans: dict[str, tuple[int, int]]
    before: dict[str, Any]


@pytest.fixture(scope="module")
def flip_target(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory,
                x_test: np.ndarray) -> Any:
    work = tmp_path_factory.mktemp("flip")
    home = fleet.agent_home(work / "home", installed=["v1"])
    agent = open_agent(home)
    data = fleet.bundle_bytes("v2")
    layout = parse_header(data[:HEADER_SIZE], file_size=len(data), max_payload=1 << 40)
    spans = {"header": (0, HEADER_SIZE), **{n: layout[n] for n in SECTIONS}}
    yield FlipTarget(agent, home, data, work / "flipped.efb", spans,
                     _snapshot(agent, home, x_test[:50]))
    agent.close()


@st.composite
def flips(draw: st.DrawFn, spans: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """(offset, xor mask): a region first, so the small sections are hit as often as the payload."""
    start, length = spans[draw(st.sampled_from(sorted(spans)))]
    return draw(st.integers(start, start + length - 1)), draw(st.integers(1, 255))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_flipped_byte_is_rejected(flip_target: FlipTarget, x_test: np.ndarray,
                                      data: st.DataObject) -> None:
    t = flip_target
    offset, mask = data.draw(flips(t.spans), label="flip")
    t.file.write_bytes(xor(t.data, offset, mask))
    with pytest.raises(BundleError):
        t.agent.install_file(t.file)
    _assert_unchanged(t.before, _snapshot(t.agent, t.home, x_test[:50]))
