"""The agent's trusted state (pinned root, keyring rotation), identity and configuration."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.identity import DeviceIdentity
from edgefleet.agent.trust import TrustStore
from edgefleet.protocol.canonical import b64d, b64e, canonical_json
from edgefleet.protocol.device import DevicePublic
from edgefleet.protocol.errors import (
    CorruptStateError,
    DecodeError,
    KeyringError,
    StoreError,
    TooLargeError,
    UntrustedSignerError,
)
from edgefleet.protocol.keyring import KeyEntry, Keyring, Signature
from edgefleet.protocol.keys import KEM_HYBRID, KEM_X25519, SigningKey, encode_public_key

T0 = 1_700_000_000


@dataclass
class Root:
    key: SigningKey

    def keyring(self, version: int, *, expires: int = T0 + 1000,
                release: SigningKey | None = None) -> tuple[bytes, bytes]:
        rel = release or SigningKey.generate()
        kr = Keyring(version=version, expires=expires, root_keyid=self.key.keyid,
                     keys=(KeyEntry(keyid=rel.keyid, public=rel.public_raw, expires=expires),))
        raw = kr.encode()
        return raw, Signature(keyid=self.key.keyid, sig=self.key.sign(raw)).encode()


@pytest.fixture
def root() -> Root:
    return Root(SigningKey.generate())


@pytest.fixture
def trust(tmp_path: Path, root: Root) -> TrustStore:
    return TrustStore.pin(tmp_path / "trust", root.key.public_raw)


def stored(trust: TrustStore) -> bytes:
    return (trust.dir / TrustStore.KEYRING).read_bytes()


def test_pin_then_reopen(trust: TrustStore, root: Root) -> None:
    assert trust.root_public == root.key.public_raw and trust.keyring is None
    assert TrustStore(trust.dir).root_public == root.key.public_raw


def test_missing_root_is_a_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no pinned root key"):
        TrustStore(tmp_path)


def test_newer_keyring_is_adopted_and_persisted(trust: TrustStore, root: Root) -> None:
    assert trust.accept(*root.keyring(1), now=T0).version == 1
    assert TrustStore(trust.dir).keyring == trust.keyring
    v2 = root.keyring(2)
    assert trust.accept(*v2, now=T0).version == 2
    reopened = TrustStore(trust.dir)
    assert reopened.keyring is not None and reopened.keyring.version == 2
    assert json.loads(stored(trust))["keyring"]  # the bytes as signed, with their signature


def test_older_genuine_keyring_is_ignored(trust: TrustStore, root: Root) -> None:
    trust.accept(*root.keyring(3), now=T0)
    before = stored(trust)
    kept = trust.accept(*root.keyring(2), now=T0)
    assert kept.version == 3 and trust.keyring == kept
    assert stored(trust) == before


def test_same_version_with_other_content_is_rejected(trust: TrustStore, root: Root) -> None:
    raw, sig = root.keyring(2)
    trust.accept(raw, sig, now=T0)
    assert trust.accept(raw, sig, now=T0).version == 2  # the same keyring again is fine
    before = stored(trust)
    with pytest.raises(KeyringError, match="differs"):
        trust.accept(*root.keyring(2), now=T0)
    assert stored(trust) == before


@pytest.mark.parametrize(("case", "error"), [
    ("expired", KeyringError),
    ("bad-signature", KeyringError),
    ("other-signer", UntrustedSignerError),
    ("garbage-signature", DecodeError),
])
def test_bad_keyring_is_rejected_and_not_persisted(trust: TrustStore, root: Root, case: str,
                                                   error: type[Exception]) -> None:
    raw, sig = root.keyring(1, expires=T0) if case == "expired" else root.keyring(1)
    if case == "bad-signature":
        raw = raw.replace(b'"version":1', b'"version":9')
    elif case == "other-signer":
        other = SigningKey.generate()
        sig = Signature(keyid=other.keyid, sig=other.sign(raw)).encode()
    elif case == "garbage-signature":
        sig = b"{}"
    with pytest.raises(error):
        trust.accept(raw, sig, now=T0)
    assert trust.keyring is None and not (trust.dir / TrustStore.KEYRING).exists()


# -- trusted state read back from disk: re-verified, never a raw exception --------------------
Mutate = Callable[[Path, Root], None]


def edit_stored(change: Callable[[dict[str, str]], None]) -> Mutate:
    """Rewrite keyring.json's JSON fields (as our own writer would, so only ``change`` differs)."""
    def mutate(path: Path, root: Root) -> None:
        doc = json.loads(path.read_bytes())
        change(doc)
        path.write_bytes(canonical_json(doc))
    return mutate


def flip_signature(doc: dict[str, str]) -> None:
    sig = json.loads(b64d(doc["signature"], what="test"))
    raw = bytearray(b64d(sig["sig"], what="test"))
    raw[7] ^= 1
    sig["sig"] = b64e(bytes(raw))
    doc["signature"] = b64e(canonical_json(sig))


def raise_version(doc: dict[str, str]) -> None:  # the bytes change, the signature does not
    raw = b64d(doc["keyring"], what="test").replace(b'"version":3', b'"version":9')
    doc["keyring"] = b64e(raw)


def signed_by_another_root(path: Path, root: Root) -> None:
    raw, sig = Root(SigningKey.generate()).keyring(3)
    path.write_bytes(canonical_json({"keyring": b64e(raw), "signature": b64e(sig)}))


def write(data: bytes) -> Mutate:
    return lambda path, root: path.write_bytes(data)


def truncate(path: Path, root: Root) -> None:
    path.write_bytes(path.read_bytes()[:40])


def make_dir(path: Path, root: Root) -> None:
    path.unlink()
    path.mkdir()


# (case, what happens to keyring.json, the error in ``problem``, its cause, message fragment)
STORED_KEYRING_CASES = [
    ("truncated", truncate, CorruptStateError, DecodeError, "not a stored keyring file"),
    ("empty", write(b""), CorruptStateError, DecodeError, "invalid JSON"),
    ("not-utf8", write(b"\xff\xfe"), CorruptStateError, DecodeError, "UTF-8"),
    ("a-list", write(b"[]"), CorruptStateError, DecodeError, "expected a JSON object"),
    ("huge", write(b" " * 300_000), CorruptStateError, TooLargeError, "at most"),
    ("no-signature", edit_stored(lambda d: d.pop("signature")), CorruptStateError, DecodeError,
     "missing field 'signature'"),
    ("no-keyring", edit_stored(lambda d: d.pop("keyring")), CorruptStateError, DecodeError,
     "missing field 'keyring'"),
    ("keyring-not-base64", edit_stored(lambda d: d.update(keyring="!!")), CorruptStateError,
     DecodeError, "base64"),
    ("signature-garbage", edit_stored(lambda d: d.update(signature=b64e(b"{}"))),
     CorruptStateError, DecodeError, "signature"),
    ("signature-garbage-sig", edit_stored(lambda d: d.update(signature=b64e(b'{"keyid":"x"}'))),
     CorruptStateError, DecodeError, "does not verify against the pinned root"),
    ("signature-tampered", edit_stored(flip_signature), CorruptStateError, KeyringError,
     "does not verify against the pinned root (keyring: signature"),
    ("keyring-tampered", edit_stored(raise_version), CorruptStateError, KeyringError,
     "does not verify against the pinned root (keyring: signature"),
    ("signed-by-another-root", signed_by_another_root, CorruptStateError, UntrustedSignerError,
     "does not verify against the pinned root (keyring: expected root key"),
    ("a-directory", make_dir, StoreError, IsADirectoryError, "Is a directory"),
]


@pytest.mark.parametrize(("case", "mutate", "error", "cause", "match"), STORED_KEYRING_CASES,
                         ids=[c[0] for c in STORED_KEYRING_CASES])
def test_stored_keyring_that_fails_reverification_is_not_trusted(
    trust: TrustStore, root: Root, caplog: pytest.LogCaptureFixture, case: str, mutate: Mutate,
    error: type[Exception], cause: type[Exception], match: str,
) -> None:
    trust.accept(*root.keyring(3), now=T0)
    path = trust.dir / TrustStore.KEYRING
    mutate(path, root)
    with caplog.at_level(logging.WARNING, logger="edgefleet.agent.trust"):
        reopened = TrustStore(trust.dir)  # never fatal: the device keeps working from the root
    assert reopened.keyring is None
    assert type(reopened.problem) is error and type(reopened.problem.__cause__) is cause
    assert str(path) in str(reopened.problem) and match in str(reopened.problem)
    assert [r.getMessage() for r in caplog.records] == [
        f"{reopened.problem}; trusting only the pinned root until a valid keyring arrives"
    ]


@pytest.mark.parametrize(("case", "mutate"), [(c[0], c[1]) for c in STORED_KEYRING_CASES
                                              if c[0] != "a-directory"])
def test_a_fresh_offer_keyring_is_accepted_after_a_bad_stored_one(
    trust: TrustStore, root: Root, case: str, mutate: Mutate
) -> None:
    """Even one with a lower version than the bad file claims: that file proves nothing."""
    trust.accept(*root.keyring(3), now=T0)
    mutate(trust.dir / TrustStore.KEYRING, root)
    reopened = TrustStore(trust.dir)
    assert reopened.accept(*root.keyring(2), now=T0).version == 2
    assert reopened.keyring is not None and reopened.problem is None
    again = TrustStore(trust.dir)
    assert again.keyring == reopened.keyring and again.problem is None


def test_a_genuine_stored_keyring_is_trusted_on_load_even_once_expired(
    trust: TrustStore, root: Root
) -> None:
    """Expiry is checked where the keyring is used; on load it is still the newest version."""
    raw, sig = root.keyring(3, expires=T0 + 10)
    trust.accept(raw, sig, now=T0)
    reopened = TrustStore(trust.dir)
    assert reopened.problem is None and reopened.keyring == trust.keyring
    assert reopened.accept(*root.keyring(2), now=T0 + 10).version == 3  # still rules versions
    with pytest.raises(KeyringError, match="expired"):
        reopened.accept(raw, sig, now=T0 + 10)
    assert reopened.accept(*root.keyring(4), now=T0 + 10).version == 4


# (case, what happens to root.pub, the fatal error, message fragment)
ROOT_CASES = [
    ("missing", lambda p: p.unlink(), StoreError, "no pinned root key: No such file"),
    ("a-directory", lambda p: (p.unlink(), p.mkdir()), StoreError, "Is a directory"),
    ("truncated", lambda p: p.write_bytes(p.read_bytes()[:30]), CorruptStateError, "invalid JSON"),
    ("empty", lambda p: p.write_bytes(b""), CorruptStateError, "invalid JSON"),
    ("wrong-type", lambda p: p.write_bytes(b'{"type": "x"}'), CorruptStateError,
     "expected type 'ed25519-public'"),
    ("wrong-keyid", lambda p: p.write_bytes(
        encode_public_key(SigningKey.generate().public_raw).replace(b'"keyid":"', b'"keyid":"0')),
     CorruptStateError, "key id does not match"),
]


@pytest.mark.parametrize(("case", "mutate", "error", "match"), ROOT_CASES,
                         ids=[c[0] for c in ROOT_CASES])
def test_unreadable_pinned_root_is_fatal_with_one_clear_error(
    trust: TrustStore, case: str, mutate: Callable[[Path], object], error: type[Exception],
    match: str,
) -> None:
    path = trust.dir / TrustStore.ROOT
    mutate(path)
    with pytest.raises(error) as info:
        TrustStore(trust.dir)
    assert type(info.value) is error and str(path) in str(info.value)
    assert match in str(info.value) and "\n" not in str(info.value)


def test_a_keyring_that_cannot_be_saved_is_a_store_error(trust: TrustStore, root: Root) -> None:
    (trust.dir / TrustStore.KEYRING).mkdir()  # os.replace onto a directory fails
    with pytest.raises(StoreError, match="cannot save keyring v1"):
        trust.accept(*root.keyring(1), now=T0)
    assert trust.keyring is None


@pytest.mark.parametrize("kem", [KEM_X25519, KEM_HYBRID])
def test_identity_round_trip(tmp_path: Path, kem: str) -> None:
    ident = DeviceIdentity.create(tmp_path / "keys", "dev-1", kem=kem)
    assert (tmp_path / "keys" / "device.json").stat().st_mode & 0o777 == 0o600
    loaded = DeviceIdentity.load(tmp_path / "keys")
    assert loaded.device_id == "dev-1" and loaded.kem == ident.kem
    assert loaded.signing.raw() == ident.signing.raw()
    public = DevicePublic.decode((tmp_path / "keys" / "device.pub.json").read_bytes())
    assert public == ident.public() and public.kem.kem == kem
    assert b"kem_private" not in (tmp_path / "keys" / "device.pub.json").read_bytes()


@pytest.mark.parametrize("bad", ["", "-dev", "dev/1", "d" * 65, "dév"])
def test_identity_rejects_bad_device_ids(tmp_path: Path, bad: str) -> None:
    with pytest.raises(DecodeError):
        DeviceIdentity.create(tmp_path / "keys", bad)


def test_config_round_trip_and_overrides(tmp_path: Path) -> None:
    cfg = AgentConfig(home=tmp_path, device_id="dev-1", keep=3, broker="mqtt://h:1883")
    (tmp_path / "agent.toml").write_text(cfg.to_toml())
    assert AgentConfig.load(tmp_path) == cfg
    assert AgentConfig.load(tmp_path, keep=5, threads=None).keep == 5


@pytest.mark.parametrize(("toml", "error", "match"), [
    ('device_id = "d"\nbogus = 1\n', ValueError, "unknown settings"),
    ('device_id = "d"\nkeep = 0\n', ValueError, "keep"),
    ('device_id = "d"\nmqtt_protocol = 4\n', ValueError, "mqtt_protocol"),
    ("keep = 2\n", TypeError, "device_id"),
])
def test_bad_config(tmp_path: Path, toml: str, error: type[Exception], match: str) -> None:
    (tmp_path / "agent.toml").write_text(toml)
    with pytest.raises(error, match=match):
        AgentConfig.load(tmp_path)


def test_missing_config_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="agent init"):
        AgentConfig.load(tmp_path)


# (case, what happens to device.json, the error, its cause, message fragment)
IDENTITY_CASES: list[tuple[str, Callable[[Path], object], type[Exception], type[Exception],
                           str]] = [
    ("missing", lambda p: p.unlink(), StoreError, FileNotFoundError,
     "cannot read the device keys: No such file"),
    ("a-directory", lambda p: (p.unlink(), p.mkdir()), StoreError, IsADirectoryError,
     "Is a directory"),
    ("truncated", lambda p: p.write_bytes(p.read_bytes()[:20]), CorruptStateError, DecodeError,
     "invalid JSON"),
    ("empty", lambda p: p.write_bytes(b""), CorruptStateError, DecodeError, "invalid JSON"),
    ("no-sign-seed", lambda p: rewrite(p, sign_seed=None), CorruptStateError, DecodeError,
     "sign_seed"),
    ("short-sign-seed", lambda p: rewrite(p, sign_seed=b64e(b"x" * 31)), CorruptStateError,
     ValueError, "32 bytes"),
    ("unknown-kem", lambda p: rewrite(p, kem="rsa"), CorruptStateError, ValueError, "KEM"),
    ("short-kem-key", lambda p: rewrite(p, kem_private=b64e(b"x")), CorruptStateError,
     ValueError, "private key"),
    ("bad-device-id", lambda p: rewrite(p, device_id="../x"), CorruptStateError, DecodeError,
     "device id"),
    ("extra-field", lambda p: rewrite(p, extra="1"), CorruptStateError, DecodeError,
     "unexpected fields"),
]


def rewrite(path: Path, **changes: str | None) -> None:
    d = json.loads(path.read_bytes())
    for k, v in changes.items():
        if v is None:
            d.pop(k)
        else:
            d[k] = v
    path.write_bytes(canonical_json(d))


@pytest.mark.parametrize(("case", "mutate", "error", "cause", "match"), IDENTITY_CASES,
                         ids=[c[0] for c in IDENTITY_CASES])
def test_unreadable_identity_gives_one_clear_error(
    tmp_path: Path, case: str, mutate: Callable[[Path], object], error: type[Exception],
    cause: type[Exception], match: str,
) -> None:
    DeviceIdentity.create(tmp_path / "keys", "dev-1")
    path = tmp_path / "keys" / "device.json"
    mutate(path)
    with pytest.raises(error) as info:
        DeviceIdentity.load(tmp_path / "keys")
    assert type(info.value) is error and type(info.value.__cause__) is cause
    assert str(path) in str(info.value) and match in str(info.value)


def test_unreadable_config_is_a_store_error_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "agent.toml").mkdir()
    with pytest.raises(StoreError, match="agent.toml: cannot read the config: Is a directory"):
        AgentConfig.load(tmp_path)
